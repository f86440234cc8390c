"""Build the training dataset from `cfg.data`: read sources, encode (batched), drop+count, pack, cache.

    prepared = prepare_dataset(cfg.data, tokenizer, num_image_tokens=576)
    prepared.dataset   # datasets.Dataset: id, input_ids, labels, length, modality_length, images
                       #                   (+ position_ids when packed)
    prepared.stats     # {"records", "samples", "dropped": {reason: n}, "skipped": {reason: n}, "cache_hit", ...}
    prepare_dataset(cfg.data, tokenizer, source_data=read_sources(cfg.data))   # reuse the read pass's records

Records are read by llava_ft.data.read.read_sources (the engine runs it before loading the model and passes
its result here); bad records are listed in one error, or skipped and counted as `skipped` when
`data.skip_bad_samples` is on. `dropped` counts samples encoding drops (empty answer, too long, ...).

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
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Union

import datasets
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from llava_ft.config import DataConfig, DataSource, as_data_source
from llava_ft.data import hub
from llava_ft.data.encode import encode_records
from llava_ft.data.image_tokens import ImageTokenCount, as_image_token_count
from llava_ft.data.formats import source_files
from llava_ft.data.packing import arrow_column, pack_samples
from llava_ft.data.read import SourceData, data_cache_dir, read_sources
from llava_ft.errors import UserError
from llava_ft.fileio import staging_dir
from llava_ft.templates import HF_TEMPLATE, get_template

log = logging.getLogger(__name__)

# Bump when encoding/packing output changes, so old caches are not reused.
CACHE_VERSION = 3  # 2: packing takes LLaVA data, masks each sample's first label; 3: image bytes
_BATCH = 1000
_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "input_ids": datasets.Sequence(datasets.Value("int32")),
    "labels": datasets.Sequence(datasets.Value("int32")),
    "length": datasets.Value("int32"),
    "modality_length": datasets.Value("int32"),
    "images": datasets.Sequence(datasets.Value("string")),
    # encoded bytes of images stored inside a dataset source (b"" for images given as paths); llava_ft.data.hub
    "image_bytes": datasets.Sequence(datasets.Value("binary")),
    "drop_reason": datasets.Value("string"),
})


@dataclass
class PreparedData:
    dataset: datasets.Dataset
    stats: dict = field(default_factory=dict)


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


def cache_key(data_cfg: DataConfig, tokenizer, num_image_tokens: ImageTokenCount, seed: int) -> str:
    files = []
    for src in map(as_data_source, data_cfg.sources):
        if hub.is_dataset_source(src):  # folders, parquet, Hub ids: files or the Hub fingerprint + settings
            files.append(hub.source_key(src))
        else:
            for path in source_files(src.path):
                st = os.stat(path)
                files.append((os.path.abspath(path), st.st_size, st.st_mtime_ns))
        files.append((src.format, src.image_folder and os.path.abspath(src.image_folder), src.repeat))
    key = {
        "v": CACHE_VERSION, "files": files, "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": data_cfg.template, "system": data_cfg.system, "max_length": data_cfg.max_length,
        # The fixed count, or AnyRes' settings (token counts depend on them).
        "num_image_tokens": num_image_tokens.cache_key, "truncation": data_cfg.truncation,
        "skip_bad_samples": data_cfg.skip_bad_samples, "pack": data_cfg.pack_to_max_length,
        "shuffle_before_pack": data_cfg.shuffle_before_pack, "seed": seed if data_cfg.pack_to_max_length else None,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _encode_batch(batch: dict, tokenizer, template, data_cfg: DataConfig, num_image_tokens: ImageTokenCount) -> dict:
    records = [json.loads(r) for r in batch["record"]]
    return _encode_to_columns(records, tokenizer, template, data_cfg, num_image_tokens)


def _encode_rows(batch: dict, indices: list, src: DataSource, fmt: str, tokenizer, template, data_cfg: DataConfig,
                 num_image_tokens: ImageTokenCount) -> dict:
    """A batch of a `datasets` source (llava_ft.data.hub): rows -> canonical records -> sample columns."""
    records = hub.batch_records(batch, indices, src, fmt)
    return _encode_to_columns(records, tokenizer, template, data_cfg, num_image_tokens)


def _encode_to_columns(records: list, tokenizer, template, data_cfg: DataConfig, num_image_tokens: ImageTokenCount) -> dict:
    results = encode_records(records, tokenizer, template, data_cfg.max_length, data_cfg.system,
                             num_image_tokens, data_cfg.truncation, data_cfg.skip_bad_samples)
    out = {k: [] for k in _FEATURES}
    for rec, res in zip(records, results):
        s = res.sample or {"id": str(rec["id"]), "input_ids": [], "labels": [], "length": 0,
                           "modality_length": 0, "images": []}
        for k in ("id", "input_ids", "labels", "length", "modality_length", "images"):
            out[k].append(s[k])
        out["image_bytes"].append(list(rec.get("image_data") or [b""] * len(s["images"])) if res.sample else [])
        out["drop_reason"].append(res.drop_reason or "")
    return out


def _encode_dataset_source(src: DataSource, tokenizer, template, data_cfg: DataConfig, num_image_tokens: ImageTokenCount,
                           scratch: Optional[str]):
    """Encode a `datasets` source row by row with Dataset.map (no JSON round trip; images stay bytes)."""
    ds, fmt = hub.open_source(src)
    if len(ds) == 0:
        raise UserError(f"data source '{src.path}' holds no records")
    tag = hashlib.sha256(f"{src.path}{len(ds)}{ds._fingerprint}".encode()).hexdigest()[:16]
    # Map output goes to our scratch folder (removed once the result is cached), never into the user's
    # dataset folder; without a scratch folder (use_cache=False) it stays in memory.
    files = {"cache_file_name": os.path.join(scratch, f"{tag}.arrow")} if scratch else {"keep_in_memory": True}
    encoded = ds.map(
        _encode_rows, batched=True, batch_size=_BATCH, with_indices=True, remove_columns=ds.column_names,
        features=_FEATURES, num_proc=data_cfg.num_proc if data_cfg.num_proc > 1 and len(ds) > _BATCH else None,
        fn_kwargs=dict(src=src, fmt=fmt, tokenizer=tokenizer, template=template, data_cfg=data_cfg,
                       num_image_tokens=num_image_tokens),
        new_fingerprint=tag, desc=f"tokenizing {src.path}", **files,
    )
    return _drop_marked(encoded.with_format(None), src, len(ds),
                        os.path.join(scratch, f"{tag}-kept.arrow") if scratch else None)


def _drop_marked(encoded, src: DataSource, n_records: int, cache_file_name: Optional[str] = None):
    reasons = Counter(r for r in arrow_column(encoded, "drop_reason").to_pylist() if r)
    if reasons:
        encoded = encoded.filter(lambda r: [x == "" for x in r], batched=True, input_columns=["drop_reason"],
                                 new_fingerprint=hashlib.sha256(f"f{src.path}{n_records}".encode()).hexdigest()[:16],
                                 cache_file_name=cache_file_name, keep_in_memory=cache_file_name is None)
    encoded = encoded.remove_columns(["drop_reason"])
    return encoded, n_records, reasons


def _encode_source(src: DataSource, raw: Optional[list], tokenizer, template, data_cfg: DataConfig,
                   num_image_tokens: ImageTokenCount, scratch: Optional[str] = None):
    """Encode one source: a `datasets` source row by row (`raw` None), else the records read_sources read."""
    if hub.is_dataset_source(src):
        return _encode_dataset_source(src, tokenizer, template, data_cfg, num_image_tokens, scratch)
    if not raw:  # every record was bad and skipped
        return datasets.Dataset.from_dict({k: [] for k in _FEATURES if k != "drop_reason"},
                                          features=datasets.Features({k: v for k, v in _FEATURES.items()
                                                                      if k != "drop_reason"})), 0, Counter()
    table = datasets.Dataset.from_dict({"record": raw})
    # new_fingerprint: skip datasets' hashing of the tokenizer/closure (slow, and we cache ourselves).
    encoded = table.map(
        _encode_batch, batched=True, batch_size=_BATCH, remove_columns=["record"], features=_FEATURES,
        num_proc=data_cfg.num_proc if data_cfg.num_proc > 1 and len(raw) > _BATCH else None,
        fn_kwargs=dict(tokenizer=tokenizer, template=template, data_cfg=data_cfg, num_image_tokens=num_image_tokens),
        new_fingerprint=hashlib.sha256(f"{src.path}{len(raw)}".encode()).hexdigest()[:16],
        desc=f"tokenizing {os.path.basename(src.path)}",
    )
    return _drop_marked(encoded, src, len(raw))


def _build(data_cfg: DataConfig, tokenizer, num_image_tokens: ImageTokenCount, seed: int,
           source_data: Optional[SourceData] = None, scratch: Optional[str] = None) -> PreparedData:
    template = HF_TEMPLATE if data_cfg.template == HF_TEMPLATE else get_template(data_cfg.template)
    source_data = source_data or read_sources(data_cfg)
    parts, dropped, per_source, n_records = [], Counter(), [], 0
    for src, raw in zip(map(as_data_source, data_cfg.sources), source_data.records):
        encoded, n, reasons = _encode_source(src, raw, tokenizer, template, data_cfg, num_image_tokens,
                                             scratch)
        n_records += n
        dropped += reasons
        per_source.append({"path": src.path, "records": n, "kept": len(encoded), "repeat": src.repeat,
                           "dropped": dict(reasons)})
        parts += [encoded] * src.repeat
        for reason, count in reasons.items():
            log.warning("%s: dropped %d sample(s): %s", src.path, count, reason)
    dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    skipped = source_data.skipped
    stats = {"records": n_records + sum(skipped.values()), "dropped": dict(dropped),
             "dropped_total": sum(dropped.values()), "skipped": dict(skipped),
             "skipped_total": sum(skipped.values()), "sources": per_source,
             "images_outside_folder": source_data.outside_image_folder}
    if len(dataset) == 0:
        raise UserError(f"no training samples left after encoding: {stats['records']} record(s), all dropped "
                        f"({dict(dropped)}) or skipped ({dict(skipped)}); check data.template, data.max_length "
                        "and that records have answers")
    stats["samples"] = len(dataset)
    stats["tokens"] = int(pa.compute.sum(arrow_column(dataset, "length")).as_py())
    if data_cfg.pack_to_max_length:
        dataset, stats["packing"] = pack_dataset(dataset, data_cfg, seed)
    return PreparedData(dataset, stats)


def pack_dataset(dataset: datasets.Dataset, data_cfg: DataConfig, seed: int, cache_folder: Optional[str] = None) -> tuple:
    """(packed dataset, packing stats) as `data_cfg` asks (max_length, shuffle_before_pack); see packing.py.

    Also used after data.val_split has held out samples (llava_ft.engine.validation). With `cache_folder`
    (a folder name derived from the unpacked data's cache folder and what was held out) the result is saved
    there and memory-mapped, like prepare_dataset's: packing holds the blocks in memory, and every rank of a
    large run would otherwise keep its own copy."""
    if cache_folder is None:
        return pack_samples(dataset, data_cfg.max_length, seed if data_cfg.shuffle_before_pack else None)
    stats_file = os.path.join(cache_folder, "llava_ft_stats.json")
    if os.path.isfile(stats_file):
        with open(stats_file) as fh:
            return datasets.load_from_disk(cache_folder), json.load(fh)
    prepared = PreparedData(*pack_dataset(dataset, data_cfg, seed))
    _save(prepared, cache_folder, stats_file)
    return prepared.dataset, prepared.stats


def prepare_dataset(data_cfg: DataConfig, tokenizer, num_image_tokens: Union[int, ImageTokenCount] = 0, seed: int = 42,
                    use_cache: bool = True, source_data: Optional[SourceData] = None) -> PreparedData:
    """Encode (or load from cache) every source of `data_cfg`; see the module docstring.

    `source_data`: the records read_sources already read (else they are read here on a cache miss)."""
    if not data_cfg.sources:
        raise UserError("data.sources is empty; add at least one {path: ...} entry")
    if data_cfg.template != HF_TEMPLATE:
        get_template(data_cfg.template)  # unknown name -> UserError listing the valid ones, before any work
    num_image_tokens = as_image_token_count(num_image_tokens)
    key = cache_key(data_cfg, tokenizer, num_image_tokens, seed)
    folder = os.path.join(data_cache_dir(data_cfg), key)
    stats_file = os.path.join(folder, "llava_ft_stats.json")
    if use_cache and os.path.isfile(stats_file):
        with open(stats_file) as fh:
            stats = json.load(fh)
        stats.update(cache_hit=True, cache_path=folder)
        return PreparedData(datasets.load_from_disk(folder), stats)
    if not use_cache:
        prepared = _build(data_cfg, tokenizer, num_image_tokens, seed, source_data)
        prepared.stats.update(cache_hit=False, cache_path=None)
        return prepared
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".scratch-", dir=os.path.dirname(folder))  # map output of `datasets` sources
    try:
        prepared = _build(data_cfg, tokenizer, num_image_tokens, seed, source_data, scratch)
        prepared.stats.update(cache_hit=False, cache_path=folder)
        _save(prepared, folder, stats_file)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
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
