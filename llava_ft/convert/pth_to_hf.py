"""Export an `iter_N.pth` to Hugging Face formats (`llava_ft convert pth_to_hf`).

    pth_to_hf("cfg.yaml", "work_dirs/cfg/iter_500.pth", "out/hf")                    # XTuner-style
    pth_to_hf("cfg.yaml", "work_dirs/cfg/iter_500.pth", "out/llava", fmt="llava-hf")  # one merged folder

XTuner-style output (`fmt="xtuner"`), chosen by what the run trained (read from the config):
  text run, LoRA           -> a PEFT adapter folder (PeftModel.from_pretrained) + tokenizer
  text run, full training  -> a full HF model + tokenizer (sharded by `max_shard_size`)
  LLaVA run                -> projector/ (config + safetensors), llm_adapter/ (LLM LoRA) or llm/ (LLM trained
                              fully), visual_encoder_adapter/ (tower LoRA) or visual_encoder/ (tower trained
                              fully), config.yaml (the resolved config)
Every output holds `llava_ft.json` (template, system, image padding, resolved config): `llava_ft chat OUT`
and `load_chat_model(OUT)` need nothing else.

`fmt="llava-hf"` (LLaVA runs): the LLM is loaded unquantized (fp32, or bf16 where the run used it) even
when it trained in 4-bit, every LoRA is merged, and the result is saved as `LlavaForConditionalGeneration`
with its processor (image processor, tokenizer with `<image>` added, chat template from the run's
prompt template). The modules are moved, not copied, into transformers' Llava classes, so the weight
names on disk are whatever the installed transformers writes and reads back.

Layouts: llava_ft runs an InternLM2 LLM as Llama, so adapters target the Llama layout (q/k/v_proj, ...)
and `llava_ft.json` records it (`llm_layout: llama`); they load onto the InternLM2 base through llava_ft
(which converts it the same way), and an adapter for InternLM2's own layout is refused when loaded.
Full LLM weights are written in the Llama layout by default; `layout="internlm2"` writes them in
InternLM2's own names and config (base's auto_map files copied). llava-hf exports are always Llama.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Union

import torch

from llava_ft import IMAGE_TOKEN
from llava_ft.convert.chat_template import training_chat_template
from llava_ft.convert.model_card import write_model_card
from llava_ft.errors import UserError
from llava_ft.fileio import publish_dir, staging_dir
from llava_ft.inference.artifacts import write_meta

FORMATS = ("xtuner", "llava-hf")


def _load_config(config):
    from llava_ft.config import Config, load_config

    if config is None or isinstance(config, Config):
        return config
    return load_config(str(config))


def _meta(cfg, fmt: str, pth, step=None, layout: str = "llama") -> dict:
    from llava_ft.config import config_to_dict
    from llava_ft.convert.model_card import run_facts
    from llava_ft.model.internlm2_detect import is_internlm2

    meta = {"format": fmt, "template": cfg.data.template, "system": cfg.data.system,
            "pad_image_to_square": bool(cfg.data.pad_image_to_square), "source": str(pth), "step": step,
            "llm_layout": layout, "config": config_to_dict(cfg), "card": run_facts(cfg, pth, step)}
    if is_internlm2(cfg.model.llm):
        meta["llm_architecture"] = "internlm2"  # the base checkpoint's own architecture (run as Llama)
    return meta


def _check_layout(layout: str, cfg, fmt: str) -> None:
    from llava_ft.model.internlm2_detect import LAYOUTS, is_internlm2

    if layout not in LAYOUTS:
        raise UserError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "llama":
        return
    if fmt == "llava-hf":
        raise UserError("--format llava-hf is always written in the Llama layout (transformers' Llava classes "
                        "hold a transformers text model); drop --layout internlm2")
    if not is_internlm2(cfg.model.llm):
        raise UserError(f"--layout internlm2 needs an InternLM2 base; model.llm {cfg.model.llm} is not one")
    m = cfg.model
    if m.llm_lora.enabled or m.freeze_llm:
        raise UserError("--layout internlm2 applies to fully trained LLM weights; this run trained a LoRA adapter, "
                        "which targets the Llama layout: export it as is, then `llava_ft convert merge BASE "
                        "ADAPTER OUT --layout internlm2`")


def _save_full_llm(llm, out: Path, max_shard_size, layout: str, base: str) -> None:
    llm.save_pretrained(str(out), max_shard_size=max_shard_size)
    if layout == "internlm2":
        from llava_ft.model.internlm2_export import save_internlm2_layout

        save_internlm2_layout(out, base)


def _cast(module: torch.nn.Module, fp32: bool) -> None:
    if fp32:
        module.to(torch.float32)


def pth_to_hf(config, pth, save_dir, fmt: str = "xtuner", fp32: bool = False,
              max_shard_size: Union[str, int] = "2GB", layout: str = "llama") -> str:
    """Export `pth` (trained with `config`; None = the config saved in the checkpoint). Returns save_dir."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    cfg = _load_config(config)
    if fmt == "llava-hf":
        if layout != "llama":
            _check_layout(layout, cfg, fmt)
        return export_llava_hf(cfg, pth, save_dir, fp32=fp32, max_shard_size=max_shard_size)
    from llava_ft.checkpoint import load_iter_and_config
    from llava_ft.inference.loader import build_from_checkpoint

    _, meta, saved = load_iter_and_config(str(pth), need_config=cfg is None)
    cfg = cfg or saved
    _check_layout(layout, cfg, fmt)
    m = cfg.model
    llm_full = not m.freeze_llm and not m.llm_lora.enabled
    # Full weights are saved unquantized; adapters and projectors do not depend on the base's precision.
    model, tok, cfg = build_from_checkpoint(str(pth), cfg=cfg, quantization="none" if llm_full else None,
                                            dtype="fp32" if fp32 else None)
    tmp = staging_dir(save_dir)
    try:
        if not cfg.is_llava:
            _cast(model.llm, fp32)
            tok.chat_template = training_chat_template(tok, cfg.data.template, cfg.data.system)
            if m.llm_lora.enabled:
                model.llm.save_pretrained(str(tmp))
                tok.save_pretrained(str(tmp))
                _turn_end_config(model.llm, tok, cfg).save_pretrained(str(tmp))  # PEFT saves none
            elif llm_full:
                model.llm.generation_config = _turn_end_config(model.llm, tok, cfg)
                tok.save_pretrained(str(tmp))  # before: the InternLM2 layout replaces it with the base's files
                _save_full_llm(model.llm, tmp, max_shard_size, layout, m.llm)
            else:
                raise UserError(f"{pth}: the run trained nothing in the LLM (freeze_llm without LoRA); nothing to export")
            kind = "peft_adapter" if m.llm_lora.enabled else "hf_model"
            run_meta = _meta(cfg, kind, pth, meta.get("step"), layout)
            write_meta(tmp, run_meta)
            write_model_card(tmp, run_meta, kind, tokenizer=tok)
        else:
            _save_xtuner_llava(model, tok, cfg, tmp, fp32, max_shard_size, layout)
            run_meta = _meta(cfg, "xtuner", pth, meta.get("step"), layout)
            write_meta(tmp, run_meta)
            write_model_card(tmp, run_meta, "xtuner", tokenizer=tok if (tmp / "llm").is_dir() else None)
            from llava_ft.config import save_config

            save_config(cfg, tmp / "config.yaml")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_dir(tmp, save_dir)


