"""Continue from a released LLaVA (`model.llava`): a LlavaForConditionalGeneration folder is loaded into
llava_ft's model unchanged (same logits as transformers before any step), finetuned with LoRA, exported back
to the same format, and afterwards only what trained differs (TRL-style: trained weights changed, frozen
ones did not)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava_ft import IMAGE_TOKEN_INDEX
from llava_ft.config import config_from_dict
from llava_ft.convert import pth_to_hf
from llava_ft.demo.assets import draw_shape
from llava_ft.errors import UserError
from llava_ft.testing.checkpoints import write_random_checkpoint
from llava_ft.model.builder import build_model

LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def released(tmp_path_factory, tiny_llama, tiny_clip):
    """A first run (LLM LoRA, trained with pad-to-square) exported with --format llava-hf."""
    root = tmp_path_factory.mktemp("released")
    pth = write_random_checkpoint(root / "run", {
        "model": {"llm": tiny_llama, "visual_encoder": tiny_clip, "freeze_llm": True, "llm_lora": LORA,
                  "dtype": "fp32"},
        "data": {"template": "vicuna", "pad_image_to_square": True, "sources": [{"path": "unused.json"}]}})
    return pth_to_hf(None, pth, root / "llava_hf", fmt="llava-hf")


def _cfg(llava, demo_data, tmp_path, **model):
    return config_from_dict({
        "name": "continued",
        "model": {"llava": llava, "freeze_llm": True, "llm_lora": LORA, "dtype": "fp32", **model},
        "data": {"sources": [{"path": demo_data["finetune"], "format": "llava",
                              "image_folder": demo_data["image_folder"]}],
                 "template": "vicuna", "max_length": 256, "cache_dir": str(tmp_path / "cache")},
        "train": {"learning_rate": 2e-2, "per_device_batch_size": 2, "max_steps": 3, "save_steps": 3,
                  "logging_steps": 1, "warmup_ratio": 0.0, "seed": 0},
    })


def _hf_inputs(folder):
    """transformers' own prompt for one image: chat template + processor (image tokens expanded)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}],
        add_generation_prompt=True)
    image = draw_shape("blue", "square", random.Random(1), 48).crop((0, 10, 48, 34))  # wide: padding matters
    return processor, processor(images=image, text=text, return_tensors="pt")


def _hf_logits(folder, inputs):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**inputs).logits, model


def _ft_logits(model, inputs, image_token_id):
    """llava_ft's forward on the same prompt: the run of image tokens becomes one IMAGE_TOKEN_INDEX."""
    ids = []
    for t in inputs["input_ids"][0].tolist():
        if t != image_token_id:
            ids.append(t)
        elif not ids or ids[-1] != IMAGE_TOKEN_INDEX:
            ids.append(IMAGE_TOKEN_INDEX)
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), pixel_values=inputs["pixel_values"]).logits


def test_continue_from_llava_hf_export_and_export_again(released, demo_data, tmp_path, capsys):
    from llava_ft.engine import run_training

    processor, inputs = _hf_inputs(released)
    assert processor.image_processor.do_pad  # the first run padded to square; its processor says so
    before, hf_a = _hf_logits(released, inputs)

    cfg = _cfg(released, demo_data, tmp_path)
    start, _ = build_model(cfg)
    printed = capsys.readouterr().out
    assert f"model.llava {released}: LlavaForConditionalGeneration -> LLM llama (2 layers)" in printed
    assert "pads images to square (kept)" in printed
    assert start.visual_encoder.select_layer == hf_a.config.vision_feature_layer
    # Before any step (LoRA B = 0) the continued model is the released one.
    vocab = _ft_logits(start, inputs, hf_a.config.image_token_id)
    assert torch.allclose(vocab, before[..., :vocab.shape[-1]], atol=1e-5)
    # ... and it preprocesses images as the released processor does (padding to square included)
    image = draw_shape("blue", "square", random.Random(1), 48).crop((0, 10, 48, 34))
    assert torch.allclose(start.visual_encoder.preprocess(image), inputs["pixel_values"][0])

    result = run_training(cfg, work_dir=str(tmp_path / "wd"))
    assert result.global_step == 3
    out = pth_to_hf(None, result.last_checkpoint, tmp_path / "again", fmt="llava-hf")  # the same format again
    after, hf_c = _hf_logits(out, inputs)
    assert (after - before).abs().max() > 1e-3  # training changed what the model says

    a, c = hf_a.state_dict(), hf_c.state_dict()
    assert set(a) == set(c) and hf_c.config.image_token_id == hf_a.config.image_token_id
    changed = {k for k in a if not torch.equal(a[k], c[k])}
    # trained: every LoRA-targeted Linear of the LLM (merged) and the projector
    for k in a:
        if "language_model" in k and k.endswith("proj.weight") or "multi_modal_projector" in k:
            assert k in changed, k
    # frozen: the whole vision tower, embeddings, norms and the output head are bit-identical
    assert not any("vision_tower" in k or "embed_tokens" in k or "norm" in k or "lm_head" in k for k in changed)
    assert _processor_pads(out)  # the exported processor still pads to square
    card = (Path(out) / "README.md").read_text()
    assert f"Started from the released LLaVA: `{released}`" in card and f"base_model: {released}" in card


