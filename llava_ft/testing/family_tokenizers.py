"""Tiny tokenizers that split text the way real model families do (for prompt/ids tests; nothing downloaded).

    path = build_family_tokenizer(tmp / "llama3_tok", "llama3")   # Llama-3-style: its split regex, specials
    path = build_family_tokenizer(tmp / "qwen2_tok", "qwen2")     # Qwen2-style: ChatML markers special, no BOS

Whether `tokenizer.apply_chat_template` reproduces XTuner's per-segment ids depends on how the tokenizer
pre-splits text and which template markers are special tokens. The demo tokenizer (GPT-2 byte-level split,
markers as plain text) differs from the real families there, so tests that make claims about Llama-3 or
Qwen2 models use these: byte-level BPE trained on the demo text, with the family's published split pattern
and its chat markers as special tokens.
"""
from __future__ import annotations

from llava_ft import fileio
from llava_ft.demo.assets import demo_texts

# The pre-tokenizer split patterns of the Llama-3 and Qwen2 tokenizer.json files (public configuration).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

FAMILIES = {
    "llama3": dict(split=_LLAMA3_SPLIT, bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|end_of_text|>",
                   markers=["<|start_header_id|>", "<|end_header_id|>"]),
    "qwen2": dict(split=_QWEN2_SPLIT, bos=None, eos="<|im_end|>", pad="<|endoftext|>", markers=["<|im_start|>"]),
}


def _template_texts() -> list:
    """Conversations in every template, so BPE learns merges across template seams (e.g. '\\n\\nBlue')."""
    from llava_ft.templates import TEMPLATES, conversation_turns

    convo = [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "Blue."},
             {"role": "user", "content": "And grass?"}, {"role": "assistant", "content": "Green, mostly."}]
    texts = []
    for t in TEMPLATES.values():
        # The text of each turn as training lays it out (system + instruction, output + SUFFIX, SEP).
        texts.append("".join(t.format_system(turn["system"]) + t.format_instruction(turn["input"], turn["round"])
                             + (turn["output"] or "") + t.suffix + t.sep
                             for turn in conversation_turns(convo, "You answer briefly.")))
    return texts * 20


def build_family_tokenizer(out_dir, family: str, vocab_size: int = 600) -> str:
    """Save a byte-level BPE tokenizer with `family`'s split pattern and special tokens; returns its folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    specials = [t for t in (spec["bos"], spec["eos"], spec["pad"], *spec["markers"]) if t]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec["split"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(demo_texts() + _template_texts(), trainer=trainer)
    names = {"eos_token": spec["eos"], "pad_token": spec["pad"]}
    if spec["bos"]:
        names["bos_token"] = spec["bos"]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=spec["markers"], **names)
    fast.model_max_length = 2048
    tmp = fileio.staging_dir(out_dir)  # saved whole, then renamed into place
    fast.save_pretrained(str(tmp))
    return fileio.publish_dir(tmp, out_dir)
