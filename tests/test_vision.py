"""Tests for llava_ft.model.vision: CLIP / SigLIP / OpenCLIP towers, layer selection, CLS handling,
type detection from saved metadata (never the folder name), preprocessing, vision LoRA.

Run: python -m pytest tests/test_vision.py -x -q
"""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from llava_ft.config import LoraSettings, ModelConfig
from llava_ft.errors import UserError
from llava_ft.model.vision import apply_vision_lora, detect_kind, load_visual_encoder


def _cfg(path, **kw):
    return ModelConfig(llm="unused", visual_encoder=str(path), **kw)


def test_clip_drops_cls_and_selects_layer(tiny_clip):
    from transformers import CLIPVisionModel

    ve = load_visual_encoder(_cfg(tiny_clip))
    assert ve.kind == "clip" and ve.hidden_size == 32 and ve.num_image_tokens == 16
    pixel = torch.randn(2, 3, 32, 32)
    feats = ve(pixel)
    assert feats.shape == (2, 16, 32)
    ref = CLIPVisionModel.from_pretrained(tiny_clip)(pixel_values=pixel, output_hidden_states=True)
    assert torch.allclose(feats, ref.hidden_states[-2][:, 1:], atol=1e-6)
    last = load_visual_encoder(_cfg(tiny_clip, visual_select_layer=-1))(pixel)
    assert torch.allclose(last, ref.hidden_states[-1][:, 1:], atol=1e-6)
    assert not torch.allclose(last, feats)


def test_siglip_keeps_every_patch(tiny_siglip):
    ve = load_visual_encoder(_cfg(tiny_siglip))
    assert ve.kind == "siglip" and ve.num_image_tokens == 16
    assert ve(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32)


def test_type_comes_from_config_not_folder_name(tiny_siglip, tmp_path):
    # A SigLIP tower in a folder whose name says "clip" is still SigLIP.
    misleading = tmp_path / "openai-clip-vit-large"
    shutil.copytree(tiny_siglip, misleading)
    assert detect_kind(str(misleading)) == "siglip"
    broken = tmp_path / "no_config"
    broken.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_visual_encoder(_cfg(broken))
    cfg = json.loads((misleading / "config.json").read_text())
    cfg["model_type"] = "llama"
    (misleading / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="model_type 'llama' is not a supported vision tower"):
        detect_kind(str(misleading))


def test_full_clip_checkpoint_loads_as_vision_tower(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "vocab_size": 99},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    torch.manual_seed(0)
    full = CLIPModel(cfg)
    full.save_pretrained(tmp_path / "full")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "full")
    ve = load_visual_encoder(_cfg(tmp_path / "full"))
    assert ve.kind == "clip"
    pixel = torch.randn(1, 3, 32, 32)
    ref = full.vision_model(pixel_values=pixel, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert torch.allclose(ve(pixel), ref, atol=1e-6)


def test_preprocess_and_mean(tiny_clip):
    ve = load_visual_encoder(_cfg(tiny_clip))
    # CLIP's processor mean (0.4815, 0.4578, 0.4082) in 0-255.
    assert ve.image_mean == (122, 116, 104)  # int(mean * 255), LLaVA's expand2square colour
    px = ve.preprocess(Image.new("RGB", (50, 40), (255, 0, 0)))
    assert px.shape == (3, 32, 32) and px.dtype == torch.float32
    assert px[0].mean() > 1.5 and px[1].mean() < -1.5  # normalised red


def _tiny_open_clip(tmp_path):
    """A 3-block OpenCLIP ViT registered as 'TinyViT-test', saved to tmp_path/tiny.pt; returns the model."""
    import open_clip

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "TinyViT-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "cfgs")
    torch.manual_seed(0)
    ref = open_clip.create_model("TinyViT-test")
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "tiny.pt")
    return ref


def test_open_clip_tower_from_checkpoint(tmp_path):
    ref = _tiny_open_clip(tmp_path)
    ve = load_visual_encoder(_cfg("TinyViT-test", open_clip_pretrained=str(tmp_path / "tiny.pt")))
    assert ve.kind == "open_clip" and ve.num_image_tokens == 16 and ve.hidden_size == 32
    pixel = torch.randn(2, 3, 32, 32)
    feats = ve(pixel)
    assert feats.shape == (2, 16, 32)
    # Recompute layer -2 (= after block 2 of 3) by hand, dropping the class token.
    v = ref.visual.eval()
    x = v._embeds(pixel)
    for blk in v.transformer.resblocks[:2]:
        x = blk(x)
    assert torch.allclose(feats, x[:, 1:], atol=1e-5)
    assert ve.preprocess(Image.new("RGB", (64, 48))).shape == (3, 32, 32)
    with pytest.raises(UserError, match="outside the 3 blocks"):
        load_visual_encoder(_cfg("TinyViT-test", open_clip_pretrained=str(tmp_path / "tiny.pt"),
                                 visual_select_layer=-5))(pixel)