def _processor_pads(folder) -> bool:
    from transformers import AutoProcessor

    return bool(AutoProcessor.from_pretrained(folder).image_processor.do_pad)


def test_current_key_layout_loads_the_same(released, demo_data, tmp_path):
    """Checkpoints saved with transformers' current names (model.language_model.*) load like the Hub's older
    layout (language_model.model.*, what save_pretrained writes today)."""
    renamed = tmp_path / "current_layout"
    shutil.copytree(released, renamed)
    for file in renamed.glob("*.safetensors"):
        state = load_file(str(file))
        assert any(k.startswith("language_model.model.") for k in state)
        moved = {}
        for k, v in state.items():
            k = k.replace("language_model.model.", "model.language_model.", 1)
            k = k.replace("language_model.lm_head.", "lm_head.", 1)
            for part in ("vision_tower.", "multi_modal_projector."):
                if k.startswith(part):
                    k = "model." + k
            moved[k] = v
        save_file(moved, str(file), metadata={"format": "pt"})
    _, inputs = _hf_inputs(released)
    before, hf_a = _hf_logits(released, inputs)
    model, _ = build_model(_cfg(str(renamed), demo_data, tmp_path))
    got = _ft_logits(model, inputs, hf_a.config.image_token_id)
    assert torch.allclose(got, before[..., :got.shape[-1]], atol=1e-5)


def test_qlora_on_a_released_llava(released, demo_data, tmp_path):
    import bitsandbytes as bnb

    model, _ = build_model(_cfg(released, demo_data, tmp_path, quantization="4bit"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.llm.modules())
    trainable = {n.split(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"llm", "projector"}
    assert all("lora_" in n for n, p in model.llm.named_parameters() if p.requires_grad)


def test_model_llava_config_errors(released, tiny_llama, demo_data, tmp_path):
    with pytest.raises(UserError, match="remove model.pretrained_pth"):
        _cfg(released, demo_data, tmp_path, pretrained_pth="x/iter_1.pth")
    with pytest.raises(UserError, match="projector_depth"):
        _cfg(released, demo_data, tmp_path, projector_depth=3)
    with pytest.raises(UserError, match="does not exist"):
        build_model(_cfg(str(tmp_path / "missing"), demo_data, tmp_path))
    with pytest.raises(UserError, match="model_type is 'llama', not one of llava, llava_next"):
        build_model(_cfg(tiny_llama, demo_data, tmp_path))
    cfg = _cfg(released, demo_data, tmp_path)
    assert cfg.is_llava and cfg.resolved_phase == "finetune"
    assert json.loads((Path(released) / "config.json").read_text())["model_type"] == "llava"


def test_hub_id_offline_without_cache_is_one_line(monkeypatch, tmp_path, demo_data):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(UserError, match="no cached copy exists"):
        build_model(_cfg("nobody-h7/no-such-llava", demo_data, tmp_path))
