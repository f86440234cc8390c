"""Build the preference (pair) training dataset from `cfg.data`: read, normalize, encode, drop + count, cache.

    prepared = build_preference_dataset(cfg, tokenizer, num_image_tokens=576)
    prepared.dataset   # datasets.Dataset, one row per pair: id, prompt_ids, chosen_ids, chosen_labels,
                       #   rejected_ids, rejected_labels, num_images, images, image_bytes, prompt_length,
                       #   length (prompt + chosen + rejected positions), modality_length (+/- length)
    prepared.stats     # {"records", "pairs", "dropped": {reason: n}, "skipped": {reason: n}, "cache_hit", ...}
    build_preference_dataset(cfg, tok, 576, sources=cfg.data.val_sources)   # the validation pairs

The same sources as SFT (llava_ft.data.dataset): .json / .jsonl files read by llava_ft's streaming reader,
parquet files, data folders, save_to_disk folders and Hub ids read with `datasets` (images stored inside
stay encoded bytes in `image_bytes`, as SFT's prepared data carries them, decoded lazily at training
time). Formats and the token rule: llava_ft.data.preference.

Bad pairs (a bad JSON line, identical chosen and rejected, an empty answer, a missing image file, `<image>`
markers that do not match the images, keys of another format) are listed with file, line (or row) and id
in one UserError, or skipped and counted under `skipped` with `data.skip_bad_samples: true`
(llava_ft.data.problems). Pairs the truncation rule removes are counted under `dropped`.

Cached like SFT data under `data.cache_dir` (a folder per hash of the data files, tokenizer, template,
system, max_length, max_prompt_length, image token count and skip setting), written atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from typing import Optional

import datasets

from llava_ft.config import PAIR_FORMATS, as_data_source
from llava_ft.data import hub
from llava_ft.data.dataset import PreparedData, _save, tokenizer_fingerprint
from llava_ft.data.formats import LIST_CUT, RecordError, iter_raw, rename_keys, source_files
from llava_ft.data.preference import BAD_MISSING_IMAGE, detect_pair_format, encode_pairs, missing_images, to_pair
from llava_ft.data.problems import DataProblems
from llava_ft.data.read import REASON_UNREADABLE_IMAGE, check_sources, data_cache_dir, image_memo_key
from llava_ft.errors import UserError
from llava_ft.templates import HF_TEMPLATE, get_template

log = logging.getLogger(__name__)

PAIR_CACHE_VERSION = 1
_BATCH = 500
_SEQ = datasets.Sequence(datasets.Value("int32"))
PAIR_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "prompt_ids": _SEQ, "chosen_ids": _SEQ, "chosen_labels": _SEQ, "rejected_ids": _SEQ, "rejected_labels": _SEQ,
    "num_images": datasets.Value("int32"),
    "images": datasets.Sequence(datasets.Value("string")),
    "image_bytes": datasets.Sequence(datasets.Value("binary")),  # b"" for images given as paths
    "prompt_length": datasets.Value("int32"),
    "length": datasets.Value("int32"),
    "modality_length": datasets.Value("int32"),
    # working columns, removed before the dataset is returned
    "drop_reason": datasets.Value("string"),  # why encoding dropped the pair (counted under `dropped`)
    "problem": datasets.Value("string"),  # "reason\tmessage" of a bad pair (listed / `skipped`)
})
_WORK = ("drop_reason", "problem")


def _first_row(src) -> Optional[dict]:
    """The first readable record of a source (columns mapped), or None when it has none."""
    if hub.is_dataset_source(src):
        ds = hub.map_columns(hub.load_source(src), src)
        return hub.rows_of(ds[:1])[0] if len(ds) else None
    for _, row in iter_raw(src.path, on_problem=lambda *_: None):
        return rename_keys(row, src.columns) if src.columns else row
    return None


def source_pair_format(src) -> Optional[str]:
    """The pair format of a source: its `format` if it is a pair format, the detected one for `auto` when
    the first record is a pair, else None (an SFT source)."""
    from llava_ft.data.preference import is_pair_record

    src = as_data_source(src)
    if src.format in PAIR_FORMATS:
        return src.format
    if src.format != "auto":
        return None
    row = _first_row(src)
    if row is None or not is_pair_record(row):
        return None
    return detect_pair_format(row, src.path)


def _pair_columns(rows: list, wheres: list, src, fmt: str, tokenizer, template, data_cfg, max_prompt_length,
                  num_image_tokens) -> dict:
    """Raw rows -> normalized pairs -> encoded pair columns (bad pairs marked in `problem`)."""
    base_dir = os.path.abspath(src.path) if os.path.isdir(src.path) else os.path.dirname(os.path.abspath(src.path))
    pairs, bad = [], []
    for row, where in zip(rows, wheres):
        try:
            if src.columns and not hub.is_dataset_source(src):
                row = rename_keys(row, src.columns)
            pair = to_pair(row, fmt, where, src.image_folder, base_dir)
            missing = missing_images(pair)
            if missing:
                name = where if pair["id"] == where else f"{where}: pair {pair['id']}"
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise RecordError(f"{name}: image file not found: {missing[0]}{more}", BAD_MISSING_IMAGE)
            pairs.append(pair)
            bad.append(None)
        except UserError as err:  # everything to_pair raises is about this one record
            pairs.append(None)
            bad.append((getattr(err, "reason", "malformed"), str(err)))
    good = [p for p in pairs if p is not None]
    results = iter(encode_pairs(good, tokenizer, template, data_cfg.system, data_cfg.max_length, max_prompt_length,
                                num_image_tokens))
    out = {k: [] for k in PAIR_FEATURES}
    empty = {"prompt_ids": [], "chosen_ids": [], "chosen_labels": [], "rejected_ids": [], "rejected_labels": [],
             "num_images": 0, "images": [], "prompt_length": 0, "length": 0, "modality_length": 0}
    for pair, problem, where in zip(pairs, bad, wheres):
        res = next(results) if pair is not None else None
        sample = res.sample if res is not None and res.sample is not None else dict(empty, id=pair["id"] if pair else where)
        for k in empty:
            out[k].append(sample[k])
        out["id"].append(sample["id"])
        out["image_bytes"].append(list(pair.get("image_data") or [b""] * len(sample["images"]))
                                  if res is not None and res.sample is not None else [])
        out["drop_reason"].append(res.drop_reason or "" if res is not None else "")
        out["problem"].append(f"{problem[0]}\t{problem[1]}" if problem else "")
    return out


def _json_batch(batch: dict, **kw) -> dict:
    return _pair_columns([json.loads(r) for r in batch["row"]], batch["where"], **kw)


def _dataset_batch(batch, indices: list, src, **kw) -> dict:
    return _pair_columns(hub.rows_of(batch), [f"{src.path}[#{i}]" for i in indices], src=src, **kw)


def _encode_source(src, tokenizer, template, data_cfg, max_prompt_length, num_image_tokens,
                   problems: DataProblems, scratch: Optional[str]):
    """-> (encoded dataset with working columns, number of records read)."""
    fmt = src.format if src.format in PAIR_FORMATS else None
    kw = dict(tokenizer=tokenizer, template=template, data_cfg=data_cfg, max_prompt_length=max_prompt_length,
              num_image_tokens=num_image_tokens)
    num_proc = data_cfg.num_proc if data_cfg.num_proc > 1 else None
    if hub.is_dataset_source(src):
        ds = hub.map_columns(hub.load_source(src), src)
        if len(ds) == 0:
            raise UserError(f"data source '{src.path}' holds no records")
        if fmt is None:
            fmt = detect_pair_format(hub.rows_of(ds[:1])[0], f"{src.path}[#0]")
            print(f"[llava_ft] {src.path}: format auto -> {fmt} (columns: {', '.join(ds.column_names)})", flush=True)
        tag = hashlib.sha256(f"pairs{src.path}{len(ds)}{ds._fingerprint}".encode()).hexdigest()[:16]
        files = {"cache_file_name": os.path.join(scratch, f"{tag}.arrow")} if scratch else {"keep_in_memory": True}
        encoded = ds.map(_dataset_batch, batched=True, batch_size=_BATCH, with_indices=True,
                         remove_columns=ds.column_names, features=PAIR_FEATURES,
                         num_proc=num_proc if len(ds) > _BATCH else None, new_fingerprint=tag,
                         desc=f"tokenizing pairs {src.path}", fn_kwargs=dict(src=src, fmt=fmt, **kw), **files)
        return encoded.with_format(None), len(ds)
    rows, wheres = [], []
    unreadable = problems.total
    for where, row in iter_raw(src.path, on_problem=problems.add):
        if fmt is None:
            fmt = detect_pair_format(rename_keys(row, src.columns) if src.columns else row, where)
            print(f"[llava_ft] {src.path}: format auto -> {fmt} (keys: {', '.join(row)})", flush=True)
        rows.append(json.dumps(row, ensure_ascii=False))
        wheres.append(where)
    unreadable = problems.total - unreadable  # bad JSON lines: records too, never encoded
    if not rows:
        if not unreadable:
            raise UserError(f"data file '{src.path}' holds no records")
        return datasets.Dataset.from_dict({k: [] for k in PAIR_FEATURES}, features=PAIR_FEATURES), unreadable
    table = datasets.Dataset.from_dict({"row": rows, "where": wheres})
    encoded = table.map(_json_batch, batched=True, batch_size=_BATCH, remove_columns=["row", "where"],
                        features=PAIR_FEATURES, num_proc=num_proc if len(rows) > _BATCH else None,
                        new_fingerprint=hashlib.sha256(f"pairs{src.path}{len(rows)}".encode()).hexdigest()[:16],
                        desc=f"tokenizing pairs {os.path.basename(src.path)}", fn_kwargs=dict(src=src, fmt=fmt, **kw))
    return encoded, len(rows) + unreadable


def pair_cache_key(data_cfg, sources: list, tokenizer, num_image_tokens, max_prompt_length) -> str:
    files = []
    for src in sources:
        if hub.is_dataset_source(src):
            files.append(hub.source_key(src))
        else:
            files.append([(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in source_files(src.path)])
        files.append((src.format, src.image_folder and os.path.abspath(src.image_folder), src.repeat,
                      sorted((src.columns or {}).items())))
    key = {"v": PAIR_CACHE_VERSION, "files": files, "tokenizer": tokenizer_fingerprint(tokenizer),
           "template": data_cfg.template, "system": data_cfg.system, "max_length": data_cfg.max_length,
           "max_prompt_length": max_prompt_length,
           "num_image_tokens": getattr(num_image_tokens, "cache_key", num_image_tokens),
           "skip_bad_samples": data_cfg.skip_bad_samples}
    return "pairs-" + hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _build(data_cfg, sources: list, tokenizer, num_image_tokens, max_prompt_length, check_images: bool,
           scratch: Optional[str]) -> PreparedData:
    template = HF_TEMPLATE if data_cfg.template == HF_TEMPLATE else get_template(data_cfg.template)
    problems = DataProblems(skip=data_cfg.skip_bad_samples, fatal_reasons=frozenset({LIST_CUT}))
    parts, per_source, dropped, n_records = [], [], Counter(), 0
    for src in sources:
        encoded, n = _encode_source(src, tokenizer, template, data_cfg, max_prompt_length, num_image_tokens,
                                    problems, scratch)
        n_records += n
        for item in encoded.select_columns(["problem"]).to_list() if len(encoded) else []:
            if item["problem"]:
                reason, message = item["problem"].split("\t", 1)
                problems.add(reason, message)
        reasons = Counter(r for r in encoded["drop_reason"] if r) if len(encoded) else Counter()
        dropped += reasons
        kept = encoded.filter(lambda d, p: [not a and not b for a, b in zip(d, p)], batched=True,
                              input_columns=list(_WORK), keep_in_memory=True) if len(encoded) else encoded
        kept = kept.remove_columns(list(_WORK))
        for reason, count in reasons.items():
            log.warning("%s: dropped %d pair(s): %s", src.path, count, reason)
        per_source.append({"path": src.path, "records": n, "kept": len(kept), "repeat": src.repeat,
                           "dropped": dict(reasons)})
        parts += [kept] * src.repeat
    if check_images and not data_cfg.skip_bad_samples:
        import itertools

        from llava_ft.data.images import verify_images

        # All sources in one check, so the memo of verdicts (image_check_memo) covers every image of the run.
        rows = itertools.chain.from_iterable(part.select_columns(["id", "images", "image_bytes"])
                                             for part in {id(p): p for p in parts}.values())
        for problem in verify_images(rows, memo_dir=data_cache_dir(data_cfg), memo_key=image_memo_key(data_cfg)):
            problems.add(REASON_UNREADABLE_IMAGE, str(problem))
    problems.finish("bad pair(s) in the preference data")
    dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    skipped = dict(problems.counts)
    stats = {"records": n_records, "pairs": len(dataset), "dropped": dict(dropped),
             "dropped_total": sum(dropped.values()), "skipped": skipped, "skipped_total": sum(skipped.values()),
             "sources": per_source, "max_prompt_length": max_prompt_length}
    if len(dataset) == 0:
        raise UserError(f"no preference pairs left: {n_records} record(s), all dropped ({dict(dropped)}) or "
                        f"skipped ({skipped}); check data.max_length / preference.max_prompt_length and the data")
    return PreparedData(dataset, stats)


def build_preference_dataset(cfg, tokenizer, num_image_tokens=0, seed: int = 42, use_cache: bool = True,
                             sources: Optional[list] = None, check_images: Optional[bool] = None) -> PreparedData:
    """Encode (or load from the cache) the pair sources of `cfg` (a Config); see the module docstring.

    `sources`: other data.sources entries than cfg.data.sources (e.g. cfg.data.val_sources).
    `check_images`: PIL-verify every image first (default: for LLaVA runs without skip_bad_samples)."""
    del seed  # pairs are not packed or shuffled here; kept for the same call shape as prepare_dataset
    data_cfg = cfg.data
    sources = [as_data_source(s) for s in (data_cfg.sources if sources is None else sources)]
    if not sources:
        raise UserError("data.sources is empty; add at least one {path: ...} entry of preference pairs")
    check_sources(type(data_cfg)(sources=sources))
    if data_cfg.template != HF_TEMPLATE:
        get_template(data_cfg.template)
    pref = getattr(cfg, "preference", None)
    max_prompt_length = getattr(pref, "max_prompt_length", None) or data_cfg.max_length // 2
    if check_images is None:
        check_images = bool(getattr(cfg, "is_llava", False))
    if not use_cache:
        prepared = _build(data_cfg, sources, tokenizer, num_image_tokens, max_prompt_length, check_images, None)
        prepared.stats.update(cache_hit=False, cache_path=None)
        return prepared
    key = pair_cache_key(data_cfg, sources, tokenizer, num_image_tokens, max_prompt_length)
    folder = os.path.join(data_cache_dir(data_cfg), key)
    stats_file = os.path.join(folder, "llava_ft_stats.json")
    if os.path.isfile(stats_file):
        with open(stats_file) as fh:
            stats = json.load(fh)
        stats.update(cache_hit=True, cache_path=folder)
        return PreparedData(datasets.load_from_disk(folder), stats)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".scratch-", dir=os.path.dirname(folder))
    try:
        prepared = _build(data_cfg, sources, tokenizer, num_image_tokens, max_prompt_length, check_images, scratch)
        prepared.stats.update(cache_hit=False, cache_path=folder)
        _save(prepared, folder, stats_file)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return prepared
