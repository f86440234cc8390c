"""Continue from a released LLaVA: read a LlavaForConditionalGeneration checkpoint into llava_ft's parts.

    model:
      llava: llava-hf/llava-1.5-7b-hf        # or a folder, e.g. llava_ft's own `convert --format llava-hf` output
      quantization: 4bit
      llm_lora: {enabled: true, r: 128, alpha: 256}

`build_model` calls `load_released_llava(cfg, for_training)` instead of loading `model.llm` and
`model.visual_encoder`: the LLM (through `load_llm`, so dtype, 4/8-bit quantization, attention and
k-bit training preparation work as for any LLM), the vision tower (CLIP or SigLIP) with the checkpoint's
image processor, the projector's weights, and the tokenizer (with its `<image>` token) all come from the
one checkpoint. Processor settings follow the checkpoint: `vision_feature_layer` becomes the tower's
feature layer, `vision_feature_select_strategy` must match the tower (CLIP drops its CLS token =
`default`, SigLIP keeps every patch = `full`, as llava_ft towers do), and a LlavaImageProcessor with
`do_pad` keeps padding images to square. The weights are read with transformers' `key_mapping`, which
accepts both the current layout (`model.language_model.*`, `model.vision_tower.*`) and the older one of
the Hub's llava-hf checkpoints (`language_model.model.*`, `vision_tower.*`). `--format llava-hf` then
exports the finetuned model back to the same format.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from llava_ft.errors import UserError

# Checkpoint key -> key of a standalone causal LM / vision model (regexes, for from_pretrained's key_mapping).
_LLM_KEYS = {r"^model\.language_model\.": "model.", r"^language_model\.model\.": "model.",
             r"^language_model\.lm_head\.": "lm_head."}
_VISION_KEYS = {r"^model\.vision_tower\.": "", r"^vision_tower\.": ""}
_PROJECTOR = {"linear_1": "layers.0", "linear_2": "layers.2"}
_STRATEGY = {"clip": "default", "siglip": "full"}  # what llava_ft's towers do (vision.py)
_NEWLINE_KEYS = ("image_newline", "model.image_newline")  # old / current transformers names
# model_type -> the transformers class a checkpoint of it is (and is exported back to).
CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
           "llava_onevision": "LlavaOnevisionForConditionalGeneration"}


@dataclass
class ReleasedLlava:
    llm: Any
    tokenizer: Any
    visual_encoder: Any
    projector_state: dict  # Projector state dict (layers.0.*, layers.2.*)
    folder: str


def resolve_folder(name: str) -> str:
    """A local folder for `model.llava` (a hub id is fetched, or read from the local cache when offline)."""
    from llava_ft.model.llm import check_model_source

    source = check_model_source(str(name), "model.llava")
    if Path(source).is_dir():
        return source
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                         "*.tiktoken"])
    except Exception as err:  # offline without a cached copy, unknown id, no permission, ...
        raise UserError(f"model.llava={name!r}: cannot fetch it from the Hub and no cached copy exists "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def _llava_config(folder: str, name: str):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise UserError(f"model.llava={name!r}: cannot read its config.json ({str(err).splitlines()[0]})") from None
    if config.model_type not in CLASSES:
        raise UserError(f"model.llava={name!r}: config.json model_type is {config.model_type!r}, not one of "
                        f"{', '.join(CLASSES)}; give a LlavaForConditionalGeneration, LlavaNextForConditionalGeneration "
                        "or LlavaOnevisionForConditionalGeneration checkpoint (e.g. llava-hf/llava-1.5-7b-hf, "
                        "llava-hf/llava-v1.6-mistral-7b-hf, llava-hf/llava-onevision-qwen2-0.5b-ov-hf, or the output "
                        "of `llava_ft convert pth_to_hf ... --format llava-hf`)")
    return config


def _projector_state(folder: str, name: str, config) -> dict:
    """The projector's Linear weights, read from the checkpoint's safetensors files (they are small)."""
    from safetensors import safe_open

    if config.projector_hidden_act != "gelu":
        raise UserError(f"model.llava={name!r}: projector activation {config.projector_hidden_act!r}; llava_ft's "
                        "projector is Linear-GELU-Linear")
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UserError(f"model.llava={name!r}: no .safetensors weights in {folder}; re-save the checkpoint with "
                        "save_pretrained (safetensors is the default)")
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                parts = key.split(".")
                if "multi_modal_projector" in parts and parts[-2] in _PROJECTOR:
                    state[f"{_PROJECTOR[parts[-2]]}.{parts[-1]}"] = f.get_tensor(key)
                elif key in _NEWLINE_KEYS:
                    state["image_newline"] = f.get_tensor(key)
    if config.model_type != "llava" and "image_newline" not in state:
        raise UserError(f"model.llava={name!r}: a {CLASSES[config.model_type]} checkpoint without image_newline "
                        f"weights in {folder}")
    for layer in _PROJECTOR.values():
        if f"{layer}.weight" not in state:
            raise UserError(f"model.llava={name!r}: no multi_modal_projector weights found in {folder}")
        if f"{layer}.bias" not in state:  # multimodal_projector_bias=False: a zero bias is the same map
            weight = state[f"{layer}.weight"]
            state[f"{layer}.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return state


def _vision(folder: str, name: str, config, dtype, video_frames: int = 8):
    from transformers import AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

    from llava_ft.model.vision import HF_TYPES, wrap_hf_tower

    kind = HF_TYPES.get(config.vision_config.model_type)
    if kind is None:
        raise UserError(f"model.llava={name!r}: vision tower type {config.vision_config.model_type!r} is not supported "
                        f"(supported: {', '.join(sorted(HF_TYPES))})")
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise UserError(f"model.llava={name!r}: vision_feature_layer {layer} concatenates several layers; llava_ft "
                        "towers use one layer")
    if config.vision_feature_select_strategy != _STRATEGY[kind]:
        raise UserError(f"model.llava={name!r}: a {kind} tower with vision_feature_select_strategy="
                        f"{config.vision_feature_select_strategy!r} is not supported (llava_ft uses "
                        f"{_STRATEGY[kind]!r} for {kind})")
    cls = CLIPVisionModel if kind == "clip" else SiglipVisionModel
    try:
        model = cls.from_pretrained(folder, config=config.vision_config, key_mapping=_VISION_KEYS,
                                    **({"dtype": dtype} if dtype is not None else {}))
        processor = AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise UserError(f"model.llava={name!r}: cannot load its vision tower ({str(err).splitlines()[0]})") from None
    ve = wrap_hf_tower(model, processor, kind, layer, f"{name} (vision tower)")
    if config.model_type != "llava":
        _attach_anyres(ve, config, processor, name, folder, video_frames)
    return ve


def _attach_anyres(ve, config, processor, name: str, folder: str, video_frames: int) -> None:
    """LlavaNext / LlavaOnevision: tile images with the checkpoint's own image processor and pinpoints
    (llava_ft.model.released_anyres); the plain view (the collator's dummy image) is the processor's
    overview of the image."""
    from llava_ft.model.released_anyres import ReleasedAnyResSpec

    max_tiles = None
    if config.model_type == "llava_onevision":
        ratio = str(getattr(config, "vision_aspect_ratio", "anyres_max_9"))
        if not ratio.startswith("anyres_max_") or not ratio[len("anyres_max_"):].isdigit():
            raise UserError(f"model.llava={name!r}: vision_aspect_ratio {ratio!r} is not anyres_max_<N> (the only "
                            "kind transformers' LlavaOnevision implements)")
        max_tiles = int(ratio[len("anyres_max_"):])
    pinpoints = config.image_grid_pinpoints or processor.image_grid_pinpoints
    video_processor = None
    if config.model_type == "llava_onevision":
        from transformers import AutoVideoProcessor

        try:
            video_processor = AutoVideoProcessor.from_pretrained(folder)
        except (OSError, ValueError):  # a checkpoint saved without one: images only (a clip then says so)
            video_processor = None
    ve.anyres = ReleasedAnyResSpec(processor, pinpoints, ve.num_image_tokens, max_tiles_before_shrink=max_tiles,
                                   single_view_for_multi_image=config.model_type == "llava_onevision",
                                   video_processor=video_processor, video_frames=video_frames)
    ve._preprocess_fn = ve.anyres.overview


class _DropUnexpectedOnly:
    """Logging filter: drop transformers' load report when it lists only UNEXPECTED keys. Reading the LLM
    out of a LLaVA checkpoint leaves the tower and projector keys unused (and the other way round) by
    design; a report with MISSING or MISMATCH keys (weights left uninitialised) still shows."""

    def filter(self, record) -> bool:
        text = record.getMessage()
        return "UNEXPECTED" not in text or "MISSING" in text or "MISMATCH" in text


@contextmanager
def _quiet_unused_keys():
    import logging

    logger = logging.getLogger("transformers.modeling_utils")
    flt = _DropUnexpectedOnly()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def load_released_llava(cfg, for_training: bool = True) -> ReleasedLlava:
    """LLM, tokenizer, VisualEncoder and projector weights of `cfg.model.llava` (see module docstring)."""
    from llava_ft.model.llm import load_llm, resolve_dtype

    m = cfg.model
    folder = resolve_folder(m.llava)
    config = _llava_config(folder, m.llava)
    verbose = _is_main()
    vc, tc = config.vision_config, config.text_config
    if verbose:
        grid = vc.image_size // vc.patch_size
        from llava_ft.model.vision import HF_TYPES

        print(f"[llava_ft] model.llava {m.llava}: {CLASSES[config.model_type]} -> LLM {tc.model_type} "
              f"({tc.num_hidden_layers} layers), {HF_TYPES.get(vc.model_type, vc.model_type)} tower (feature layer {config.vision_feature_layer}, "
              f"{config.vision_feature_select_strategy}: {grid * grid} tokens per image), projector "
              f"{vc.hidden_size}->{tc.hidden_size} gelu, tokenizer with <image>, image processor", flush=True)
        replaced = [f"model.{k}={getattr(m, k)}" for k in ("llm", "visual_encoder") if getattr(m, k)]
        if m.visual_select_layer != config.vision_feature_layer:
            replaced.append(f"model.visual_select_layer={m.visual_select_layer}")
        if replaced:
            print(f"[llava_ft] model.llava replaces {', '.join(replaced)} (not used)", flush=True)
    if config.model_type != "llava":  # NeXT / OneVision carry their prompt format as a chat template
        _check_template(cfg, folder)
    # The LLM goes through load_llm like any other (quantization, dtype, attention, k-bit prep); only its
    # weights are read out of the LLaVA checkpoint under the text config.
    llm_cfg = replace(m, llm=folder, tokenizer=m.tokenizer or folder)
    with _quiet_unused_keys():
        llm, tokenizer = load_llm(llm_cfg, for_training=for_training, verbose=verbose,
                                  load_kwargs={"config": tc, "key_mapping": _LLM_KEYS})
        visual_encoder = _vision(folder, m.llava, config, resolve_dtype(m.dtype), cfg.data.video_frames)
    projector_state = _projector_state(folder, m.llava, config)

    # (NeXT / OneVision processors' do_pad pads a batch's tile counts, not images to square)
    if verbose and config.model_type == "llava" and getattr(visual_encoder.processor, "do_pad", False):
        print("[llava_ft] model.llava: its image processor pads images to square (kept)", flush=True)
    elif verbose and config.model_type != "llava":
        spec = visual_encoder.anyres
        extra = (f", anyres_max_{spec.max_tiles}, several images = one view each, videos of "
                 f"{spec.video_frames} frames" if spec.single_view_for_multi_image else "")
        print(f"[llava_ft] model.llava: AnyRes with the checkpoint's image processor and {len(spec.pinpoints)} "
              f"grid pinpoints{extra}", flush=True)
    return ReleasedLlava(llm, tokenizer, visual_encoder, projector_state, folder)


def _check_template(cfg, folder: str) -> None:
    """Refuse (before the LLM loads) a data.template that trains another prompt format than the checkpoint's."""
    from llava_ft.data.checkpoint_template import template_mismatch
    from llava_ft.model.llm import load_tokenizer

    m = cfg.model
    tokenizer = load_tokenizer(replace(m, llm=folder, tokenizer=m.tokenizer or folder))
    problem = template_mismatch(cfg.data.template, cfg.data.system, tokenizer)
    if problem:
        raise UserError(f"model.llava={m.llava!r}: {problem}")


def load_released_tokenizer_and_tower(cfg):
    """(tokenizer, VisualEncoder) of `cfg.model.llava` without its LLM: what data preparation needs (the
    tokenizer and the per-image token count), e.g. for `llava_ft log-dataset`."""
    from llava_ft.model.llm import load_tokenizer, resolve_dtype

    m = cfg.model
    folder = resolve_folder(m.llava)
    config = _llava_config(folder, m.llava)
    tokenizer = load_tokenizer(replace(m, llm=folder, tokenizer=m.tokenizer or folder))
    with _quiet_unused_keys():
        tower = _vision(folder, m.llava, config, resolve_dtype(m.dtype), cfg.data.video_frames)
    return tokenizer, tower


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0
