"""The `llava_ft` command: a thin dispatcher to one module per subcommand.

Each subcommand lives in `llava_ft/commands/<module>.py` and exposes two functions:
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int | None
Modules are imported only when their subcommand runs, so `llava_ft --help` stays fast (no torch import)
and one subcommand's heavy dependencies (e.g. fastapi for `serve`) never affect another.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from llava_ft.errors import UserError

# subcommand -> (module under llava_ft.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train from a YAML config (text SFT, incremental pretraining, LLaVA either phase)"),
    "pretrain": ("train", "LLaVA phase 1: only the projector learns; writes iter_N.pth"),
    "finetune": ("train", "LLaVA phase 2: projector + (Q)LoRA on the LLM (+ LoRA on the vision tower)"),
    "list-cfg": ("configs", "list the built-in recipes (-p PATTERN filters)"),
    "copy-cfg": ("configs", "copy a recipe to DIR as NAME_copy.yaml"),
    "log-dataset": ("log_dataset", "show exactly what the model trains on for a config"),
    "convert": ("convert", "pth_to_hf | merge: export trained weights to Hugging Face formats"),
    "chat": ("chat", "chat in the terminal with a trained model (text or image)"),
    "eval": ("eval", "answer a QA set (jsonl or MMBench TSV) and report accuracy"),
    "serve": ("serve", "OpenAI-compatible API + web chat page"),
    "data": ("data", "data tools: repeat, replace, check, stats, convert, demo"),
    "demo": ("demo", "run the whole workflow end to end on the built-in CPU demo"),
}


def _build_top_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    parser = argparse.ArgumentParser(
        prog="llava_ft",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train LLaVA-style VLMs and fine-tune LLMs.\n\ncommands:\n" + "\n".join(lines),
        usage="llava_ft COMMAND [options]  (llava_ft COMMAND --help for details)",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The `deepspeed` launcher puts --local_rank=N before the subcommand; LOCAL_RANK in the env says the same.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    top = _build_top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if argv[0] == "--version":
        from llava_ft import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"llava_ft: unknown command '{name}'.{hint} Commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        from llava_ft.versions import check_versions

        check_versions()  # before any heavy import: a wrong transformers fails here, in one sentence
    except UserError as err:
        print(f"llava_ft {name}: error: {err}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"llava_ft.commands.{COMMANDS[name][0]}")
    parser = argparse.ArgumentParser(prog=f"llava_ft {name}", description=COMMANDS[name][1])
    parser.set_defaults(command=name)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        rc = module.run(args)
    except UserError as err:
        print(f"llava_ft {name}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Output piped into `head` and the reader went away: not an error worth a traceback.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        print(f"\nllava_ft {name}: interrupted; the last saved checkpoint (if any) is intact.", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
