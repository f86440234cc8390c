"""Merge a PEFT LoRA adapter into its base model and save the result (`llava_ft convert merge`).

    merge_adapter("Qwen/Qwen2-0.5B", "out/hf", "out/merged")                  # LLM adapter
    merge_adapter("openai/clip-vit-large-patch14-336", "out/visual_encoder_adapter", "out/ve", is_clip=True)

The base is loaded unquantized in its saved dtype (or fp32 with `fp32=True`), so an adapter trained on a
4-bit base merges into real weights. The tokenizer (LLM) or image processor (vision tower) is saved beside
the weights: from the adapter folder when it holds one (e.g. `pth_to_hf` saved it), else from the base.
`llava_ft.json` (prompt template, system; for an XTuner `llm_adapter/`, the layout's) is carried over so
`llava_ft chat OUT` prompts as in training, and the merged generation_config.json lists the template's
end-of-turn tokens as eos (`convert/turn_end.py`).

The base loads the way training loaded it (`llava_ft.model.llm.load_causal_lm`): an InternLM2 base runs
as Llama, so the merged folder is a plain LlamaForCausalLM (`layout="llama"`, loads in transformers, vLLM,
llama.cpp converters); `layout="internlm2"` rewrites it in InternLM2's own weight names and config with
the base's auto_map code and tokenizer files, for InternLM's and XTuner's tools. `trust_remote_code` and
`attn_implementation` default to what the adapter's run recorded (its llava_ft.json), else false / auto.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from llava_ft.convert.chat_template import training_chat_template
from llava_ft.convert.model_card import write_model_card
from llava_ft.errors import UserError
from llava_ft.fileio import publish_dir, staging_dir
from llava_ft.inference.artifacts import read_meta, write_meta
from llava_ft.model.devices import device_map


def merge_adapter(base, adapter, save_dir, is_clip: bool = False, max_shard_size: Union[str, int] = "2GB",
                  device: str = "cpu", fp32: bool = False, layout: str = "llama",
                  trust_remote_code: Optional[bool] = None, attn_implementation: Optional[str] = None) -> str:
    """Load `base`, apply the adapter, merge, save to `save_dir` (atomically: staged then renamed)."""
    from peft import PeftModel

    from llava_ft.model.internlm2_detect import LAYOUTS, check_adapter_layout
    from llava_ft.model.internlm2_export import save_internlm2_layout
    from llava_ft.model.llm import peft_quiet

    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: no adapter_config.json; give the PEFT adapter folder "
                        "(pth_to_hf output, or its llm_adapter/ / visual_encoder_adapter/)")
    if layout not in LAYOUTS:
        raise UserError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if is_clip and layout != "llama":
        raise UserError("--layout applies to LLMs; a vision tower has one layout (drop --layout)")
    kwargs = {"dtype": torch.float32 if fp32 else "auto"}
    dmap = device_map(device, spread=True)
    if dmap is not None:
        kwargs["device_map"] = dmap
    if is_clip:
        model, extra = _load_vision(str(base), kwargs)
    else:
        from llava_ft.inference.loader import recorded_model_settings

        recorded = recorded_model_settings(read_meta(adapter_dir))
        trust = recorded["trust_remote_code"] if trust_remote_code is None else trust_remote_code
        attn = attn_implementation or recorded["attn_implementation"]
        check_adapter_layout(adapter_dir, str(base))
        model, extra = _load_llm(str(base), adapter_dir, kwargs, trust, attn)
    try:
        with peft_quiet():
            model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"adapter {adapter} does not fit base {base}: {str(err).splitlines()[0]}") from None
    merged = model.merge_and_unload()
    meta = read_meta(adapter_dir)
    if not meta and not is_clip and (adapter_dir.parent / "projector").is_dir():
        meta = read_meta(adapter_dir.parent)  # llm_adapter/ of an XTuner layout: the run's meta sits beside it
    if not is_clip and meta.get("template"):
        from llava_ft.convert.turn_end import with_turn_end

        # The merged model prompts like training even when the adapter folder predates chat templates.
        extra.chat_template = training_chat_template(extra, meta["template"], meta.get("system"))
        # eos: the run template's end-of-turn tokens, so plain generate stops where llava_ft chat does
        merged.generation_config = with_turn_end(merged.generation_config, extra, meta["template"],
                                                 where=str(save_dir))
    tmp = staging_dir(save_dir)
    try:
        merged.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        extra.save_pretrained(str(tmp))
        if layout == "internlm2":
            save_internlm2_layout(tmp, base)
        origin = {"base": str(base), "adapter": str(adapter)}
        if meta or layout != "llama":
            write_meta(tmp, {**meta, "format": "hf_model", "llm_layout": layout, "merged_from": origin})
        write_model_card(tmp, meta, "hf_model", tokenizer=None if is_clip else extra, merged_from=origin)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_dir(tmp, save_dir)


def _load_llm(base: str, adapter_dir: Path, kwargs: dict, trust_remote_code: bool, attn_implementation: str):
    from types import SimpleNamespace

    from llava_ft.model.llm import load_causal_lm, load_tokenizer

    model, _ = load_causal_lm(base, dtype=kwargs["dtype"], attn_implementation=attn_implementation,
                              device_map=kwargs.get("device_map"), trust_remote_code=trust_remote_code,
                              what="base model", verbose=False)
    tok_src = str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else base
    return model, load_tokenizer(SimpleNamespace(llm=tok_src, tokenizer=None, trust_remote_code=trust_remote_code))


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
