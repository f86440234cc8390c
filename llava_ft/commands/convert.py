"""`llava_ft convert`: export trained weights to Hugging Face formats.

    llava_ft convert pth_to_hf CONFIG work_dirs/x/iter_500.pth OUT [--format xtuner|llava-hf] [--fp32]
                                [--max-shard-size 2GB] [--layout llama|internlm2]
    llava_ft convert merge BASE ADAPTER OUT [--is-clip] [--max-shard-size 2GB] [--device cpu|cuda|auto]
                                [--layout llama|internlm2] [--attn-implementation X] [--trust-remote-code]

CONFIG may be `-` to use the config saved inside the checkpoint. See `llava_ft.convert` for the layouts.
"""
from __future__ import annotations

import argparse
import tempfile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{pth_to_hf,merge}")
    p = sub.add_parser("pth_to_hf", help="iter_N.pth -> PEFT adapter / HF model / XTuner LLaVA layout / llava-hf")
    p.add_argument("config", help="the run's YAML config (or '-' for the config saved in the checkpoint)")
    p.add_argument("pth", help="an iter_N.pth file (or a work dir: its newest checkpoint; or a checkpoint-N/ "
                               "folder, DeepSpeed shards included)")
    p.add_argument("save_dir")
    p.add_argument("--format", dest="fmt", choices=("xtuner", "llava-hf"), default="xtuner",
                   help="xtuner (default): adapters/projector as XTuner writes them; llava-hf: one merged "
                        "LlavaForConditionalGeneration folder with processor")
    p.add_argument("--fp32", action="store_true", help="save weights in float32 (default: the run's dtype)")
    p.add_argument("--max-shard-size", default="2GB", help="largest weight file for full models (default 2GB)")
    p.add_argument("--layout", choices=("llama", "internlm2"), default="llama",
                   help="full LLM weights of an InternLM2 run: llama (default; plain transformers) or internlm2 "
                        "(InternLM2's own names + config and code, for InternLM/XTuner tools)")
    m = sub.add_parser("merge", help="merge a LoRA adapter into its base model and save it")
    m.add_argument("base", help="base model folder / hub id (the LLM, or the vision tower with --is-clip)")
    m.add_argument("adapter", help="PEFT adapter folder")
    m.add_argument("save_dir")
    m.add_argument("--is-clip", action="store_true", help="the adapter belongs to a vision tower (CLIP/SigLIP)")
    m.add_argument("--max-shard-size", default="2GB")
    m.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    m.add_argument("--fp32", action="store_true", help="merge and save in float32")
    m.add_argument("--layout", choices=("llama", "internlm2"), default="llama",
                   help="llama (default): a LlamaForCausalLM folder; internlm2: InternLM2's own layout (InternLM2 base)")
    add_model_loading_arguments(m)


def add_model_loading_arguments(parser: argparse.ArgumentParser) -> None:
    """--attn-implementation / --trust-remote-code (chat, eval, serve, merge); default: what the run recorded."""
    from llava_ft.config import ATTN_IMPLS

    parser.add_argument("--attn-implementation", choices=ATTN_IMPLS,
                        help="attention kernel (default: the one the run used, else auto)")
    parser.add_argument("--trust-remote-code", action="store_true", default=None,
                        help="allow the model folder's own Python code (auto_map); default: what the run set")


def run(args: argparse.Namespace) -> int:
    if args.action == "pth_to_hf":
        from llava_ft.convert import pth_to_hf
        from llava_ft.inference.artifacts import detect_artifact

        from llava_ft.engine.resume import is_trainer_checkpoint_dir, iter_from_trainer_checkpoint

        source = args.pth
        # A checkpoint-<step>/ folder whose iter file is gone is gathered from its ZeRO shards into a
        # scratch iter file (the size of the trainable weights), deleted once the export is written.
        with tempfile.TemporaryDirectory(prefix="llava_ft_zero_") as scratch:
            pth = args.pth
            if is_trainer_checkpoint_dir(pth):  # checkpoint-<step>/ (DeepSpeed or not): its iter file
                pth = iter_from_trainer_checkpoint(pth, out_dir=scratch)
            art = detect_artifact(pth)
            if art.kind != "iter_pth":
                from llava_ft.errors import UserError

                raise UserError(f"{pth}: not an iter_N.pth checkpoint (found a {art.kind} folder)")
            out = pth_to_hf(None if args.config == "-" else args.config, art.path, args.save_dir, fmt=args.fmt,
                            fp32=args.fp32, max_shard_size=args.max_shard_size, layout=args.layout)
        print(f"saved {args.fmt} export of {source} to {out}")
        return 0
    from llava_ft.convert import merge_adapter

    out = merge_adapter(args.base, args.adapter, args.save_dir, is_clip=args.is_clip,
                        max_shard_size=args.max_shard_size, device=args.device, fp32=args.fp32, layout=args.layout,
                        trust_remote_code=args.trust_remote_code, attn_implementation=args.attn_implementation)
    print(f"saved merged model to {out}")
    return 0
