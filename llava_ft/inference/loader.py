"""load_chat_model: load any trained artifact into a ChatModel (used by chat, eval and serve).

    cm = load_chat_model("work_dirs/run")                        # newest iter_N.pth of a run (text or LLaVA)
    cm = load_chat_model("work_dirs/run/iter_500.pth")
    cm = load_chat_model("out/merged", prompt_template="qwen_chat")    # merged / plain HF causal LM
    cm = load_chat_model("Qwen/Qwen2-0.5B", adapter="out/hf")          # base + PEFT adapter
    cm = load_chat_model("out/hf")                               # a PEFT adapter folder alone (base from it)
    cm = load_chat_model("LLM", llava="out/xtuner", visual_encoder="VE")   # XTuner layout
    cm = load_chat_model("out/xtuner")                           # same, LLM/VE read from the saved config
    cm = load_chat_model("out/llava_hf")                         # LlavaForConditionalGeneration export

The artifact type comes from saved files (`artifacts.detect_artifact`), never from names. The prompt
template and system prompt come from the argument, else from what the run used (`llava_ft.json` or the
checkpoint's config), else the tokenizer's own chat template (`hf`); with none of these, UserError.
`attn_implementation` and `trust_remote_code` likewise: the argument, else what the run recorded, else
auto / false. An InternLM2 LLM loads as Llama (see `llava_ft.model.llm`); a PEFT adapter written for
InternLM2's own layout is refused with a UserError (llava_ft's models are always in the Llama layout).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import torch

from llava_ft.errors import UserError
from llava_ft.inference.artifacts import detect_artifact, model_type_of, read_meta
from llava_ft.inference.chat_model import ChatModel
from llava_ft.model import devices

_DTYPE_NAMES = {"auto": "auto", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
                "half": "fp16", "fp32": "fp32", "float32": "fp32", "float": "fp32"}


def _dtype_name(torch_dtype) -> str:
    if isinstance(torch_dtype, torch.dtype):
        torch_dtype = str(torch_dtype).replace("torch.", "")
    key = str(torch_dtype or "auto").lower()
    if key not in _DTYPE_NAMES:
        raise UserError(f"torch_dtype {torch_dtype!r} is not one of {', '.join(sorted(set(_DTYPE_NAMES)))}")
    return _DTYPE_NAMES[key]


def _quantization(bits) -> str:
    if bits in (None, "", 0, "none"):
        return "none"
    if int(bits) in (4, 8):
        return f"{int(bits)}bit"
    raise UserError(f"bits must be 4 or 8 (or omitted for full precision), got {bits!r}")


def _model_cfg(**fields):
    from llava_ft.config import ModelConfig

    return ModelConfig(**fields)


def recorded_model_settings(meta: dict, attn_implementation: Optional[str] = None,
                            trust_remote_code: Optional[bool] = None) -> dict:
    """attn_implementation / trust_remote_code: the arguments, else the run's (llava_ft.json `config`),
    else auto / false -- so chat, eval, serve and merge load the model the way training did."""
    run_model = ((meta or {}).get("config") or {}).get("model") or {}
    return {"attn_implementation": attn_implementation or run_model.get("attn_implementation") or "auto",
            "trust_remote_code": bool(run_model.get("trust_remote_code", False)
                                      if trust_remote_code is None else trust_remote_code)}


def _load_text_llm(path: str, adapter: Optional[str], quantization: str, dtype: str, device: str,
                   settings: Optional[dict] = None):
    """(model, tokenizer) of an HF causal LM, with a PEFT adapter applied (not merged) when given."""
    from llava_ft.model.llm import load_llm

    cfg = _model_cfg(llm=str(path), dtype=dtype, quantization=quantization, **(settings or {}))
    llm, tok = load_llm(cfg, device_map=devices.device_map(device, quantization), for_training=False, verbose=False)
    if adapter:
        llm = _apply_adapter(llm, adapter, str(path))
    return llm, tok


def _apply_adapter(model, adapter: str, base: str = "the base model"):
    from peft import PeftModel

    from llava_ft.model.internlm2_detect import check_adapter_layout
    from llava_ft.model.llm import peft_quiet

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"adapter {adapter}: no adapter_config.json; give a PEFT adapter folder "
                        "(e.g. what `llava_ft convert pth_to_hf` wrote)")
    check_adapter_layout(adapter, base)
    with peft_quiet():
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model


def _template_from(prompt_template, meta: dict, cfg_data: Optional[dict], tokenizer, source: str):
    from llava_ft.templates import HF_TEMPLATE, get_template

    name = prompt_template or meta.get("template") or (cfg_data or {}).get("template")
    if not name:
        if getattr(tokenizer, "chat_template", None):
            name = HF_TEMPLATE
        else:
            raise UserError(f"{source}: no prompt template recorded and the tokenizer has no chat_template; "
                            "pass --prompt-template NAME (see llava_ft.templates, e.g. qwen_chat)")
    return name if name == HF_TEMPLATE else get_template(name)


def load_chat_model(model, adapter=None, llava=None, visual_encoder=None, bits=None, torch_dtype="auto",
                    prompt_template=None, device="auto", system=None, attn_implementation=None,
                    trust_remote_code=None) -> ChatModel:
    """Load `model` (see module docstring) and return a ChatModel ready to answer."""
    dtype = _dtype_name(torch_dtype)
    quant = _quantization(bits)
    model = str(model)
    override = {"attn_implementation": attn_implementation, "trust_remote_code": trust_remote_code}
    if llava:
        return _load_xtuner_llava(str(llava), llm=model, visual_encoder=visual_encoder, adapter=adapter,
                                  quant=quant, dtype=dtype, device=device, prompt_template=prompt_template,
                                  system=system, override=override)
    art = detect_artifact(model)
    if art.kind == "iter_pth":
        return _load_iter_pth(art.path, quant, dtype, device, prompt_template, system, adapter, override)
    if art.kind == "llava_hf":
        return _load_llava_hf(art.path, quant, dtype, device, prompt_template, system,
                              recorded_model_settings(read_meta(art.path), **override))
    if art.kind == "xtuner_llava":
        return _load_xtuner_llava(art.path, llm=None, visual_encoder=visual_encoder, adapter=adapter,
                                  quant=quant, dtype=dtype, device=device, prompt_template=prompt_template,
                                  system=system, override=override)
    if art.kind == "peft_adapter":
        if adapter:
            raise UserError(f"{model} is itself a PEFT adapter; pass the base model as MODEL and this as --adapter")
        base = json.loads((Path(art.path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise UserError(f"{art.path}/adapter_config.json names no base model; pass it: MODEL=BASE --adapter {model}")
        meta = read_meta(art.path)
        llm, tok = _load_text_llm(base, art.path, quant, dtype, device, recorded_model_settings(meta, **override))
        return _text_chat_model(llm, tok, meta, None, prompt_template, system, art.path)
    # hf_model: a plain or merged causal LM (+ optional adapter)
    meta = read_meta(art.path)
    if adapter:
        meta = {**meta, **read_meta(adapter)}
    llm, tok = _load_text_llm(art.path, adapter, quant, dtype, device, recorded_model_settings(meta, **override))
    return _text_chat_model(llm, tok, meta, None, prompt_template, system, art.path)


def _text_chat_model(llm, tok, meta: dict, cfg_data, prompt_template, system, source: str) -> ChatModel:
    from llava_ft.model.llava import LlavaFtModel

    llm.eval()
    wrapped = LlavaFtModel(llm)
    template = _template_from(prompt_template, meta, cfg_data, tok, source)
    return ChatModel(wrapped, tok, template, system=system if system is not None else
                     (meta.get("system") or (cfg_data or {}).get("system")), source=source)


def chat_model_for_run(model, tokenizer, cfg, source: str = "evaluation") -> ChatModel:
    """A ChatModel over an in-memory LlavaFtModel built from `cfg` (the model being trained: the
    evaluation prompts during training), prompting and preprocessing images as that run's data does."""
    data = {"template": cfg.data.template, "system": cfg.data.system,
            "pad_image_to_square": cfg.data.pad_image_to_square}
    if model.visual_encoder is not None:
        return _vision_chat_model(model, tokenizer, {}, data, None, None, source)
    return ChatModel(model, tokenizer, _template_from(None, {}, data, tokenizer, source), system=cfg.data.system,
                     source=source)


