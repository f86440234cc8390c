"""`llava_ft serve`: an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health) and a web chat page.

    llava_ft serve ./merged --prompt-template qwen_chat                       # text model, http://127.0.0.1:8000
    llava_ft serve LLM --llava OUT --visual-encoder VE --image-dir ./imgs     # LLaVA (XTuner layout)
    llava_ft serve ./llava_hf_export --api-key sk-local --port 9000           # llava-hf folder
    llava_ft serve BASE --adapter ./hf --bits 4                               # base + PEFT adapter, QLoRA-style

Then point any OpenAI client at http://127.0.0.1:8000/v1 (model name = --model-name, default the folder
name) or open http://127.0.0.1:8000/ in a browser. Binds to 127.0.0.1 unless --host says otherwise.
"""
from __future__ import annotations

import argparse
import logging
import os

from llava_ft.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="LLM folder, merged/llava-hf export, work dir or iter_N.pth")
    parser.add_argument("--adapter", help="PEFT adapter folder to apply to MODEL")
    parser.add_argument("--llava", help="folder written by `convert pth_to_hf` (projector/, llm_adapter/, ...)")
    parser.add_argument("--visual-encoder", help="vision tower folder (with --llava)")
    parser.add_argument("--prompt-template", help="template name (default: what training saved, else hf)")
    parser.add_argument("--bits", type=int, choices=(4, 8), help="load the LLM quantized (bitsandbytes)")
    parser.add_argument("--torch-dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    from llava_ft.commands.convert import add_model_loading_arguments

    add_model_loading_arguments(parser)
    parser.add_argument("--model-name", help="the model id clients send (default: MODEL's folder name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("LLAVA_FT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $LLAVA_FT_API_KEY, else none)")
    parser.add_argument("--max-queue", type=int, default=16,
                        help="requests that may wait behind the running one; more get 503 + Retry-After")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="answer up to this many waiting requests with the same sampling settings in one "
                             "batched generate call (1: one request at a time)")
    parser.add_argument("--image-dir", help="allow local image paths (and OneVision video_url clips), but only "
                        "inside this folder")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="let requests name http(s) image (and OneVision video) URLs that the server then fetches")
    parser.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (MiB)")
    parser.add_argument("--max-image-mb", type=float, default=20.0, help="largest single image (MiB, encoded)")
    parser.add_argument("--max-video-mb", type=float, default=64.0,
                        help="largest remote video clip fetched (MiB; a data: clip is bounded by --max-body-mb)")
    parser.add_argument("--max-image-pixels", type=int, default=40_000_000,
                        help="largest width x height accepted (guards against decompression bombs)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from llava_ft.serve.app import create_app
    except ImportError as err:
        raise UserError(f"serving needs the serve extra ({err.name} is missing): pip install 'llava_ft[serve]'")
    from llava_ft.inference import load_chat_model

    if args.image_dir and not os.path.isdir(args.image_dir):
        raise UserError(f"--image-dir {args.image_dir}: no such folder")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logging.getLogger("llava_ft.serve").warning(
            "binding to %s without --api-key: anyone who can reach this address can use the model", args.host)
    chat_model = load_chat_model(args.model, adapter=args.adapter, llava=args.llava,
                                 visual_encoder=args.visual_encoder, bits=args.bits, torch_dtype=args.torch_dtype,
                                 prompt_template=args.prompt_template, device=args.device, attn_implementation=args.attn_implementation,
                         trust_remote_code=args.trust_remote_code)
    name = args.model_name or os.path.basename(os.path.normpath(args.llava or args.adapter or args.model))
    mib = 1024 * 1024
    app = create_app(chat_model, name, api_key=args.api_key, max_queue=args.max_queue, max_batch=args.max_batch,
                     image_dir=args.image_dir,
                     allow_remote_images=args.allow_remote_images, max_body_bytes=int(args.max_body_mb * mib),
                     max_image_bytes=int(args.max_image_mb * mib), max_image_pixels=args.max_image_pixels,
                     max_video_bytes=int(args.max_video_mb * mib))
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving '{name}' on http://{shown_host}:{args.port}/  (API: http://{shown_host}:{args.port}/v1)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