def _save_xtuner_llava(model, tok, cfg, out: Path, fp32: bool, max_shard_size, layout: str = "llama") -> None:
    m = cfg.model
    projector = model.projector
    projector.save_pretrained(out / "projector",
                              state_dict={k: (v.float() if fp32 else v) for k, v in projector.state_dict().items()})
    if m.llm_lora.enabled:
        _cast(model.llm, fp32)
        model.llm.save_pretrained(str(out / "llm_adapter"))
        _turn_end_config(model.llm, tok, cfg).save_pretrained(str(out / "llm_adapter"))
    elif not m.freeze_llm:
        _cast(model.llm, fp32)
        tok.chat_template = training_chat_template(tok, cfg.data.template, cfg.data.system)
        model.llm.generation_config = _turn_end_config(model.llm, tok, cfg)
        tok.save_pretrained(str(out / "llm"))
        _save_full_llm(model.llm, out / "llm", max_shard_size, layout, m.llm)
    ve = model.visual_encoder
    if m.visual_encoder_lora.enabled:
        _cast(ve.model, fp32)
        ve.model.save_pretrained(str(out / "visual_encoder_adapter"))
    elif not m.freeze_visual_encoder:
        if ve.kind == "open_clip":
            raise UserError("a fully trained open_clip tower has no Hugging Face folder format; train it with "
                            "LoRA (model.visual_encoder_lora.enabled=true) to export an adapter")
        _cast(ve.model, fp32)
        ve.model.save_pretrained(str(out / "visual_encoder"), max_shard_size=max_shard_size)
        if ve.processor is not None and hasattr(ve.processor, "save_pretrained"):
            ve.processor.save_pretrained(str(out / "visual_encoder"))