def _vision_chat_model(model, tok, meta: dict, cfg_data, prompt_template, system, source: str) -> ChatModel:
    """ChatModel over a LlavaFtModel with a vision tower (iter_N.pth and XTuner layout)."""
    model.eval()
    ve = model.visual_encoder
    template = _template_from(prompt_template, meta, cfg_data, tok, source)
    pad = meta.get("pad_image_to_square", (cfg_data or {}).get("pad_image_to_square", False))
    return ChatModel(model, tok, template,
                     system=system if system is not None else (meta.get("system") or (cfg_data or {}).get("system")),
                     image_processor=ve.preprocess, image_mean=ve.image_mean, pad_image_to_square=bool(pad),
                     num_image_tokens=ve.num_image_tokens, source=source, anyres=getattr(ve, "anyres", None))


def build_from_checkpoint(path: str, quantization: Optional[str] = None, dtype: Optional[str] = None,
                          device_map=None, cfg=None, attn_implementation: Optional[str] = None,
                          trust_remote_code: Optional[bool] = None):
    """Rebuild the run's LlavaFtModel from an iter_N.pth and load its trained weights -> (model, tok, cfg).

    `cfg` replaces the config saved in the checkpoint; `quantization` / `dtype` override the run's (e.g. load a QLoRA run's LLM in fp32 for export).
    The run's `pretrained_pth` is not re-read: the checkpoint already holds every trained weight.
    """
    from llava_ft.checkpoint import load_iter_and_config
    from llava_ft.model.builder import build_model

    state_dict, meta, saved_cfg = load_iter_and_config(path, need_config=cfg is None)
    cfg = copy.deepcopy(cfg if cfg is not None else saved_cfg)  # `cfg`: e.g. the CONFIG given to pth_to_hf
    cfg.model.pretrained_pth = None
    if quantization is not None:
        cfg.model.quantization = quantization
    if dtype is not None:
        cfg.model.dtype = dtype
    if attn_implementation is not None:
        cfg.model.attn_implementation = attn_implementation
    if trust_remote_code is not None:
        cfg.model.trust_remote_code = bool(trust_remote_code)
    if cfg.model.quantization != "none" and not cfg.model.llm_lora.enabled and not cfg.model.freeze_llm:
        cfg.model.freeze_llm = True
    model, tok = build_model(cfg, for_training=False)
    # for_training=False freezes everything but LoRA, so strict=True checks every LoRA weight is present;
    # the projector (frozen here) is checked by hand: a LLaVA checkpoint without it is not a usable run.
    model.load_trainable_state_dict(state_dict, strict=True, source=str(path))
    if model.projector is not None:
        missing = [f"projector.{k}" for k in model.projector.state_dict() if f"projector.{k}" not in state_dict]
        if missing:
            raise UserError(f"{path}: no projector weights ({', '.join(missing[:4])}); is it from this LLaVA run?")
    if device_map is not None and cfg.model.quantization == "none":
        model.to(next(iter(device_map.values())))
    model.eval()
    return model, tok, cfg


