"""Tests for llava_ft.model.llava.LlavaFtModel: text-only pass-through, the image splice, generate,
trainable-weights save/load, freezing under training.

Run: python -m pytest tests/test_llava_model.py -x -q
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from llava_ft import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_ft.errors import UserError
from llava_ft.model.llava import LlavaFtModel


@pytest.fixture()
def llm(tiny_llama):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


def test_text_only_forward_matches_llm(llm):
    model = LlavaFtModel(llm)
    ids = torch.randint(5, 100, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    ref = llm(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.allclose(out.loss, ref.loss)
    assert out.logits.shape == (2, 7, llm.config.vocab_size)
    assert model.config is llm.config
    with pytest.raises(UserError, match="text-only"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, 32, 32))


def test_text_only_generate_returns_new_tokens(llm):
    model = LlavaFtModel(llm).eval()
    ids = torch.randint(5, 100, (1, 6))
    new = model.generate(ids, max_new_tokens=4, do_sample=False)
    full = llm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(new, full[:, 6:])


def test_trainable_state_dict_roundtrip_and_errors(llm):
    from peft import LoraConfig, get_peft_model

    peft_llm = get_peft_model(llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model = LlavaFtModel(peft_llm)
    sd = model.trainable_state_dict()
    assert sd and all(".lora_" in k for k in sd)
    assert all(k.startswith("llm.base_model.model.") for k in sd)
    changed = {k: torch.randn_like(v) for k, v in sd.items()}
    assert model.load_trainable_state_dict(changed) == sorted(changed)
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, changed[k])

    partial = dict(list(changed.items())[1:])
    with pytest.raises(UserError, match="missing keys"):
        model.load_trainable_state_dict(partial)
    with pytest.raises(UserError, match="unexpected keys.*projector.layers.0.weight"):
        model.load_trainable_state_dict({**changed, "projector.layers.0.weight": torch.zeros(2)})
    first = next(iter(changed))
    with pytest.raises(UserError, match="shape mismatch"):
        model.load_trainable_state_dict({**changed, first: torch.zeros(3, 3)})


def test_gradient_checkpointing_delegates(llm):
    model = LlavaFtModel(llm)
    model.activation_checkpointing_enable()
    assert llm.model.gradient_checkpointing
    model.train()
    ids = torch.randint(5, 100, (2, 5))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert llm.lm_head.weight.grad is not None
