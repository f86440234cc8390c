"""Shared pytest fixtures: tiny random-init models, a local tokenizer and demo data, built once per session.

Every fixture returns a path (str) to an HF-format folder or data file, built with `llava_ft.demo.assets`
under pytest's session temp dir. Nothing is downloaded. Tests must not modify these folders (copy first):
they are shared by the whole session.

    def test_x(tiny_llama, tiny_tokenizer, tiny_clip, demo_data):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        demo_data["finetune"], demo_data["image_folder"], ...

Tests marked `gpu` are skipped when CUDA is unavailable.
"""
from __future__ import annotations

import pytest

from llava_ft.demo import assets


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    """Paths from `make_demo_data`: image_folder, pretrain, finetune, eval, self_cognition, text."""
    return assets.make_demo_data(tmp_path_factory.mktemp("demo_data"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> str:
    """Byte-level BPE (vocab 512), <s> </s> <pad> <unk>, ChatML-like chat_template."""
    return assets.build_tokenizer(tmp_path_factory.mktemp("assets") / "tokenizer")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer) -> str:
    """LlamaForCausalLM: hidden 64, 2 layers, 4 heads (2 kv), tokenizer files included."""
    return assets.build_tiny_llm(tmp_path_factory.mktemp("assets") / "llama", tiny_tokenizer, arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tiny_tokenizer) -> str:
    """Qwen2ForCausalLM with the same sizes as tiny_llama."""
    return assets.build_tiny_llm(tmp_path_factory.mktemp("assets") / "qwen2", tiny_tokenizer, arch="qwen2")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """CLIPVisionModel (32 px, patch 8 -> 16 patches + CLS, hidden 32, 2 layers) + CLIPImageProcessor."""
    return assets.build_tiny_clip(tmp_path_factory.mktemp("assets") / "clip")


@pytest.fixture()
def make_llava(tiny_clip):
    """make_llava(llm) -> LlavaFtModel(llm, the tiny CLIP tower, a depth-2 projector seeded with 1), fp32."""

    def make(llm):
        import torch

        from llava_ft.config import ModelConfig
        from llava_ft.model.llava import LlavaFtModel
        from llava_ft.model.projector import Projector
        from llava_ft.model.vision import load_visual_encoder

        ve = load_visual_encoder(ModelConfig(llm="unused", visual_encoder=tiny_clip))
        torch.manual_seed(1)
        return LlavaFtModel(llm, ve, Projector(ve.hidden_size, llm.config.hidden_size, depth=2))

    return make


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory) -> str:
    """SiglipVisionModel (32 px, patch 8 -> 16 patches, hidden 32, 2 layers) + SiglipImageProcessor."""
    return assets.build_tiny_siglip(tmp_path_factory.mktemp("assets") / "siglip")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_internlm2(tmp_path_factory) -> str:
    """InternLM2 hub layout (model_type internlm2, fused wqkv, raising auto_map code, sentencepiece tokenizer),
    fused from a random Llama saved beside it as `<parent>/llama` (the logits reference)."""
    from llava_ft.testing.internlm2 import build_tiny_internlm2

    root = tmp_path_factory.mktemp("internlm2")
    return build_tiny_internlm2(root / "internlm2", reference_dir=root / "llama")