def test_vision_lora_only_lora_trains(tiny_clip):
    ve = load_visual_encoder(_cfg(tiny_clip))
    for p in ve.parameters():
        p.requires_grad_(False)
    ve = apply_vision_lora(ve, LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    trainable = [n for n, p in ve.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ve(torch.randn(1, 3, 32, 32)).sum().backward()
    # Layer -2 features: LoRA in block 0 gets gradients (the last block's output is not used).
    first_block = [p for n, p in ve.named_parameters() if "layers.0." in n and "lora_B" in n]
    assert first_block and all(p.grad is not None and p.grad.abs().sum() > 0 for p in first_block)
    off = apply_vision_lora(load_visual_encoder(_cfg(tiny_clip)), SimpleNamespace(enabled=False))
    assert not any("lora_" in n for n, _ in off.named_parameters())


def test_open_clip_lora_trains_attention_and_mlp(tmp_path):
    """OpenCLIP blocks use nn.MultiheadAttention, whose out_proj weight is read directly (a LoRA wrapped
    around it would never run): every LoRA weight the tower gets must receive gradients."""
    _tiny_open_clip(tmp_path)
    ve = load_visual_encoder(_cfg("TinyViT-test", open_clip_pretrained=str(tmp_path / "tiny.pt")))
    for p in ve.parameters():
        p.requires_grad_(False)
    ve = apply_vision_lora(ve, LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    lora_b = {n: p for n, p in ve.named_parameters() if p.requires_grad and "lora_B" in n}
    assert any(".attn" in n for n in lora_b) and any(".mlp" in n for n in lora_b)
    assert all(p.requires_grad == ("lora_" in n) for n, p in ve.named_parameters())
    ve(torch.randn(2, 3, 32, 32)).sum().backward()
    used = {n: p for n, p in lora_b.items() if "resblocks.0." in n}  # block 0 feeds layer -2's features
    dead = [n for n, p in used.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert used and not dead, f"LoRA weights without gradients: {dead}"


def test_open_clip_vision_lora_survives_the_xtuner_export(tmp_path, tiny_llama):
    """A LLaVA run with LoRA on an OpenCLIP tower exports (XTuner layout) and loads back with the same image
    features as the checkpoint; without the adapter they differ (so the adapter really is applied)."""
    from llava_ft.convert.pth_to_hf import pth_to_hf
    from llava_ft.inference import load_chat_model
    from llava_ft.testing.checkpoints import write_random_checkpoint

    _tiny_open_clip(tmp_path)
    ve_cfg = {"visual_encoder": "TinyViT-test", "open_clip_pretrained": str(tmp_path / "tiny.pt")}
    raw = {"model": {"llm": tiny_llama, **ve_cfg, "freeze_llm": True,
                     "visual_encoder_lora": {"enabled": True, "r": 4, "alpha": 8}},
           "data": {"template": "vicuna", "sources": [{"path": "unused.json"}]}}
    pth = write_random_checkpoint(tmp_path / "run", raw, scale=0.5)
    out = pth_to_hf(None, pth, tmp_path / "xtuner")
    assert (tmp_path / "xtuner" / "visual_encoder_adapter" / "adapter_config.json").is_file()
    pixel = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        from_pth = load_chat_model(pth, torch_dtype="fp32").model.encode_images(pixel)
        from_export = load_chat_model(tiny_llama, llava=str(out), visual_encoder="TinyViT-test",
                                      torch_dtype="fp32").model.encode_images(pixel)
        no_lora = load_chat_model(tiny_llama, llava=str(out), visual_encoder="TinyViT-test",
                                  torch_dtype="fp32")
        no_lora.model.visual_encoder.model.disable_adapter_layers()
        plain = no_lora.model.encode_images(pixel)
    assert torch.allclose(from_export, from_pth, atol=1e-5)
    assert not torch.allclose(plain, from_pth, atol=1e-3)
