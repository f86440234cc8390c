"""Merge a PEFT LoRA adapter into its base model and save the result (`llava_ft convert merge`).

    merge_adapter("Qwen/Qwen2-0.5B", "out/hf", "out/merged")                  # LLM adapter
    merge_adapter("openai/clip-vit-large-patch14-336", "out/visual_encoder_adapter", "out/ve", is_clip=True)

The base is loaded unquantized in its saved dtype (or fp32 with `fp32=True`), so an adapter trained on a
4-bit base merges into real weights. The tokenizer (LLM) or image processor (vision tower) is saved beside
the weights: from the adapter folder when it holds one (e.g. `pth_to_hf` saved it), else from the base.
`llava_ft.json` (prompt template, system) is carried over so `llava_ft chat OUT` prompts as in training.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Union

import torch

from llava_ft.errors import UserError
from llava_ft.inference.artifacts import read_meta, write_meta


def _device_map(device: str):
    if device == "auto":
        return "auto" if torch.cuda.is_available() else None
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu")
        return {"": torch.cuda.current_device()}
    if device != "cpu":
        raise UserError(f"--device must be cpu, cuda or auto, got {device!r}")
    return None


def merge_adapter(base, adapter, save_dir, is_clip: bool = False, max_shard_size: Union[str, int] = "2GB",
                  device: str = "cpu", fp32: bool = False) -> str:
    """Load `base`, apply the adapter, merge, save to `save_dir` (atomically: staged then renamed)."""
    from peft import PeftModel

    from llava_ft.convert.pth_to_hf import _publish, _staging
    from llava_ft.model.llm import peft_quiet

    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: no adapter_config.json; give the PEFT adapter folder "
                        "(pth_to_hf output, or its llm_adapter/ / visual_encoder_adapter/)")
    kwargs = {"dtype": torch.float32 if fp32 else "auto"}
    dmap = _device_map(device)
    if dmap is not None:
        kwargs["device_map"] = dmap
    if is_clip:
        model, extra = _load_vision(str(base), kwargs)
    else:
        model, extra = _load_llm(str(base), adapter_dir, kwargs)
    try:
        with peft_quiet():
            model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"adapter {adapter} does not fit base {base}: {str(err).splitlines()[0]}") from None
    merged = model.merge_and_unload()
    tmp = _staging(save_dir)
    try:
        merged.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        extra.save_pretrained(str(tmp))
        meta = read_meta(adapter_dir)
        if meta:
            write_meta(tmp, {**meta, "format": "hf_model", "merged_from": {"base": str(base), "adapter": str(adapter)}})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, save_dir)


def _load_llm(base: str, adapter_dir: Path, kwargs: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except OSError as err:
        raise UserError(f"cannot load base model {base}: {str(err).splitlines()[0]}") from None
    tok_src = str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else base
    return model, AutoTokenizer.from_pretrained(tok_src)


def _load_vision(base: str, kwargs: dict):
    """A CLIP/SigLIP vision tower (type from its config.json) and its image processor."""
    from transformers import AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

    from llava_ft.model.vision import detect_kind

    kind = detect_kind(base)
    if kind == "open_clip":
        raise UserError(f"{base} is an OpenCLIP model; merged OpenCLIP towers have no Hugging Face folder format. "
                        "Keep the adapter (visual_encoder_adapter/) and load it with `llava_ft chat --llava`")
    cls = CLIPVisionModel if kind == "clip" else SiglipVisionModel
    try:
        return cls.from_pretrained(base, **kwargs), AutoImageProcessor.from_pretrained(base)
    except OSError as err:
        raise UserError(f"cannot load vision tower {base}: {str(err).splitlines()[0]}") from None
