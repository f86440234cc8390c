"""`llava_ft data SUBCOMMAND`: repeat, replace, check, stats, convert, demo (see llava_ft.datatools).

    llava_ft data repeat  -i in.json -o out.json -n 3 [--shuffle --seed 0] [--force]
    llava_ft data replace -i in.jsonl -o out.jsonl --old '{{NAME}}' --new 'Shapey'
    llava_ft data check   CONFIG | --data f.json [--image-folder D] [--tokenizer T --max-length L --num-image-tokens N]
    llava_ft data stats   CONFIG | --data f.json --tokenizer T [--plot out.png]
    llava_ft data convert -i in.json -o out.jsonl --to openai|llava|alpaca|sharegpt|jsonl|json
    llava_ft data demo    OUT_DIR

The scripts in data_tools/ (repeat.py, check.py, ...) call `main(["repeat", ...])` here, so both entry
points take the same flags.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llava_ft.errors import UserError

TOOLS = ("repeat", "replace", "check", "stats", "convert", "demo")


def _io_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", required=True, help="input .json (list) or .jsonl file")
    p.add_argument("-o", "--output", required=True, help="output file (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output (never the input)")


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="a YAML config: checks every data source with its model's tokenizer")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.add_argument("--data", help="a data file, dataset folder or Hub dataset id (instead of a config)")
    p.add_argument("--image-folder", help="folder image paths are relative to (default: the data file's folder)")
    p.add_argument("--format", default=None, help="data format (default auto: detected from the first record)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the config's model.tokenizer / model.llm)")
    p.add_argument("--template", default=None, help="prompt template (default: the config's, else 'default')")
    p.add_argument("--system", default=None, help="system prompt (default: the config's)")
    p.add_argument("--max-length", type=int, default=None, help="max tokens after image expansion")
    p.add_argument("--num-image-tokens", type=int, default=None,
                   help="tokens per image (default: from the config's visual encoder; 0 = count images as 1)")
    p.add_argument("--max-prompt-length", type=int, default=None,
                   help="preference pairs: prompt positions kept (default: the config's, else max_length // 2)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tool", metavar="TOOL", required=True)

    p = sub.add_parser("repeat", help="repeat a dataset N times (same format), streaming")
    _io_args(p)
    p.add_argument("-n", "--times", type=int, required=True, help="how many copies")
    p.add_argument("--shuffle", action="store_true", help="shuffle each copy (its own order per copy)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("replace", help="replace text in every string of every record")
    _io_args(p)
    p.add_argument("--old", required=True, help="text to find (e.g. {{NAME}})")
    p.add_argument("--new", required=True, help="replacement text")

    p = sub.add_parser("check", help="find missing/broken images, bad conversations, duplicates, over-long samples")
    _source_args(p)
    p.add_argument("--report", help="JSON report path (default: DATA.check.json next to the first data file)")
    p.add_argument("--workers", type=int, default=8, help="threads verifying images")
    p.add_argument("--show", type=int, default=20, help="problems listed on screen (all are in the report)")

    p = sub.add_parser("stats", help="token-length percentiles, modality counts, PNG histogram")
    _source_args(p)
    p.add_argument("--plot", help="histogram PNG path (default: DATA.lengths.png next to the first data file)")
    p.add_argument("--json", dest="json_out", help="also write the figures as JSON here")

    p = sub.add_parser("convert", help="alpaca/sharegpt/openai <-> llava; JSON list <-> JSONL")
    _io_args(p)
    p.add_argument("--to", required=True, choices=("llava", "openai", "alpaca", "sharegpt", "jsonl", "json"))
    p.add_argument("--from", dest="source_format", default="auto", help="input format (default: detected)")

    p = sub.add_parser("demo", help="write the demo workspace (data, tokenizer, tiny LLM, tiny CLIP)")
    p.add_argument("out", help="output folder (reused if already complete)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", default="qwen2", choices=("qwen2", "llama"))
    p.add_argument("--vision", default="clip", choices=("clip", "siglip"))
    p.add_argument("--force", action="store_true", help="rebuild even if complete")


def _first_data(plan) -> str:
    """Where reports go by default: next to the first data file; a Hub id names a file in the current folder."""
    from llava_ft.data.hub import is_hub_id

    path = plan.sources[0].path
    return path.replace("/", "__") if is_hub_id(path) else path.rstrip("/")


def run(args: argparse.Namespace) -> int:
    tool = args.tool
    if tool == "repeat":
        from llava_ft.datatools.repeat import repeat_dataset

        n = repeat_dataset(args.input, args.output, args.times, shuffle=args.shuffle, seed=args.seed,
                           force=args.force, progress=sys.stderr.isatty())
        print(f"wrote {n} records to {args.output}")
        return 0
    if tool == "replace":
        from llava_ft.datatools.replace import replace_in_dataset

        res = replace_in_dataset(args.input, args.output, args.old, args.new, force=args.force)
        print(f"replaced {res.replacements} occurrence(s) of {args.old!r} in {res.records_changed} of "
              f"{res.records} record(s); wrote {args.output}")
        return 0
    if tool == "convert":
        from llava_ft.datatools.convert import convert_dataset

        n = convert_dataset(args.input, args.output, args.to, source_format=args.source_format, force=args.force,
                            progress=sys.stderr.isatty())
        print(f"wrote {n} records ({args.to}) to {args.output}")
        return 0
    if tool == "demo":
        from llava_ft.demo.assets import build_demo_workspace

        paths = build_demo_workspace(args.out, seed=args.seed, arch=args.arch, vision=args.vision, force=args.force)
        for key, value in paths.items():
            print(f"{key:<16} {value}")
        return 0
    from llava_ft.datatools.sources import plan_from_args

    if args.config and args.data:
        raise UserError("give either a CONFIG or --data, not both")
    if args.config and "=" in args.config:
        raise UserError(f"'{args.config}' looks like an override; put the CONFIG path first")
    plan = plan_from_args(args)
    if tool == "check":
        from llava_ft.datatools.check import check_data, default_report_path, format_summary, write_report

        report = check_data(plan, workers=args.workers, progress=sys.stderr.isatty())
        print(format_summary(report, limit=args.show))
        path = args.report or default_report_path(_first_data(plan))
        write_report(report, path)
        print(f"report: {path}")
        return 1 if report.errors else 0
    if tool == "stats":
        from llava_ft.datatools.stats import compute_stats, format_stats, plot_histogram

        stats = compute_stats(plan)
        print(format_stats(stats, plan))
        first = Path(_first_data(plan))
        plot = args.plot or str(first.with_name(first.name + ".lengths.png"))
        plot_histogram(stats, plot, plan.max_length)
        print(f"histogram: {plot}")
        if args.json_out:
            from llava_ft.fileio import write_json

            write_json(args.json_out, stats.to_json())
        return 0
    raise UserError(f"unknown data tool {tool!r}; choose one of: {', '.join(TOOLS)}")


def main(argv: list[str]) -> int:
    """Entry for the data_tools/ scripts: `main(["repeat", "-i", ...])` behaves like `llava_ft data repeat ...`."""
    from llava_ft.cli import main as cli_main

    return cli_main(["data", *argv])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