def _turn_end_config(llm, tok, cfg):
    """The LLM's generation config with the run template's end-of-turn tokens as eos (convert/turn_end.py)."""
    from llava_ft.convert.turn_end import with_turn_end

    return with_turn_end(getattr(llm, "generation_config", None), tok, cfg.data.template)


def _merged(module):
    """The plain module under a PeftModel with LoRA merged into its weights (or the module itself)."""
    if hasattr(module, "merge_and_unload"):
        return module.merge_and_unload()
    return module


def add_image_token(tokenizer, llm) -> int:
    """Add `<image>` as a special token (resizing the embeddings only if its id has no row); returns its id."""
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = llm.get_input_embeddings().weight.shape[0]
    if image_id >= rows:
        # The row is never read (image features replace it) and generation suppresses the id.
        llm.resize_token_embeddings(image_id + 1, mean_resizing=True)
    return image_id


def export_llava_hf(cfg, pth, save_dir, fp32: bool = False, max_shard_size: Union[str, int] = "2GB") -> str:
    """Merge every LoRA of a LLaVA run and save one LlavaForConditionalGeneration folder + processor
    (LlavaNextForConditionalGeneration + LlavaNextProcessor for runs with model.image_aspect=anyres)."""
    from transformers import (GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaProcessor)

    from llava_ft.convert.chat_template import template_to_jinja
    from llava_ft.checkpoint import load_iter_and_config
    from llava_ft.inference.loader import build_from_checkpoint
    from llava_ft.templates import HF_TEMPLATE, get_template

    _, meta, saved = load_iter_and_config(str(pth), need_config=cfg is None)
    cfg = cfg or saved
    if not cfg.is_llava:
        raise UserError(f"--format llava-hf needs a LLaVA run (model.visual_encoder set); {pth} is a text run. "
                        "Use the default format, then `llava_ft convert merge` for a merged text model")
    if cfg.model.projector_depth != 2:
        raise UserError(f"--format llava-hf needs model.projector_depth=2 (transformers' LlavaMultiModalProjector is "
                        f"Linear-GELU-Linear); this run used {cfg.model.projector_depth}. Export the XTuner layout "
                        "instead (drop --format)")
    from llava_ft.model.vision import detect_kind

    # A run started from model.llava has a CLIP/SigLIP tower (checked when it loaded).
    kind = "llava" if cfg.model.llava else detect_kind(str(cfg.model.visual_encoder), cfg.model.visual_encoder_type)
    if kind == "open_clip":
        raise UserError(f"--format llava-hf: the vision tower {cfg.model.visual_encoder} is an OpenCLIP model, which "
                        "has no transformers equivalent for LlavaForConditionalGeneration. Export the XTuner layout "
                        "(drop --format) and load it with `llava_ft chat` / `load_chat_model`")
    # Unquantized base (even for a 4-bit run): LoRA merges into real weights, loaded fresh.
    model, tok, cfg = build_from_checkpoint(str(pth), cfg=cfg, quantization="none",
                                            dtype="fp32" if fp32 else None)
    llm = _merged(model.llm)
    ve = model.visual_encoder
    kind = ve.kind
    vision = _merged(ve.model)
    image_id = add_image_token(tok, llm)
    strategy = "default" if kind == "clip" else "full"
    anyres = getattr(ve, "anyres", None)
    config_cls, model_cls = (LlavaNextConfig, LlavaNextForConditionalGeneration) if anyres else \
        (LlavaConfig, LlavaForConditionalGeneration)
    extra = {"image_grid_pinpoints": anyres.pinpoints} if anyres else {}
    config = config_cls(
        vision_config=vision.config.to_dict(), text_config=llm.config.to_dict(), image_token_index=image_id,
        image_seq_length=ve.num_image_tokens, projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy, vision_feature_layer=int(ve.select_layer),
        multimodal_projector_bias=True, tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
        **extra,
    )
    with torch.device("meta"):
        hf = model_cls(config)
    # Move the trained modules in (no copies): the decoder, the head, the tower and the projector's Linears.
    hf.model.language_model = llm.get_decoder()
    hf.lm_head = llm.get_output_embeddings()
    hf.model.vision_tower = vision
    hf.model.multi_modal_projector.linear_1 = model.projector.layers[0]
    hf.model.multi_modal_projector.linear_2 = model.projector.layers[2]
    hf.model.multi_modal_projector.act = model.projector.layers[1]
    if anyres:
        hf.model.image_newline = model.projector.image_newline
    hf.config.text_config.vocab_size = llm.get_input_embeddings().weight.shape[0]
    if fp32:
        hf.to(torch.float32)
    hf.to(llm.get_input_embeddings().weight.dtype)
    gen = _turn_end_config(llm, tok, cfg).to_dict()  # eos: the template's end-of-turn tokens too
    gen = {k: v for k, v in gen.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id") and v is not None}
    hf.generation_config = GenerationConfig(**gen, suppress_tokens=[image_id])

    template = cfg.data.template
    jinja = tok.chat_template if template == HF_TEMPLATE else template_to_jinja(get_template(template), cfg.data.system)
    tok.chat_template = jinja
    if ve.processor is None or not hasattr(ve.processor, "save_pretrained"):
        raise UserError(f"the vision tower {cfg.model.visual_encoder} has no Hugging Face image processor to save")
    processor_cls = LlavaNextProcessor if anyres else LlavaProcessor
    processor = processor_cls(
        image_processor=anyres.processor if anyres else _llava_image_processor(ve, cfg), tokenizer=tok,
        patch_size=vision.config.patch_size,
        vision_feature_select_strategy=strategy, chat_template=jinja, image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1 if kind == "clip" else 0,
    )
    tmp = staging_dir(save_dir)
    try:
        hf.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        processor.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        run_meta = _meta(cfg, "llava-hf", pth, meta.get("step"))
        write_meta(tmp, run_meta)
        write_model_card(tmp, run_meta, "llava-hf", tokenizer=tok)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_dir(tmp, save_dir)


def _llava_image_processor(ve, cfg):
    """The tower's image processor, or — for runs trained with `data.pad_image_to_square` — transformers'
    LlavaImageProcessor with do_pad, which pads to square with the image mean before the tower's own
    resize (and CLIP's crop), as training did; without it plain transformers users would feed unpadded
    images (cropped by CLIP, squashed by SigLIP)."""
    if not cfg.data.pad_image_to_square:
        return ve.processor
    from transformers import LlavaImageProcessor

    settings = ve.processor.to_dict()
    keep = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb")
    kwargs = {k: settings[k] for k in keep if k in settings}
    kwargs.setdefault("do_center_crop", False)  # SigLIP has no crop; LlavaImageProcessor would default to one
    return LlavaImageProcessor(**kwargs, do_pad=True)