def _load_iter_pth(path, quant, dtype, device, prompt_template, system, adapter, override) -> ChatModel:
    if adapter:
        raise UserError(f"{path} is a training checkpoint; --adapter applies to Hugging Face base models only")
    model, tok, cfg = build_from_checkpoint(
        path, quantization=None if quant == "none" else quant, dtype=None if dtype == "auto" else dtype,
        device_map=devices.device_map(device, quant), **override)
    data = {"template": cfg.data.template, "system": cfg.data.system,
            "pad_image_to_square": cfg.data.pad_image_to_square}
    if model.visual_encoder is None:
        return _text_chat_model(model.llm, tok, {}, data, prompt_template, system, path)
    return _vision_chat_model(model, tok, {}, data, prompt_template, system, path)


def _load_xtuner_llava(folder, llm, visual_encoder, adapter, quant, dtype, device, prompt_template,
                       system, override=None) -> ChatModel:
    """LLaVA from XTuner's layout: projector/ + llm_adapter/ | llm/ + visual_encoder_adapter/ | visual_encoder/."""
    from llava_ft.model.llava import LlavaFtModel
    from llava_ft.model.llm import resolve_dtype
    from llava_ft.model.projector import Projector
    from llava_ft.model.vision import load_visual_encoder

    root = Path(folder)
    if not (root / "projector").is_dir():
        raise UserError(f"--llava {folder}: no projector/ folder; give the output of `llava_ft convert pth_to_hf`")
    meta = read_meta(root)
    run_model = (meta.get("config") or {}).get("model", {})
    llm_path = str(root / "llm") if (root / "llm").is_dir() else (llm or run_model.get("llm"))
    if not llm_path:
        raise UserError(f"{folder}: the LLM is not recorded; pass it as MODEL (llava_ft chat LLM --llava {folder})")
    ve_path = (str(root / "visual_encoder") if (root / "visual_encoder").is_dir()
               else (visual_encoder or run_model.get("visual_encoder")))
    if not ve_path:
        raise UserError(f"{folder}: the visual encoder is not recorded; pass --visual-encoder")
    llm_adapter = adapter or (str(root / "llm_adapter") if (root / "llm_adapter").is_dir() else None)
    llm_model, tok = _load_text_llm(llm_path, llm_adapter, quant, dtype, device,
                                    recorded_model_settings(meta, **(override or {})))
    compute = resolve_dtype(dtype)
    ve_cfg = _model_cfg(visual_encoder=ve_path,
                        visual_encoder_type=run_model.get("visual_encoder_type", "auto"),
                        open_clip_pretrained=run_model.get("open_clip_pretrained"),
                        visual_select_layer=run_model.get("visual_select_layer", -2),
                        image_aspect=run_model.get("image_aspect", "pad"),
                        image_grid_pinpoints=run_model.get("image_grid_pinpoints"),
                        max_image_tiles=run_model.get("max_image_tiles"))
    ve = load_visual_encoder(ve_cfg, dtype=compute)
    if (root / "visual_encoder_adapter").is_dir():
        from peft import PeftModel

        from llava_ft.model.llm import peft_quiet

        with peft_quiet():
            ve.model = PeftModel.from_pretrained(ve.model, str(root / "visual_encoder_adapter"))
    projector = Projector.from_pretrained(root / "projector").to(compute)
    model = LlavaFtModel(llm_model, ve, projector)
    data = (meta.get("config") or {}).get("data")
    return _vision_chat_model(model, tok, meta, data, prompt_template, system, str(root))


