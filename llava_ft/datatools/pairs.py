"""`data check` and `data stats` for preference pair files (llava_ft.data.preference's formats).

    fmt = pair_format(src)                           # None for an SFT source
    refs = check_pair_source(src, fmt, plan, tokenizer, report)  # adds Problems to a CheckReport; -> image paths
    add_pair_stats(src, fmt, plan, tokenizer, stats)                # prompt / chosen / rejected lengths

Pairs are read and normalized by the code training uses (llava_ft.data.preference.to_pair), so every
problem training would stop on is found here with its file, line (row for `datasets` sources) and id:
identical_answers, empty_answer, image_count_mismatch, prompt_not_user_last, prompt_mismatch, malformed,
invalid_json, missing_image / unreadable_image / truncated_image; duplicate_id (warning). With a tokenizer
and max_length: `dropped` (error: a prompt that the truncation rule cannot cut without cutting an image)
and `too_long` (warning: a prompt cut from the left, or answers cut from the right).
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

from llava_ft.data.images import image_problem
from llava_ft.data.preference import encode_pairs, to_pair
from llava_ft.datatools.sources import Problem
from llava_ft.errors import UserError

_BATCH = 512
_UNBOUNDED = 1 << 40
_KIND = {"image_marker_mismatch": "image_count_mismatch"}  # the word `data check` already uses for SFT


def pair_format(src) -> Optional[str]:
    """The pair format of a datatools/config source, or None when its records are not pairs."""
    from llava_ft.config import DataSource
    from llava_ft.data.preference_dataset import source_pair_format

    if not isinstance(src, DataSource):
        src = DataSource(path=src.path, format=src.format, image_folder=src.image_folder)
    return source_pair_format(src)


def _iter_rows(src) -> Iterator[tuple]:
    """(line, raw row or a Problem) for every record of a source; bad JSON lines come as Problems."""
    from llava_ft.config import DataSource
    from llava_ft.data import hub
    from llava_ft.data.formats import rename_keys
    from llava_ft.data.jsonio import iter_raw

    src = src if isinstance(src, DataSource) else DataSource(path=src.path, format=src.format,
                                                             image_folder=src.image_folder)
    if hub.is_dataset_source(src):
        ds = hub.map_columns(hub.load_source(src), src)
        for index, row in enumerate(hub.iter_rows(ds)):
            yield index + 1, f"{src.path}[#{index}]", row
        return
    problems: list = []

    def on_error(p) -> None:
        lost = "; nothing after it in this JSON list can be read" if p.stops else ""
        problems.append(Problem(p.kind, "error", p.message + lost, src.path, p.line))

    for raw in iter_raw(src.path, on_error=on_error):
        while problems:
            yield problems[0].line, None, problems.pop(0)
        value = rename_keys(raw.value, src.columns) if src.columns and isinstance(raw.value, dict) else raw.value
        yield raw.line, f"{src.path}:{raw.line}", value
    for p in problems:
        yield p.line, None, p


def _pairs(src, fmt: str, on_problem) -> Iterator[tuple]:
    """(line, id, pair) for every good pair of a source; bad ones go to on_problem(Problem)."""
    base_dir = os.path.abspath(src.path) if os.path.isdir(src.path) else os.path.dirname(os.path.abspath(src.path))
    for line, where, row in _iter_rows(src):
        if isinstance(row, Problem):
            on_problem(row)
            continue
        rid = next((str(row[k]) for k in ("id", "idx") if isinstance(row, dict) and row.get(k) not in (None, "")),
                   None)
        try:
            pair = to_pair(row, fmt, where, src.image_folder, base_dir)
        except UserError as err:
            message = str(err).removeprefix(where + ": ").removeprefix(f"pair {rid}: ")
            kind = getattr(err, "reason", "malformed")
            on_problem(Problem(_KIND.get(kind, kind), "error", message, src.path, line, rid))
            continue
        yield line, rid, pair


def _encode(pairs: list, tokenizer, plan) -> list:
    """True lengths: no truncation (both limits unbounded)."""
    return encode_pairs(pairs, tokenizer, plan.template, plan.system, _UNBOUNDED, _UNBOUNDED - 1,
                        plan.num_image_tokens)


def _max_prompt_length(plan) -> Optional[int]:
    if not plan.max_length:
        return None
    return getattr(plan, "max_prompt_length", None) or plan.max_length // 2


def check_pair_source(src, fmt: str, plan, tokenizer, report) -> dict:
    """Add the problems of one pair source to `report` (a llava_ft.datatools.check.CheckReport); returns
    {image path: [(line, id)]} for the caller's image check (check.check_image_refs)."""
    seen: dict = {}
    image_refs: dict = {}
    pending: list = []
    limit = _max_prompt_length(plan)

    def flush() -> None:
        for (line, rid, _), res in zip(pending, _encode([p for _, _, p in pending], tokenizer, plan)):
            if res.sample is None:
                report.problems.append(Problem("dropped", "warning", f"training would drop it: {res.drop_reason}",
                                               src.path, line, rid))
                continue
            s = res.sample
            if s["prompt_length"] > limit:
                if s["num_images"]:
                    report.problems.append(Problem(
                        "dropped", "error", f"prompt of {s['prompt_length']} positions (images expanded) > "
                        f"max_prompt_length {limit}; it cannot be cut from the left without cutting an image, so "
                        "the pair is dropped (raise preference.max_prompt_length)", src.path, line, rid))
                    continue
                report.problems.append(Problem("too_long", "warning", f"prompt of {s['prompt_length']} tokens > "
                                               f"max_prompt_length {limit}; it will be cut from the left",
                                               src.path, line, rid))
            answer = max(len(s["chosen_ids"]), len(s["rejected_ids"]))
            if min(s["prompt_length"], limit) + answer > plan.max_length:
                report.problems.append(Problem("too_long", "warning", f"prompt + longer answer = "
                                               f"{min(s['prompt_length'], limit) + answer} > max_length "
                                               f"{plan.max_length}; the answers will be cut from the right",
                                               src.path, line, rid))
        pending.clear()

    def on_problem(problem: Problem) -> None:
        report.records += problem.kind not in ("invalid_json", "not_utf8")
        report.problems.append(problem)

    for line, rid, pair in _pairs(src, fmt, on_problem):
        report.records += 1
        if rid is not None:
            if rid in seen:
                report.problems.append(Problem("duplicate_id", "warning", f"id {rid!r} already used on line "
                                               f"{seen[rid]}", src.path, line, rid))
            else:
                seen[rid] = line
        blobs = pair.get("image_data") or [b""] * len(pair["images"])
        for image, blob in zip(pair["images"], blobs):
            if blob:
                found = image_problem(blob)  # the check training runs (end marker included)
                if found is not None:
                    kind, reason = found
                    report.problems.append(Problem(kind, "error", f"{image}: {reason}", src.path, line, rid))
            else:
                image_refs.setdefault(image, []).append((line, rid))
        if tokenizer is not None:
            pending.append((line, rid, pair))
            if len(pending) >= _BATCH:
                flush()
    if tokenizer is not None and pending:
        flush()
    return image_refs


