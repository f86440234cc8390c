"""Exports stop at the turn end with plain transformers: every generation_config.json that convert writes
(llava-hf, XTuner llm_adapter/, text adapter, merged text, full text model) lists the template's end-of-turn
token (<|im_end|>, <|eot_id|>) as eos, and greedy `generate` with nothing but that config stops there.

The tiny models are random, so they never choose to end a turn; `EndTurnAt` makes the end-of-turn token win
at a given step, as a trained model's logits would. What is tested is what happens next: whether the saved
config makes transformers stop on it."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor,
                          LogitsProcessorList)

from llava_ft.convert import merge_adapter, pth_to_hf
from llava_ft.demo.assets import draw_shape
from llava_ft.inference import load_chat_model
from llava_ft.testing.checkpoints import write_random_checkpoint
from llava_ft.testing.variants import with_special_tokens

END_WORDS = {"chatml": "<|im_end|>", "llama3_chat": "<|eot_id|>"}
MAX_NEW = 10
STEP = 3  # the end-of-turn token is emitted as the 4th new token


class EndTurnAt(LogitsProcessor):
    """At new-token index `step`, the token `token_id` gets all the probability (a trained model ending its turn)."""

    def __init__(self, prompt_len: int, step: int, token_id: int):
        self.prompt_len, self.step, self.token_id = prompt_len, step, token_id

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_len == self.step:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.token_id] = 0.0
        return scores


def _raw(llm, template, **model):
    return {"model": {"llm": llm, **model}, "data": {"template": template, "sources": [{"path": "unused.json"}]}}


@pytest.fixture(scope="module")
def end_llm(tmp_path_factory, tiny_llama) -> str:
    """tiny_llama whose tokenizer has <|im_end|> and <|eot_id|> as single special tokens (as Qwen / Llama 3 do)."""
    return with_special_tokens(tiny_llama, tmp_path_factory.mktemp("end_llm") / "llm", list(END_WORDS.values()))


def _eos_list(folder) -> list:
    eos = json.loads((Path(folder) / "generation_config.json").read_text())["eos_token_id"]
    return eos if isinstance(eos, list) else [eos]


def _assert_stops(model, tok, template, gen_config=None, **inputs):
    """generate with the saved config stops right after the end-of-turn token (not at MAX_NEW)."""
    end_id = tok.convert_tokens_to_ids(END_WORDS[template])
    if "input_ids" not in inputs:
        inputs = dict(tok("Which shape is red?", return_tensors="pt"))
    prompt_len = inputs["input_ids"].shape[1]
    kw = {"generation_config": gen_config} if gen_config is not None else {}
    out = model.generate(**inputs, **kw, max_new_tokens=MAX_NEW, do_sample=False,
                         logits_processor=LogitsProcessorList([EndTurnAt(prompt_len, STEP, end_id)]))
    new = out[0, prompt_len:].tolist()
    assert new[-1] == end_id and len(new) == STEP + 1, new


@pytest.mark.smoke
def test_llava_hf_and_xtuner_layout_stop_at_im_end(tmp_path, end_llm, tiny_clip):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    pth = write_random_checkpoint(tmp_path / "run", _raw(end_llm, "chatml", visual_encoder=tiny_clip,
                                                         freeze_llm=True, llm_lora={"enabled": True, "r": 4}))
    out = pth_to_hf(None, pth, tmp_path / "hf", fmt="llava-hf")
    processor = AutoProcessor.from_pretrained(out)
    tok = processor.tokenizer
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    assert _eos_list(out) == [tok.eos_token_id, end_id]
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    _assert_stops(model, tok, "chatml")  # a text-only prompt
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                        {"type": "text", "text": "Colour?"}]}],
                                         add_generation_prompt=True)
    inputs = processor(images=draw_shape("red", "circle", random.Random(0), 32), text=text, return_tensors="pt")
    _assert_stops(model, tok, "chatml", **inputs)  # and one with an image

    xt = pth_to_hf(None, pth, tmp_path / "xt")
    assert _eos_list(Path(xt) / "llm_adapter") == [tok.eos_token_id, end_id]
    # the XTuner layout's llm_adapter/ merged on its own: the template comes from the layout's llava_ft.json
    merged = merge_adapter(end_llm, Path(xt) / "llm_adapter", tmp_path / "merged_llm")
    assert _eos_list(merged) == [tok.eos_token_id, end_id]
    _assert_stops(AutoModelForCausalLM.from_pretrained(merged).eval(), AutoTokenizer.from_pretrained(merged),
                  "chatml")
    assert load_chat_model(merged).template.name == "chatml"


def test_text_adapter_merged_and_full_exports_stop_at_the_turn_end(tmp_path, end_llm):
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(end_llm)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    pth = write_random_checkpoint(tmp_path / "lora", _raw(end_llm, "llama3_chat", llm_lora={"enabled": True, "r": 4}))
    adapter = pth_to_hf(None, pth, tmp_path / "adapter")
    assert _eos_list(adapter) == [tok.eos_token_id, eot]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(end_llm), adapter).eval()
    _assert_stops(peft_model, tok, "llama3_chat", gen_config=GenerationConfig.from_pretrained(adapter))

    merged = merge_adapter(end_llm, adapter, tmp_path / "merged")
    assert _eos_list(merged) == [tok.eos_token_id, eot]
    _assert_stops(AutoModelForCausalLM.from_pretrained(merged).eval(), AutoTokenizer.from_pretrained(merged),
                  "llama3_chat")

    full = write_random_checkpoint(tmp_path / "full", _raw(end_llm, "chatml"))
    out = pth_to_hf(None, full, tmp_path / "full_hf")
    assert _eos_list(out) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    _assert_stops(AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out), "chatml")


def test_multi_token_end_word_is_a_warning(tmp_path, tiny_llama, caplog):
    """The tiny tokenizer spells <|im_end|> in 5 pieces: it cannot be an eos id, and the export says so."""
    pth = write_random_checkpoint(tmp_path / "run", _raw(tiny_llama, "chatml", llm_lora={"enabled": True, "r": 4}))
    with caplog.at_level(logging.WARNING, logger="llava_ft"):
        out = pth_to_hf(None, pth, tmp_path / "adapter")
    assert any("template chatml ends a turn with '<|im_end|>', which this tokenizer splits into 5 tokens"
               in r.getMessage() and "stop_strings" in r.getMessage() for r in caplog.records)
    assert _eos_list(out) == [AutoTokenizer.from_pretrained(tiny_llama).eos_token_id]
    assert GenerationConfig.from_pretrained(out).stop_strings is None  # would make plain generate raise
