"""Write a Llama-layout export back in InternLM2's own layout (`convert ... --layout internlm2`).

    save_internlm2_layout(export_dir, base=internlm2_folder)   # rewrite the export in place

Fused/renamed shards (`internlm2_convert.to_internlm2_state`, bit for bit), the base folder's own
config.json with the sizes the export may have changed, and its auto_map code / tokenizer files beside the
weights, so the export drops into InternLM's and XTuner's tools.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from llava_ft import fileio
from llava_ft.errors import UserError
from llava_ft.model.internlm2_convert import (MARKER, WEIGHT_SUFFIXES, convert_shards, to_internlm2_state,
                                              weight_files)
from llava_ft.model.internlm2_detect import is_internlm2, read_config


def internlm2_config_from_llama(llama: dict, base: dict) -> dict:
    """The base InternLM2 config.json with what a Llama-layout export may have changed written back."""
    out = dict(base)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        if key in llama:
            out[key] = llama[key]
    dtype = llama.get("dtype") or llama.get("torch_dtype")
    if dtype:
        out["torch_dtype"] = dtype
    out.pop("dtype", None)
    return out


def _iter_base_extras(base: Path) -> Iterator[Path]:
    """Files of the base folder an InternLM2-layout export carries over: its code (auto_map *.py),
    tokenizer files and generation config -- everything but weights, index and config.json."""
    for p in sorted(base.iterdir()):
        if not p.is_file() or p.name == "config.json" or p.name.startswith("."):
            continue
        if p.name.endswith(WEIGHT_SUFFIXES + (".index.json",)) or p.name in (MARKER, "llava_ft.json"):
            continue
        yield p


def save_internlm2_layout(folder, base) -> None:
    """Rewrite a Llama-layout model folder (written by save_pretrained) in place into InternLM2's layout:
    fused/renamed safetensors shards, the base's config.json with sizes updated, and the base's code and
    tokenizer files (its auto_map) copied in. `base` is the original InternLM2 folder."""
    folder, base = Path(folder), Path(base)
    if not is_internlm2(base):
        raise UserError(f"--layout internlm2 needs an InternLM2 base (config.json model_type internlm2); "
                        f"{base} is not one. Use the default --layout llama")
    llama_cfg = read_config(folder)
    base_cfg = read_config(base)
    files, index_name = weight_files(folder)
    pending: dict = {}
    staged = Path(tempfile.mkdtemp(dir=folder, prefix=".internlm2."))
    try:
        convert_shards(folder, staged, files,
                        lambda state: to_internlm2_state(state, llama_cfg, pending))
        if pending:
            raise UserError(f"{folder}: q/k/v projections of {len(pending)} layer(s) are incomplete; "
                            "the export is not a whole Llama model")
        for name in files + ([index_name] if index_name else []):
            (folder / name).unlink()
        fileio.follow_umask(staged)  # safetensors writes its shards 0600
        for p in staged.iterdir():
            os.replace(p, folder / p.name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    for extra in _iter_base_extras(base):
        shutil.copyfile(extra, folder / extra.name)
    # tokenizer.json / tokenizer_config.json of the converted fast tokenizer would shadow the base's own
    # (sentencepiece) tokenizer in InternLM's tools: the base's files replace them above; drop the rest.
    if not (base / "tokenizer.json").is_file() and (folder / "tokenizer.json").is_file():
        (folder / "tokenizer.json").unlink()
    fileio.write_json(folder / "config.json", internlm2_config_from_llama(llama_cfg, base_cfg))
