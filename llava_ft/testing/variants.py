"""Variants of a tiny model folder for tests: another context length, or end-of-turn words as single tokens.

    short = with_context(tiny_llama, tmp / "short", 96)              # config + tokenizer say 96 positions
    llm = with_special_tokens(tiny_llama, tmp / "llm", ["<|im_end|>"])   # <|im_end|> is one (added) token

Both copy the folder, never touch the source (session fixtures are shared). `with_context` sets
`max_position_embeddings` and the tokenizer's `model_max_length`, so `ChatModel.context_length` is the given
number. `with_special_tokens` adds the words as special tokens, as Qwen/InternLM2/Llama-3 tokenizers have
them, and resizes the embeddings to hold them (new rows random, as transformers initialises them).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def with_context(model_dir, out_dir, n_positions: int) -> str:
    out = Path(out_dir)
    shutil.copytree(model_dir, out)
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        path = out / name
        cfg = json.loads(path.read_text(encoding="utf-8"))
        cfg[key] = int(n_positions)
        path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return str(out)


def with_special_tokens(model_dir, out_dir, tokens, seed: int = 0) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.add_special_tokens({"additional_special_tokens": list(tokens)})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)
