"""Where `from_pretrained` puts a model: the one device_map rule for chat, eval, serve, convert and merge.

    load_llm(cfg, device_map=device_map("auto", "4bit"))
    AutoModelForCausalLM.from_pretrained(base, device_map=device_map("auto", spread=True))   # merge

`device` is what users pass as --device: cpu, cuda or auto (cuda when a GPU is visible, else cpu).
"""
from __future__ import annotations

import torch

from llava_ft.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


def device_map(device: str, quantization: str = "none", spread: bool = False):
    """device_map for `from_pretrained`.

    cpu: None (plain CPU loading), or {"": "cpu"} for a bitsandbytes-quantized model, which needs one;
    cuda: everything on the current GPU. `spread` (merge, which may hold a model too big for one GPU):
    auto with a GPU becomes accelerate's "auto", which splits the model over the GPUs and the CPU.
    """
    if device not in DEVICES:
        raise UserError(f"--device must be cpu, cuda or auto, got {device!r}")
    if device == "auto":
        if spread and torch.cuda.is_available():
            return "auto"
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu")
        return {"": torch.cuda.current_device()}
    return {"": "cpu"} if quantization != "none" else None
