"""Build the training dataset from `cfg.data`: read sources, encode (batched), drop+count, pack, cache.

    prepared = prepare_dataset(cfg.data, tokenizer, num_image_tokens=576)
    prepared.dataset   # datasets.Dataset: id, input_ids, labels, length, modality_length, images
                       #                   (+ position_ids when packed)
    prepared.stats     # {"records", "samples", "dropped": {reason: n}, "cache_hit", ...}

The result is saved under `data.cache_dir` (default ~/.cache/llava_ft/datasets, env LLAVA_FT_CACHE)
in a folder named by a hash of everything that changes it: each data file's path+size+mtime, format,
image_folder, repeat, the tokenizer (vocab/normalizer/special tokens/chat template), template, system,
max_length, num_image_tokens, truncation, skip_bad_samples, packing (+ seed). A second run with the same
inputs memory-maps the cached Arrow files instead of re-tokenizing. Folders are written to a temp name
and `os.replace`d, so a killed run never leaves a half cache that a later run would trust.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import datasets
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from llava_ft.config import DataConfig, DataSource, as_data_source
from llava_ft.data.encode import encode_records
from llava_ft.data.formats import iter_records, source_files
from llava_ft.data.packing import arrow_column, pack_samples
from llava_ft.errors import UserError
from llava_ft.fileio import staging_dir
from llava_ft.templates import HF_TEMPLATE, get_template

log = logging.getLogger(__name__)

# Bump when encoding/packing output changes, so old caches are not reused.
CACHE_VERSION = 2  # 2: packing takes LLaVA data, masks each sample's first label
_BATCH = 1000
_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "input_ids": datasets.Sequence(datasets.Value("int32")),
    "labels": datasets.Sequence(datasets.Value("int32")),
    "length": datasets.Value("int32"),
    "modality_length": datasets.Value("int32"),
    "images": datasets.Sequence(datasets.Value("string")),
    "drop_reason": datasets.Value("string"),
})


@dataclass
class PreparedData:
    dataset: datasets.Dataset
    stats: dict = field(default_factory=dict)


def default_cache_dir() -> str:
    return os.environ.get("LLAVA_FT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llava_ft", "datasets")


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides token ids: vocab/merges/normalizer (fast tokenizers), specials, chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: its vocab is what it has
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                   getattr(tokenizer, "chat_template", None), len(tokenizer))).encode())
    return h.hexdigest()


def cache_key(data_cfg: DataConfig, tokenizer, num_image_tokens: int, seed: int) -> str:
    files = []
    for src in map(as_data_source, data_cfg.sources):
        for path in source_files(src.path):
            st = os.stat(path)
            files.append((os.path.abspath(path), st.st_size, st.st_mtime_ns))
        files.append((src.format, src.image_folder and os.path.abspath(src.image_folder), src.repeat))
    key = {
        "v": CACHE_VERSION, "files": files, "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": data_cfg.template, "system": data_cfg.system, "max_length": data_cfg.max_length,
        # An int, or an AnyRes counter whose cache_key names its settings (token counts depend on them).
        "num_image_tokens": getattr(num_image_tokens, "cache_key", num_image_tokens), "truncation": data_cfg.truncation,
        "skip_bad_samples": data_cfg.skip_bad_samples, "pack": data_cfg.pack_to_max_length,
        "shuffle_before_pack": data_cfg.shuffle_before_pack, "seed": seed if data_cfg.pack_to_max_length else None,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _encode_batch(batch: dict, tokenizer, template, data_cfg: DataConfig, num_image_tokens: int) -> dict:
    records = [json.loads(r) for r in batch["record"]]
    results = encode_records(records, tokenizer, template, data_cfg.max_length, data_cfg.system,
                             num_image_tokens, data_cfg.truncation, data_cfg.skip_bad_samples)
    out = {k: [] for k in _FEATURES}
    for rec, res in zip(records, results):
        s = res.sample or {"id": str(rec["id"]), "input_ids": [], "labels": [], "length": 0,
                           "modality_length": 0, "images": []}
        for k in ("id", "input_ids", "labels", "length", "modality_length", "images"):
            out[k].append(s[k])
        out["drop_reason"].append(res.drop_reason or "")
    return out


def _encode_source(src: DataSource, tokenizer, template, data_cfg: DataConfig, num_image_tokens: int):
    raw = [json.dumps(r, ensure_ascii=False) for r in iter_records(src)]
    if not raw:
        raise UserError(f"data file '{src.path}' holds no records")
    table = datasets.Dataset.from_dict({"record": raw})
    # new_fingerprint: skip datasets' hashing of the tokenizer/closure (slow, and we cache ourselves).
    encoded = table.map(
        _encode_batch, batched=True, batch_size=_BATCH, remove_columns=["record"], features=_FEATURES,
        num_proc=data_cfg.num_proc if data_cfg.num_proc > 1 and len(raw) > _BATCH else None,
        fn_kwargs=dict(tokenizer=tokenizer, template=template, data_cfg=data_cfg, num_image_tokens=num_image_tokens),
        new_fingerprint=hashlib.sha256(f"{src.path}{len(raw)}".encode()).hexdigest()[:16],
        desc=f"tokenizing {os.path.basename(src.path)}",
    )
    reasons = Counter(r for r in arrow_column(encoded, "drop_reason").to_pylist() if r)
    if reasons:
        encoded = encoded.filter(lambda r: [x == "" for x in r], batched=True, input_columns=["drop_reason"],
                                 new_fingerprint=hashlib.sha256(f"f{src.path}{len(raw)}".encode()).hexdigest()[:16])
    encoded = encoded.remove_columns(["drop_reason"])
    return encoded, len(raw), reasons


def _build(data_cfg: DataConfig, tokenizer, num_image_tokens: int, seed: int) -> PreparedData:
    template = HF_TEMPLATE if data_cfg.template == HF_TEMPLATE else get_template(data_cfg.template)
    parts, dropped, per_source, n_records = [], Counter(), [], 0
    for src in map(as_data_source, data_cfg.sources):
        encoded, n, reasons = _encode_source(src, tokenizer, template, data_cfg, num_image_tokens)
        n_records += n
        dropped += reasons
        per_source.append({"path": src.path, "records": n, "kept": len(encoded), "repeat": src.repeat,
                           "dropped": dict(reasons)})
        parts += [encoded] * src.repeat
        for reason, count in reasons.items():
            log.warning("%s: dropped %d sample(s): %s", src.path, count, reason)
    dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    stats = {"records": n_records, "dropped": dict(dropped), "dropped_total": sum(dropped.values()),
             "sources": per_source}
    if len(dataset) == 0:
        raise UserError(f"no training samples left after encoding: {n_records} record(s), all dropped "
                        f"({dict(dropped)}); check data.template, data.max_length and that records have answers")
    stats["samples"] = len(dataset)
    stats["tokens"] = int(pa.compute.sum(arrow_column(dataset, "length")).as_py())
    if data_cfg.pack_to_max_length:
        dataset, pstats = pack_samples(dataset, data_cfg.max_length, seed if data_cfg.shuffle_before_pack else None)
        stats["packing"] = pstats
    return PreparedData(dataset, stats)


def prepare_dataset(data_cfg: DataConfig, tokenizer, num_image_tokens: int = 0, seed: int = 42,
                    use_cache: bool = True) -> PreparedData:
    """Encode (or load from cache) every source of `data_cfg`; see the module docstring."""
    if not data_cfg.sources:
        raise UserError("data.sources is empty; add at least one {path: ...} entry")
    if data_cfg.template != HF_TEMPLATE:
        get_template(data_cfg.template)  # unknown name -> UserError listing the valid ones, before any work
    key = cache_key(data_cfg, tokenizer, num_image_tokens, seed)
    folder = os.path.join(data_cfg.cache_dir or default_cache_dir(), key)
    stats_file = os.path.join(folder, "llava_ft_stats.json")
    if use_cache and os.path.isfile(stats_file):
        with open(stats_file) as fh:
            stats = json.load(fh)
        stats.update(cache_hit=True, cache_path=folder)
        return PreparedData(datasets.load_from_disk(folder), stats)
    prepared = _build(data_cfg, tokenizer, num_image_tokens, seed)
    prepared.stats.update(cache_hit=False, cache_path=folder if use_cache else None)
    if use_cache:
        _save(prepared, folder, stats_file)
    return prepared


def _save(prepared: PreparedData, folder: str, stats_file: str) -> None:
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = staging_dir(folder)  # the cache folder gets the umask's mode, like every output
    try:
        prepared.dataset.save_to_disk(tmp)
        with open(os.path.join(tmp, os.path.basename(stats_file)), "w") as fh:
            json.dump({k: v for k, v in prepared.stats.items() if k not in ("cache_hit", "cache_path")}, fh)
        if os.path.isdir(folder):  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Reopen from the cache so the returned dataset is memory-mapped, like on a cache hit.
    prepared.dataset = datasets.load_from_disk(folder)