def add_pair_stats(src, fmt: str, plan, tokenizer, stats) -> None:
    """Add one pair source's counts and lengths to `stats` (llava_ft.datatools.stats.Stats)."""
    pending: list = []

    def skip(problem) -> None:
        stats.skipped += 1

    def flush() -> None:
        for pair, res in zip(pending, _encode(pending, tokenizer, plan)):
            if res.sample is None:
                stats.dropped[res.drop_reason] = stats.dropped.get(res.drop_reason, 0) + 1
                continue
            s = res.sample
            stats.prompt_lengths.append(s["prompt_length"])
            stats.chosen_lengths.append(len(s["chosen_ids"]))
            stats.rejected_lengths.append(len(s["rejected_ids"]))
            stats.full_lengths.append(s["length"])
            stats.text_lengths.append(s["length"] - s["prompt_length"] + len(s["prompt_ids"]) - s["num_images"])
            limit = _max_prompt_length(plan)
            if plan.max_length and (s["prompt_length"] > limit or s["prompt_length"] + max(
                    len(s["chosen_ids"]), len(s["rejected_ids"])) > plan.max_length):
                stats.over_max_length += 1
        pending.clear()

    for _, _, pair in _pairs(src, fmt, skip):
        stats.pairs += 1
        stats.count_record(len(pair["images"]))
        stats.turns += sum(m["role"] == "assistant" for m in pair["messages"]) + 1
        pending.append(pair)
        if len(pending) >= _BATCH:
            flush()
    if pending:
        flush()
