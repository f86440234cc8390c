"""`llava_ft train|pretrain|finetune CONFIG [--work-dir D] [--deepspeed NAME|PATH] [--resume auto|PATH] [key=value ...]`.

CONFIG is a YAML path or a built-in recipe name (`llava_ft list-cfg`). Overrides like
`train.learning_rate=1e-4` are applied and validated, and data files and image folders checked, before any
model loads (llava_ft.engine.run then reads the data itself, still before the model). `pretrain` checks
that only the projector trains; `finetune` checks that the config has a visual encoder. Under torchrun/deepspeed
launchers every process runs this same command. `--dry-run` stops after the config
checks and prints the recipe file, work dir and DeepSpeed JSON that a real run would use (no model or data
loads).
"""
from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML recipe path or built-in recipe name")
    # `CONFIG --work-dir D a.b=1` puts overrides after options; plain parse_args would reject them as
    # unrecognized (a positional nargs="*" is consumed once), so this parser parses intermixed args.
    parser.parse_args = parser.parse_intermixed_args
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config values, e.g. train.max_steps=100 model.llm=/models/qwen")
    parser.add_argument("--work-dir", default=None, help="output folder (default: work_dirs/<config name>)")
    parser.add_argument("--deepspeed", default=None,
                        help="DeepSpeed JSON path or built-in name (zero1, zero2, zero2_offload, zero3, zero3_offload)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue a run: 'auto' = newest complete checkpoint in the work dir, or a "
                             "checkpoint-<step>/ folder or iter_<step>.pth")
    parser.add_argument("--launcher", default="none", choices=("none", "pytorch", "slurm"),
                        help="none: NPROC_PER_NODE>1 starts that many processes via torchrun (NNODES, NODE_RANK, "
                             "ADDR, PORT for several nodes); pytorch: started by torchrun/deepspeed; slurm: under srun")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, phase and DeepSpeed JSON, print what would run, and stop")
    # torchrun/deepspeed launchers may pass --local_rank / --local-rank; the env var carries the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from llava_ft.config import check_model_paths, load_config

    cfg = load_config(args.config, overrides=args.overrides)  # all config errors surface before torch loads
    check_model_paths(cfg, cfg.source_path)  # a missing model folder fails now, not after the data pass
    if getattr(args, "dry_run", False):
        return _dry_run(cfg, args)

    from llava_ft.data.read import check_sources

    check_sources(cfg.data)  # a missing data file or image folder fails here, once, before any launcher or model
    from llava_ft.engine import launch

    # After the config check (a typo fails once, not N times); may replace this process by torchrun.
    launch.setup_launcher(args.launcher, _own_argv(args))
    from llava_ft.engine.run import run_training

    result = run_training(cfg, work_dir=args.work_dir, resume=args.resume, deepspeed=args.deepspeed,
                          command=getattr(args, "command", "train"))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[llava_ft] done: {result.global_step} steps, work dir {result.work_dir}, "
              f"last checkpoint {result.last_checkpoint}", flush=True)
    return 0


def _dry_run(cfg, args: argparse.Namespace) -> int:
    """What `run_training` would use, checked the same way, without loading anything heavy."""
    from llava_ft.engine.distributed import load_deepspeed_config
    from llava_ft.engine.run import check_phase, default_work_dir, resolve_deepspeed

    command = getattr(args, "command", "train")
    check_phase(cfg, command)
    ds_config = resolve_deepspeed(args.deepspeed)
    if ds_config is not None:
        load_deepspeed_config(ds_config)  # unreadable JSON fails here, as it would at the start of training
    print(f"[llava_ft] dry run of `llava_ft {command}`: config {cfg.source_path} ({cfg.resolved_phase}), "
          f"work dir {args.work_dir or default_work_dir(cfg)}, deepspeed {ds_config or 'none'}", flush=True)
    return 0


def _own_argv(args: argparse.Namespace) -> list[str]:
    """This command's arguments as typed (sys.argv) so torchrun's workers parse exactly the same line."""
    argv = sys.argv[1:]
    if argv and argv[0] == args.command:
        return argv
    # Called as a library (cli.main([...])): rebuild from the parsed namespace.
    out = [args.command, args.config, *args.overrides]
    for flag, value in (("--work-dir", args.work_dir), ("--deepspeed", args.deepspeed), ("--resume", args.resume)):
        if value is not None:
            out += [flag, value]
    return out
