"""Tests for llava_ft.demo.assets: determinism, tokenizer round-trip, models load and run a forward."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_ft.demo import assets


def _digest(folder) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_builds_are_deterministic(tmp_path):
    tok_a = assets.build_tokenizer(tmp_path / "a" / "tok")
    tok_b = assets.build_tokenizer(tmp_path / "b" / "tok")
    assert _digest(tok_a) == _digest(tok_b)
    llm_a = assets.build_tiny_llm(tmp_path / "a" / "llm", tok_a, arch="qwen2", num_layers=1)
    llm_b = assets.build_tiny_llm(tmp_path / "b" / "llm", tok_b, arch="qwen2", num_layers=1)
    assert _digest(llm_a) == _digest(llm_b)
    clip_a = assets.build_tiny_clip(tmp_path / "a" / "clip")
    clip_b = assets.build_tiny_clip(tmp_path / "b" / "clip")
    assert _digest(clip_a) == _digest(clip_b)
    data_a = assets.make_demo_data(tmp_path / "a" / "data", n_pretrain=8, n_finetune=8, n_eval=4, n_text=4)
    data_b = assets.make_demo_data(tmp_path / "b" / "data", n_pretrain=8, n_finetune=8, n_eval=4, n_text=4)
    assert _digest(Path(data_a["pretrain"]).parent) == _digest(Path(data_b["pretrain"]).parent)
    # a different seed gives different weights
    llm_c = assets.build_tiny_llm(tmp_path / "c" / "llm", tok_a, arch="qwen2", num_layers=1, seed=1)
    assert _digest(llm_c)["model.safetensors"] != _digest(llm_a)["model.safetensors"]


def test_tokenizer_round_trips_and_has_specials(tiny_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    for text in ["<|im_start|>user\nWhat colour is the shape?<|im_end|>\n", "[INST] hi [/INST]",
                 "### Human: A red circle.### Assistant:", "Ünïcödé 你好 😀 tabs\tand\nnewlines"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_llm_loads_and_runs(arch, tiny_llama, tiny_qwen2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_llama if arch == "llama" else tiny_qwen2
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    ids = tok("A red circle.", return_tensors="pt")["input_ids"]
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(out.loss)


def test_tiny_vision_towers_load_and_run(tiny_clip, tiny_siglip, demo_data):
    from transformers import AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

    image = Image.open(Path(demo_data["image_folder"]) / "pretrain" / "pretrain_00000.png")
    for path, cls, tokens in [(tiny_clip, CLIPVisionModel, 16 + 1), (tiny_siglip, SiglipVisionModel, 16)]:
        processor = AutoImageProcessor.from_pretrained(path)
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        assert pixels.shape == (1, 3, 32, 32)
        out = cls.from_pretrained(path)(pixel_values=pixels, output_hidden_states=True)
        assert out.hidden_states[-2].shape == (1, tokens, 32)


def test_demo_data_is_consistent(demo_data):
    folder = Path(demo_data["image_folder"])
    for key in ("pretrain", "finetune"):
        records = json.loads(Path(demo_data[key]).read_text())
        assert len({r["id"] for r in records}) == len(records)
        for r in records:
            assert (folder / r["image"]).is_file()
            humans = [t["value"] for t in r["conversations"] if t["from"] == "human"]
            assert sum(h.count("<image>") for h in humans) == 1
            assert [t["from"] for t in r["conversations"]] == ["human", "gpt"] * (len(r["conversations"]) // 2)
    finetune = json.loads(Path(demo_data["finetune"]).read_text())
    # answers name the colour actually drawn: check pixels of the first few images
    for r in finetune[:10]:
        answer = {t["value"] for t in r["conversations"] if t["from"] == "gpt"}
        colour = next(c for c in assets.COLOURS if c in answer or f"A {c} " in " ".join(answer))
        pixels = Image.open(folder / r["image"]).convert("RGB").getdata()
        assert assets.COLOURS[colour] in set(pixels)
    eval_rows = [json.loads(line) for line in Path(demo_data["eval"]).read_text().splitlines()]
    assert eval_rows and all({"id", "image", "question", "answer"} <= set(r) for r in eval_rows)
    eval_images = {r["image"] for r in eval_rows}
    assert not eval_images & {r["image"] for r in finetune}
    cog = [json.loads(line) for line in Path(demo_data["self_cognition"]).read_text().splitlines()]
    assert all(m["messages"][0]["role"] == "user" for m in cog)
    assert any("{{NAME}}" in m["messages"][1]["content"] for m in cog)
    texts = [json.loads(line)["text"] for line in Path(demo_data["text"]).read_text().splitlines()]
    assert texts and all(texts)


def test_workspace_is_reused_when_complete(tmp_path):
    first = assets.build_demo_workspace(tmp_path / "ws", num_layers=1)
    marker = tmp_path / "ws" / "workspace.json"
    stamp = marker.stat().st_mtime_ns
    weights = Path(first["llm"]) / "model.safetensors"
    weights_stamp = weights.stat().st_mtime_ns
    again = assets.build_demo_workspace(tmp_path / "ws", num_layers=1)
    assert again == first
    assert marker.stat().st_mtime_ns == stamp and weights.stat().st_mtime_ns == weights_stamp
    # an interrupted build (no marker) is rebuilt
    marker.unlink()
    assets.build_demo_workspace(tmp_path / "ws", num_layers=1)
    assert marker.is_file()
    for key in ("tokenizer", "llm", "visual_encoder"):
        assert (Path(first[key]) / "config.json").is_file() or (Path(first[key]) / "tokenizer.json").is_file()
