"""`llava_ft train|pretrain|finetune CONFIG [--work-dir D] [--deepspeed NAME|PATH] [--resume auto|PATH] [key=value ...]`.

CONFIG is a YAML path or a built-in recipe name (`llava_ft list-cfg`). Overrides like
`train.learning_rate=1e-4` are applied and validated before any model loads. `pretrain` checks that only
the projector trains; `finetune` checks that the config has a visual encoder. Under torchrun/deepspeed
launchers every process runs this same command.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML recipe path or built-in recipe name")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config values, e.g. train.max_steps=100 model.llm=/models/qwen")
    parser.add_argument("--work-dir", default=None, help="output folder (default: work_dirs/<config name>)")
    parser.add_argument("--deepspeed", default=None,
                        help="DeepSpeed JSON path or built-in name (zero1, zero2, zero2_offload, zero3, zero3_offload)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue a run: 'auto' = newest complete checkpoint in the work dir, or a "
                             "checkpoint-<step>/ folder or iter_<step>.pth")
    # torchrun/deepspeed launchers may pass --local_rank / --local-rank; the env var carries the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from llava_ft.config import load_config

    cfg = load_config(args.config, overrides=args.overrides)  # all config errors surface before torch loads
    from llava_ft.engine.run import run_training

    result = run_training(cfg, work_dir=args.work_dir, resume=args.resume, deepspeed=args.deepspeed,
                          command=getattr(args, "command", "train"))
    print(f"[llava_ft] done: {result.global_step} steps, work dir {result.work_dir}, "
          f"last checkpoint {result.last_checkpoint}", flush=True)
    return 0
