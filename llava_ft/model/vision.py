"""Vision towers for LLaVA: HF CLIP / SigLIP and OpenCLIP, behind one `VisualEncoder` interface.

    ve = load_visual_encoder(cfg.model)           # reads model.visual_encoder / visual_encoder_type / ...
    feats = ve(pixel_values)                      # [n_images, ve.num_image_tokens, ve.hidden_size]
    pixel = ve.preprocess(pil_rgb_image)          # [3, H, W] with the tower's own preprocessing
    ve.image_mean                                  # 0-255 RGB tuple, the pad-to-square colour
    ve.image_shape                                 # (3, H, W) of preprocess output
    ve = apply_vision_lora(ve, cfg.model.visual_encoder_lora)   # LoRA on the tower's Linear layers

Which kind a tower is comes from what was saved, never from its name (LLaVA #1021): a local folder's
config.json `model_type` (clip / clip_vision_model -> CLIP; siglip / siglip_vision_model -> SigLIP),
an `open_clip_config.json` -> OpenCLIP; otherwise a name open_clip lists (e.g. `ViT-L-14`) or an
`hf-hub:` / `local-dir:` open_clip reference -> OpenCLIP; otherwise the hub config's model_type.

Features are the hidden states of layer `visual_select_layer` (HF indexing: 0 = embeddings, -1 = last
block, default -2). CLIP drops its CLS token (576 tokens at 336 px / patch 14); SigLIP has none and
keeps every patch; OpenCLIP ViTs drop their class token like CLIP.
The wrapped model is `self.model` (a CLIPVisionModel / SiglipVisionModel, or open_clip's `.visual`;
a PeftModel around it after `apply_vision_lora`, whose `save_pretrained` writes a PEFT adapter).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from llava_ft.errors import UserError

log = logging.getLogger(__name__)

HF_TYPES = {
    "clip": "clip", "clip_vision_model": "clip",
    "siglip": "siglip", "siglip_vision_model": "siglip",
}


class VisualEncoder(nn.Module):
    """A vision tower returning patch features of one layer. Build with `load_visual_encoder`."""

    def __init__(self, model: nn.Module, kind: str, select_layer: int, hidden_size: int,
                 num_image_tokens: int, image_mean: tuple, preprocess_fn: Callable, name: str,
                 processor: Any = None):
        super().__init__()
        self.model = model
        self.kind = kind
        self.select_layer = int(select_layer)
        self.hidden_size = int(hidden_size)
        self.num_image_tokens = int(num_image_tokens)
        self.image_mean = tuple(int(v) for v in image_mean)
        self.name = name
        # HF image processor (saved beside exports) or open_clip transform; not an nn.Module.
        self.processor = processor
        self._preprocess_fn = preprocess_fn

    @property
    def image_shape(self) -> tuple:
        """(3, H, W) of `preprocess` output (the collator's dummy image for text-only batches)."""
        if getattr(self, "_image_shape", None) is None:
            from PIL import Image

            self._image_shape = tuple(self.preprocess(Image.new("RGB", (64, 64))).shape)
        return self._image_shape

    def preprocess(self, image) -> torch.Tensor:
        """A PIL RGB image -> float tensor [3, H, W] (resize/crop/normalise as the tower was trained)."""
        return self._preprocess_fn(image)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.kind == "open_clip":
            return self._open_clip_features(pixel_values)
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        return feats[:, 1:] if self.kind == "clip" else feats

    def _open_clip_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        visual = self.model
        blocks = len(_base(visual).transformer.resblocks)
        # HF hidden_states[k] is the output after k blocks -> open_clip block index k - 1.
        k = self.select_layer if self.select_layer >= 0 else blocks + 1 + self.select_layer
        if not 1 <= k <= blocks:
            raise UserError(f"visual_select_layer={self.select_layer} is outside the {blocks} blocks of "
                            f"open_clip model {self.name!r} (use -1 .. -{blocks}, or 1 .. {blocks})")
        out = visual.forward_intermediates(pixel_values, indices=[k - 1], stop_early=True,
                                           intermediates_only=True, output_fmt="NLC")
        return out["image_intermediates"][0]  # class token already split off


def _base(module: nn.Module) -> nn.Module:
    """The model under a PeftModel wrapper (or the module itself)."""
    get_base = getattr(module, "get_base_model", None)
    return get_base() if callable(get_base) else module


def detect_kind(name: str, declared: str = "auto") -> str:
    """clip | siglip | open_clip for a folder / hub id / open_clip name, from saved metadata only."""
    if declared != "auto":
        return declared
    if name.startswith(("hf-hub:", "local-dir:")):
        return "open_clip"
    path = Path(name)
    if path.is_dir():
        if (path / "open_clip_config.json").is_file():
            return "open_clip"
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise UserError(f"model.visual_encoder: folder {path} has no config.json (nor open_clip_config.json); "
                            "point it at a saved CLIPVisionModel/SiglipVisionModel folder, or set "
                            "model.visual_encoder_type")
        try:
            model_type = json.loads(cfg_file.read_text()).get("model_type", "")
        except ValueError as err:
            raise UserError(f"{cfg_file}: not valid JSON ({err})") from None
        return _kind_from_model_type(model_type, str(cfg_file))
    try:
        import open_clip

        if name in open_clip.list_models():
            return "open_clip"
    except ImportError:
        pass
    try:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(name).model_type
    except Exception as err:  # hub unreachable, unknown id, ...
        raise UserError(f"model.visual_encoder={name!r}: not a local folder, not an open_clip model name, and "
                        f"its config could not be read ({type(err).__name__}: {err}). Give a local folder or set "
                        "model.visual_encoder_type") from None
    return _kind_from_model_type(model_type, name)


def _kind_from_model_type(model_type: str, where: str) -> str:
    if model_type not in HF_TYPES:
        raise UserError(f"{where}: model_type {model_type!r} is not a supported vision tower "
                        f"(supported: {', '.join(sorted(HF_TYPES))}, or an open_clip model)")
    return HF_TYPES[model_type]


def _load_hf(name: str, kind: str, select_layer: int, dtype: Optional[torch.dtype]) -> VisualEncoder:
    from transformers import AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

    model_cls = CLIPVisionModel if kind == "clip" else SiglipVisionModel
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        # Works on both the full CLIPModel/SiglipModel checkpoints and vision-only ones.
        model = model_cls.from_pretrained(name, **kwargs)
        processor = AutoImageProcessor.from_pretrained(name)
    except OSError as err:
        raise UserError(f"model.visual_encoder={name!r}: cannot load a {kind} vision tower ({err})") from None
    return wrap_hf_tower(model, processor, kind, select_layer, name)


def wrap_hf_tower(model, processor, kind: str, select_layer: int, name: str) -> VisualEncoder:
    """A VisualEncoder around a loaded CLIPVisionModel / SiglipVisionModel and its image processor."""
    cfg = model.config
    layers = cfg.num_hidden_layers
    if not -(layers + 1) <= select_layer <= layers:
        raise UserError(f"model.visual_select_layer={select_layer} is outside the {layers} layers of {name}")
    grid = cfg.image_size // cfg.patch_size
    mean = tuple(int(v * 255) for v in processor.image_mean)  # truncated, as LLaVA and XTuner (and transformers LlavaImageProcessor) do

    def preprocess(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    return VisualEncoder(model, kind, select_layer, cfg.hidden_size, grid * grid, mean, preprocess, name,
                         processor=processor)


def _load_open_clip(name: str, pretrained: Optional[str], select_layer: int,
                    dtype: Optional[torch.dtype]) -> VisualEncoder:
    try:
        import open_clip
    except ImportError as err:
        raise UserError(f"open_clip_torch is needed for visual encoder {name!r}: pip install open_clip_torch ({err})") from None
    if pretrained and Path(pretrained).suffix and not Path(pretrained).exists():
        raise UserError(f"model.open_clip_pretrained: checkpoint {pretrained} does not exist")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except RuntimeError as err:
        raise UserError(f"model.visual_encoder={name!r} (open_clip, pretrained={pretrained!r}): {err}") from None
    visual = model.visual
    del model  # only the image tower is needed
    if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
        raise UserError(f"open_clip model {name!r} has no ViT image tower ({type(visual).__name__}); "
                        "only ViT-based open_clip models are supported")
    if dtype is not None:
        visual = visual.to(dtype)
    grid = visual.grid_size
    mean = tuple(int(v * 255) for v in visual.preprocess_cfg["mean"])
    width = visual.conv1.out_channels
    return VisualEncoder(visual, "open_clip", select_layer, width, grid[0] * grid[1], mean, preprocess, name,
                         processor=preprocess)


def load_visual_encoder(model_cfg, dtype: Optional[torch.dtype] = None) -> VisualEncoder:
    """Build the tower named by `model_cfg.visual_encoder` (a `ModelConfig`); with `model.image_aspect: anyres`
    it tiles images (`ve.anyres`, llava_ft.model.anyres)."""
    name = model_cfg.visual_encoder
    if not name:
        raise UserError("model.visual_encoder is empty; set it to a CLIP/SigLIP folder or hub id, or an open_clip name")
    kind = detect_kind(str(name), getattr(model_cfg, "visual_encoder_type", "auto"))
    select = getattr(model_cfg, "visual_select_layer", -2)
    if kind == "open_clip":
        ve = _load_open_clip(str(name), getattr(model_cfg, "open_clip_pretrained", None), select, dtype)
    else:
        ve = _load_hf(str(name), kind, select, dtype)
    log.info("visual encoder %s: %s, %d tokens x %d, layer %d", name, kind, ve.num_image_tokens,
             ve.hidden_size, select)
    if getattr(model_cfg, "image_aspect", "pad") == "anyres":
        from llava_ft.model.anyres import enable_anyres

        enable_anyres(ve, getattr(model_cfg, "image_grid_pinpoints", None), getattr(model_cfg, "max_image_tiles", None))
    return ve


def apply_vision_lora(visual_encoder: VisualEncoder, lora_settings) -> VisualEncoder:
    """Wrap the tower's model in PEFT LoRA (only LoRA weights train); returns the same VisualEncoder."""
    from peft import LoraConfig

    from llava_ft.model.llm import peft_wrap

    if not getattr(lora_settings, "enabled", True):
        return visual_encoder
    targets = lora_settings.target_modules
    if visual_encoder.kind == "open_clip" and targets == "all-linear":
        targets = _open_clip_lora_targets(visual_encoder.model)
    config = LoraConfig(r=lora_settings.r, lora_alpha=lora_settings.alpha, lora_dropout=lora_settings.dropout,
                        target_modules=targets, bias="none")
    try:
        visual_encoder.model = peft_wrap(visual_encoder.model, config)
    except ValueError as err:
        raise UserError(f"model.visual_encoder_lora: {err}") from None
    return visual_encoder


def _open_clip_lora_targets(model: nn.Module) -> list:
    """'all-linear' for an OpenCLIP tower: its nn.MultiheadAttention modules (PEFT's LoRA for them adapts
    the fused in-projection and out_proj) plus every Linear outside them. A LoRA wrapped around the
    attention's out_proj Linear alone would never run: MultiheadAttention reads out_proj.weight directly."""
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    inside = tuple(a + "." for a in attention)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith(inside)]
    return attention + linear
