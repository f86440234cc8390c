"""Exports prompt like training: the chat_template written into every export makes
`tokenizer.apply_chat_template` build the ids llava_ft trained on, and every export folder has a model card
that says what the run was (base, tower, template, data and sizes, recipe, steps, loss, eval, commands)."""
from __future__ import annotations

import json
import sys

import pytest
from transformers import AutoTokenizer

from llava_ft.convert.chat_template import chat_template_mismatch, training_chat_template
from llava_ft.data.encode import encode_prompt, encode_record
from llava_ft.templates import TEMPLATES
from llava_ft.testing.family_tokenizers import build_family_tokenizer

LORA_SMALL = {"enabled": True, "r": 4, "alpha": 8}

# Not the checker's probe: a different conversation, with a system prompt, three rounds.
CONVO = [
    {"role": "system", "content": "Describe shapes."},
    {"role": "user", "content": "What is this?"},
    {"role": "assistant", "content": "A red circle."},
    {"role": "user", "content": "Is it big?"},
    {"role": "assistant", "content": "No, small."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]


def _ids_like_training(tok, name, system=None):
    """(generation prompt ids, full training ids) from llava_ft's encoder."""
    full = encode_record({"id": "c", "messages": CONVO, "images": []}, tok, name, 4096, system=system)
    return encode_prompt(CONVO[:-1], tok, name, system=system), full.sample["input_ids"]


def _ids_from_chat_template(tok):
    prompt = tok.apply_chat_template(CONVO[:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
    full = tok.apply_chat_template(CONVO, tokenize=True, add_generation_prompt=False, return_dict=False)
    return list(prompt), list(full)


@pytest.fixture(scope="module")
def family_tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_tok")
    return {f: build_family_tokenizer(root / f, f) for f in ("llama3", "qwen2")}


# Seams where one-string tokenization differs from XTuner's per-segment one with the demo tokenizer (GPT-2
# split): '\n\n' before a word is two pieces when joined, one when alone (llama3_chat; Llama-3's own split
# keeps it whole, see the family test), and deepseek_v2's 'Assistant: ' + answer joins into ' A'.
DEMO_SEAM = {"llama3_chat", "deepseek_v2"}


@pytest.mark.parametrize("name", sorted(set(TEMPLATES) - DEMO_SEAM))
def test_apply_chat_template_gives_training_ids(tiny_tokenizer, name):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    tok.chat_template = training_chat_template(tok, name, None)
    assert _ids_from_chat_template(tok) == _ids_like_training(tok, name)
    assert chat_template_mismatch(tok, name) is None


@pytest.mark.parametrize("family,name", [("llama3", "llama3_chat"), ("qwen2", "qwen_chat"),
                                         ("qwen2", "internlm2_chat"), ("qwen2", "minicpm3")])
def test_family_tokenizers_get_training_ids(family_tokenizers, family, name):
    """With the families' real split patterns and special markers, ids match for their templates too."""
    tok = AutoTokenizer.from_pretrained(family_tokenizers[family])
    tok.chat_template = training_chat_template(tok, name, "Be brief.")
    prompt, full = _ids_like_training(tok, name, system="Be brief.")
    assert _ids_from_chat_template(tok) == (prompt, full)
    # the config's system prompt is the default when the conversation brings none
    no_sys = [m for m in CONVO if m["role"] != "system"]
    want = encode_prompt(no_sys[:-1], tok, name, system="Be brief.")
    assert list(tok.apply_chat_template(no_sys[:-1], add_generation_prompt=True, return_dict=False)) == want
    if family == "qwen2":
        assert tok.bos_token is None and full[0] != tok.eos_token_id  # no BOS, as training


@pytest.mark.parametrize("name", sorted(DEMO_SEAM))
def test_seam_difference_is_detected_and_explained(tiny_tokenizer, name):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    tok.chat_template = training_chat_template(tok, name, None)
    prompt, full = _ids_like_training(tok, name)
    got_prompt, got_full = _ids_from_chat_template(tok)
    assert tok.decode(got_full) == tok.decode(full)  # same text ...
    assert got_full != full  # ... different ids at the seam
    note = chat_template_mismatch(tok, name)
    assert note and "each template segment on its own" in note


def _text_run(tmp_path, llm, demo_data, **model):
    from llava_ft.config import config_from_dict
    from llava_ft.engine import run_training

    raw = {
        "name": "card_run",
        "model": {"llm": llm, "llm_lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}, **model},
        "data": {"sources": [{"path": demo_data["self_cognition"], "repeat": 2}], "template": "qwen_chat",
                 "system": "You are ShapeBot.", "max_length": 128, "cache_dir": str(tmp_path / "cache")},
        "train": {"learning_rate": 1e-2, "per_device_batch_size": 2, "max_steps": 3, "save_steps": 3,
                  "logging_steps": 1, "warmup_ratio": 0.0},
        "evaluation": {"prompts": ["Who are you?"], "every_n_steps": 3, "max_new_tokens": 4},
    }
    return run_training(config_from_dict(raw), work_dir=str(tmp_path / "wd"))


def test_text_exports_carry_chat_template_and_card(tmp_path, tiny_qwen2, demo_data, monkeypatch):
    from llava_ft.convert import merge_adapter, pth_to_hf
    from llava_ft.engine.callbacks import read_train_log

    monkeypatch.setattr(sys, "argv", ["llava_ft", "train", "card_run.yaml"])
    result = _text_run(tmp_path, tiny_qwen2, demo_data)
    monkeypatch.setattr(sys, "argv", ["llava_ft", "convert", "pth_to_hf", "-", result.last_checkpoint, "out"])
    adapter = pth_to_hf(None, result.last_checkpoint, tmp_path / "adapter")
    merged = merge_adapter(tiny_qwen2, adapter, tmp_path / "merged")

    for folder in (adapter, merged):
        tok = AutoTokenizer.from_pretrained(folder)
        # system prompt from the config is the default; a system message overrides it
        assert _ids_from_chat_template(tok) == _ids_like_training(tok, "qwen_chat", system="You are ShapeBot.")
        plain = [{"role": "user", "content": "Who are you?"}]
        assert list(tok.apply_chat_template(plain, add_generation_prompt=True, return_dict=False)) == \
            encode_prompt(plain, tok, "qwen_chat", system="You are ShapeBot.")

    final_loss = read_train_log(result.work_dir)[-1]["loss"]
    stats = result.data_stats
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert card.startswith("---\n") and f"base_model: {tiny_qwen2}" in card and "library_name: peft" in card
    for want in (f"Base LLM: `{tiny_qwen2}`", "LoRA r=4 alpha=8", "Template: `qwen_chat`", "'You are ShapeBot.'",
                 f"`{demo_data['self_cognition']}`: {stats['sources'][0]['records']} records",
                 "repeated x2", f"{stats['samples']} training samples", "Recipe: `card_run`", "Steps: 3",
                 f"Final training loss: {final_loss:.4f} (step 3)", "Trained with: `llava_ft train card_run.yaml`",
                 f"Exported with: `llava_ft convert pth_to_hf - {result.last_checkpoint} out`",
                 "apply_chat_template` builds the token ids", "## Eval answers at this step", "Who are you?"):
        assert want in card, want
    merged_card = (tmp_path / "merged" / "README.md").read_text()
    assert "library_name: transformers" in merged_card and f"Merged: adapter `{adapter}`" in merged_card
    assert "Steps: 3" in merged_card and "Template: `qwen_chat`" in merged_card


def test_llava_exports_have_cards(tmp_path, tiny_llama, tiny_clip):
    from llava_ft.convert import pth_to_hf
    from llava_ft.testing.checkpoints import write_random_checkpoint

    pth = write_random_checkpoint(tmp_path / "run", {
        "name": "tiny_llava", "model": {"llm": tiny_llama, "visual_encoder": tiny_clip, "freeze_llm": True,
                                        "llm_lora": {"enabled": True, "r": 4, "alpha": 8}},
        "data": {"template": "vicuna", "sources": [{"path": "unused.json"}]}})
    for fmt in ("xtuner", "llava-hf"):
        out = pth_to_hf(None, pth, tmp_path / fmt, fmt=fmt)
        card = (tmp_path / fmt / "README.md").read_text()
        assert f"Vision tower: `{tiny_clip}`" in card and "Template: `vicuna`" in card, fmt
        assert "pipeline_tag: image-text-to-text" in card and "`unused.json`" in card
        assert ("No tokenizer in this folder" in card) == (fmt == "xtuner")
        if fmt == "llava-hf":
            tok = AutoTokenizer.from_pretrained(out)
            assert _ids_from_chat_template(tok) == _ids_like_training(tok, "vicuna")


def test_merge_of_a_foreign_adapter_gets_a_card(tmp_path, tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llava_ft.convert import merge_adapter

    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=2, target_modules=["q_proj"]))
    peft.save_pretrained(str(tmp_path / "adapter"))  # no llava_ft.json: not ours
    merged = merge_adapter(tiny_llama, tmp_path / "adapter", tmp_path / "merged")
    card = (tmp_path / "merged" / "README.md").read_text()
    assert f"Merged: adapter `{tmp_path / 'adapter'}` into base `{tiny_llama}`" in card
    assert f"base_model: {tiny_llama}" in card and "Template: unknown" in card
    # without a known training template the base tokenizer's own chat template is kept
    assert AutoTokenizer.from_pretrained(merged).chat_template == \
        AutoTokenizer.from_pretrained(tiny_llama).chat_template


def test_card_notes_a_chat_template_that_cannot_be_compared(tmp_path, tiny_tokenizer, capsys):
    """An `hf` run whose tokenizer template refuses system turns still gets its card (with a note)."""
    from llava_ft.convert.model_card import write_model_card

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + tok.chat_template)
    facts = {"llm": "base", "template": "hf", "step": 7, "recipe": "r"}
    path = write_model_card(tmp_path, {"template": "hf", "card": facts}, "hf_model", tokenizer=tok,
                            export_command="llava_ft convert x")
    card = path.read_text()
    assert "could not be compared with training" in card and "System role not supported" in card
    assert "Steps: 7" in card and "note:" in capsys.readouterr().out


def test_card_reads_losses_up_to_the_exported_step(tmp_path, tiny_llama):
    """Final loss and eval loss are the last logged at or before the exported step (a later log line, e.g.
    from a run that went on, is not this checkpoint's)."""
    from llava_ft.convert import pth_to_hf
    from llava_ft.testing.checkpoints import write_random_checkpoint

    pth = write_random_checkpoint(tmp_path / "run", {
        "name": "losses", "model": {"llm": tiny_llama, "llm_lora": LORA_SMALL},
        "data": {"template": "vicuna", "sources": [{"path": "d.json"}]}})
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 1.5}, {"step": 3, "loss": 1.25},
            {"step": 4, "loss": 0.5, "eval_loss": 0.25}]
    (tmp_path / "run" / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pth_to_hf(None, pth, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Final training loss: 1.2500 (step 3)" in card and "Eval loss: 1.5000 (step 2)" in card
    assert "Steps: 3" in card and "`d.json`" in card and "Trained with" not in card  # no run_info.json here
