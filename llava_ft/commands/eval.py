"""`llava_ft eval`: answer a QA set with a trained model and report accuracy.

    llava_ft eval work_dirs/run --data eval.jsonl --image-folder data/images
    llava_ft eval ./llava_hf --data MMBench_DEV_EN.tsv --batch-size 16

Prints exact-match and "contains" accuracy (and option accuracy for MMBench TSVs), writes every answer to
`--output` (default: predictions.jsonl beside the data) and the metrics to the same name + .metrics.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="work dir / iter_N.pth / converted folder / llava-hf folder / HF model")
    parser.add_argument("--adapter")
    parser.add_argument("--llava")
    parser.add_argument("--visual-encoder")
    parser.add_argument("--prompt-template")
    parser.add_argument("--system")
    parser.add_argument("--bits", type=int, choices=(4, 8))
    parser.add_argument("--torch-dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    from llava_ft.commands.convert import add_model_loading_arguments

    add_model_loading_arguments(parser)
    parser.add_argument("--data", required=True, help="QA .jsonl (id, question, answer, image) or MMBench .tsv")
    parser.add_argument("--image-folder", help="folder the jsonl image paths are relative to")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--output", help="predictions .jsonl (default: <data stem>.predictions.jsonl)")


def run(args: argparse.Namespace) -> int:
    from llava_ft.commands.chat import _quiet_transformers

    _quiet_transformers()
    from llava_ft.fileio import write_json
    from llava_ft.inference import GenerationSettings, load_chat_model
    from llava_ft.inference.evaluate import evaluate, load_qa, write_predictions

    items = load_qa(args.data, args.image_folder)  # before loading the model: bad data fails fast
    cm = load_chat_model(args.model, adapter=args.adapter, llava=args.llava, visual_encoder=args.visual_encoder,
                         bits=args.bits, torch_dtype=args.torch_dtype, prompt_template=args.prompt_template,
                         device=args.device, attn_implementation=args.attn_implementation,
                         trust_remote_code=args.trust_remote_code, system=args.system)
    report = evaluate(cm, items, GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.0),
                      batch_size=args.batch_size)
    out = Path(args.output) if args.output else Path(args.data).with_suffix(".predictions.jsonl")
    write_predictions(report.predictions, out)
    write_json(out.with_name(out.name + ".metrics.json"), report.metrics)
    m = report.metrics
    line = f"{m['n']} questions: exact match {m['exact_match']:.2%}, contains {m['contains']:.2%}"
    if "choice_accuracy" in m:
        line += f", option accuracy {m['choice_accuracy']:.2%}"
    print(line)
    print(f"predictions: {out}")
    print(json.dumps(m))
    return 0
