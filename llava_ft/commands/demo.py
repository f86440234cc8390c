"""`llava_ft demo [--workspace DIR] [--fast] [--force]`: the whole workflow on tiny local models, no downloads.

Builds the demo workspace (data, tokenizer, tiny LLM and CLIP), pretrains the LLM on text, runs LLaVA
pretrain and QLoRA finetune, scores held-out colour questions before and after finetuning, exports the
result (XTuner layout and llava-hf) and answers one question about a demo image; then prints a table of
what each stage took and produced (also written to DIR/summary.md and DIR/summary.json). Rerunning reuses
finished stages; --force redoes them. See llava_ft/demo/pipeline.py.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", default="demo_workspace",
                        help="folder for the data, models, runs and exports (default: ./demo_workspace)")
    parser.add_argument("--fast", action="store_true",
                        help="a few steps per stage and little data: checks that every stage runs (about a "
                             "minute); accuracy is not meaningful")
    parser.add_argument("--force", action="store_true", help="redo every stage, even those already complete")


def run(args: argparse.Namespace) -> int:
    from llava_ft.commands.chat import _quiet_transformers

    _quiet_transformers()  # progress bars of shard writing etc. would bury the stage lines
    from llava_ft.demo.pipeline import run_demo

    report = run_demo(args.workspace, fast=args.fast, force=args.force)
    print()
    print(report.table())
    print(f"\nsummary: {report.summary_path}")
    return 0