def _load_llava_hf(folder, quant, dtype, device, prompt_template, system, settings=None) -> ChatModel:
    """A LlavaForConditionalGeneration folder (our `--format llava-hf` export or any llava-hf model), or a
    LlavaNextForConditionalGeneration one (an AnyRes run's export, or any llava-v1.6 model)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from llava_ft.model.llm import _quantization_config, resolve_dtype

    compute = resolve_dtype(dtype)
    kwargs = {"dtype": compute}
    if settings and settings["attn_implementation"] != "auto":
        kwargs["attn_implementation"] = settings["attn_implementation"]
    qcfg = _quantization_config(quant, compute)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    dmap = devices.device_map(device, quant)
    if dmap is not None:
        kwargs["device_map"] = dmap
    try:
        model_type = model_type_of(Path(folder))
        onevision = model_type == "llava_onevision"
        next_ = model_type == "llava_next" or onevision
        if onevision:  # a released LLaVA-OneVision, or the export of a run that started from one
            from transformers import LlavaOnevisionForConditionalGeneration as model_cls
        else:
            model_cls = LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration
        model = model_cls.from_pretrained(folder, **kwargs)
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise UserError(f"{folder}: cannot load as a llava-hf model ({str(err).splitlines()[0]})") from None
    model.eval()
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    meta = read_meta(folder)
    ip = processor.image_processor
    cfg = model.config
    vc = cfg.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    if str(vc.model_type).startswith("clip"):
        n += 1  # CLIP's CLS token
    if cfg.vision_feature_select_strategy == "default":
        n -= 1  # "default" drops the first token (CLS)
    template = _template_from(prompt_template, meta, None, tok, folder)

    def preprocess(image):
        return ip(images=image, return_tensors="pt")["pixel_values"][0]

    mean = tuple(round(v * 255) for v in (ip.image_mean or (0, 0, 0)))
    anyres = None
    if onevision:  # OneVision's own rules (anyres_max_N, single views for several images)
        from llava_ft.model.released_anyres import ReleasedAnyResSpec

        max_tiles = int(str(cfg.vision_aspect_ratio).rsplit("_", 1)[-1])
        # Clips: the export's video processor, and the run's data.video_frames (8, OneVision's training
        # default, for a released folder we did not write).
        frames = ((meta.get("config") or {}).get("data") or {}).get("video_frames") or 8
        anyres = ReleasedAnyResSpec(ip, cfg.image_grid_pinpoints, n, max_tiles_before_shrink=max_tiles,
                                    single_view_for_multi_image=True,
                                    video_processor=getattr(processor, "video_processor", None),
                                    video_frames=int(frames))
    elif next_:
        from llava_ft.model.anyres import AnyResSpec

        anyres = AnyResSpec(ip, cfg.image_grid_pinpoints, n)
    return ChatModel(model, tok, template, system=system if system is not None else meta.get("system"),
                     image_processor=preprocess, image_mean=mean,
                     pad_image_to_square=bool(meta.get("pad_image_to_square", False)),
                     num_image_tokens=n, hf_llava=True, source=folder, anyres=anyres)

