"""Find what would break or silently weaken training: `llava_ft data check (CONFIG | --data F ...)`.

Problem kinds (severity error unless noted):
  invalid_json        a line (JSONL) or position (JSON list) that is not valid JSON
  not_utf8            a line or record with a byte that is not UTF-8 (the message gives the byte offset)
  malformed           a record the parser rejects (wrong keys/types, unknown role)
  empty_conversation  no messages, no assistant turn, or an empty answer
  roles_out_of_order  turns not (system?) user, assistant, user, assistant, ... (system, assistant greeting,
                      user, ... is fine: XTuner and training keep the greeting as a turn of its own)
  image_count_mismatch  `<image>` markers in the text != images of the record
                      (images with no marker at all: warning, they are put at the start of the first turn)
  duplicate_id        (warning) an id seen before (the message names the first line)
  missing_image / unreadable_image / truncated_image
  image_outside_folder  (warning) an image path that leaves the source's image_folder (`../x.png`, an
                      absolute path); training uses it as given and prints how many there are
  too_long            longer than max_length after image expansion (error for image samples, which are
                      dropped; warning for text-only ones, which are cut). Needs a tokenizer.
  dropped             (warning) a sample the encoder would drop for another reason
Preference pair files (any llava_ft.data.preference format, detected like training does) are checked by
llava_ft.datatools.pairs: identical_answers, empty_answer, image_count_mismatch, prompt_not_user_last, ...
Images (files, in a thread pool, and images stored inside a dataset) get the check training runs,
`llava_ft.data.images.image_problem`: PIL `verify()`, which reads without decoding pixels, and a full
decode where the end marker is missing (PNG must end with IEND, JPEG with EOI).
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from llava_ft import IMAGE_TOKEN
from llava_ft.data import hub
from llava_ft.data.images import image_problem
from llava_ft.data.read import outside_folder
from llava_ft.fileio import write_json
from llava_ft.datatools.sources import Plan, Problem, as_dict, encode_lengths, iter_canonical, load_tokenizer
from llava_ft.errors import UserError

_ENCODE_BATCH = 512


@dataclass
class CheckReport:
    records: int = 0
    files: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # list[Problem]
    lengths_checked: bool = False

    @property
    def errors(self) -> int:
        return sum(p.severity == "error" for p in self.problems)

    @property
    def warnings(self) -> int:
        return sum(p.severity == "warning" for p in self.problems)

    def counts(self) -> dict:
        return dict(Counter(p.kind for p in self.problems))

    def to_json(self) -> dict:
        return {"files": self.files, "records": self.records, "errors": self.errors, "warnings": self.warnings,
                "lengths_checked": self.lengths_checked, "counts": self.counts(),
                "problems": [as_dict(p) for p in self.problems]}


def check_image_file(path: str) -> Optional[tuple[str, str]]:
    """(kind, message) for a missing, truncated or unreadable image file; None when it is fine.

    The check training runs (llava_ft.data.images.image_problem), with the path in the message.
    """
    found = image_problem(path)
    return None if found is None else (found[0], f"{path}: {found[1]}")


def _conversation_problems(record: dict) -> list[tuple[str, str, str]]:
    """(kind, severity, message) for the structure of one canonical chat record."""
    out = []
    messages = record["messages"]
    if not messages:
        return [("empty_conversation", "error", "no messages")]
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    if roles[0] == "system" and body[:2] == ["assistant", "user"]:
        body = body[1:]  # a greeting after the system prompt: trained as a turn with an empty input (XTuner)
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if "system" in body or body != expected[: len(body)] or not body or body[-1] != "assistant":
        out.append(("roles_out_of_order", "error",
                    f"roles {roles}; expected an optional system turn, then user/assistant alternating, "
                    "ending with assistant"))
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        out.append(("empty_conversation", "error", "no assistant turn: nothing to learn from"))
    elif any(not m["content"].strip() for m in answers):
        out.append(("empty_conversation", "error", "an assistant turn is empty"))
    markers = sum(m["content"].count(IMAGE_TOKEN) for m in messages if m["role"] == "user")
    markers_elsewhere = sum(m["content"].count(IMAGE_TOKEN) for m in messages if m["role"] != "user")
    n_images = len(record.get("images") or [])
    if markers_elsewhere:
        out.append(("image_count_mismatch", "error",
                    f"{markers_elsewhere} '<image>' marker(s) outside user turns; move them into a user turn"))
    if markers and markers != n_images:
        out.append(("image_count_mismatch", "error",
                    f"{markers} '<image>' marker(s) in the text but {n_images} image(s)"))
    elif n_images and not markers:
        out.append(("image_count_mismatch", "warning",
                    f"{n_images} image(s) but no '<image>' marker; training puts them at the start of the first turn"))
    return out


def check_data(plan: Plan, workers: int = 8, progress: bool = False) -> CheckReport:
    """Check every source of `plan`; returns the report (never raises for problems found in the data)."""
    from tqdm import tqdm

    report = CheckReport(files=[s.path for s in plan.sources])
    tokenizer = load_tokenizer(plan.tokenizer) if plan.tokenizer and plan.max_length else None
    report.lengths_checked = tokenizer is not None
    for src in plan.sources:
        if not os.path.isfile(src.path) and not hub.is_dataset_source(_as_source(src)):
            raise UserError(f"data file '{src.path}' does not exist")
        if src.image_folder is not None and not os.path.isdir(src.image_folder):
            raise UserError(f"image folder '{src.image_folder}' is not a folder; fix --image-folder or the "
                            "config's data.sources[].image_folder")
        from llava_ft.datatools.pairs import check_pair_source, pair_format

        fmt = pair_format(src)
        if fmt is not None:
            check_image_refs(check_pair_source(src, fmt, plan, tokenizer, report), src.path, report, workers)
            continue
        seen: dict[str, int] = {}
        image_refs: dict[str, list] = {}  # image path -> [(line, id)] that use it
        pending: list = []

        def on_problem(problem: Problem) -> None:
            report.problems.append(problem)
            report.records += problem.kind == "malformed"  # a record, though not one the parser accepts

        def flush() -> None:
            results = encode_lengths([it.record for it in pending], tokenizer, plan)
            for it, res in zip(pending, results):
                rid = it.record["id"] if it.raw.value.get("id") not in (None, "") else None
                if res.sample is None:
                    if res.drop_reason == "too_long_with_images":
                        continue  # cannot happen with an unbounded max_length; kept for safety
                    report.problems.append(Problem("dropped", "warning", f"training would drop it: {res.drop_reason}",
                                                   src.path, it.raw.line, rid))
                    continue
                length = res.sample["length"]
                if length > plan.max_length:
                    has_images = bool(res.sample["images"])
                    report.problems.append(Problem(
                        "too_long", "error" if has_images else "warning",
                        f"{length} tokens after image expansion > max_length {plan.max_length}"
                        + ("; image samples this long are dropped (or set data.truncation=cut_text)" if has_images
                           else "; it will be cut at max_length"), src.path, it.raw.line, rid))
            pending.clear()

        for it in tqdm(iter_canonical(src.path, src.format, src.image_folder, on_problem, source=src),
                       desc="check", unit="rec", disable=not progress):
            report.records += 1
            raw_id = it.raw.value.get("id")
            rid = str(raw_id) if raw_id not in (None, "") else None
            if rid is not None:
                if rid in seen:
                    # a warning: training does not need unique ids, and `data repeat` output repeats them
                    report.problems.append(Problem("duplicate_id", "warning",
                                                   f"id {rid!r} already used on line {seen[rid]}",
                                                   src.path, it.raw.line, rid))
                else:
                    seen[rid] = it.raw.line
            if "messages" not in it.record:
                found = [] if it.record["text"].strip() else [("empty_conversation", "error", "empty text")]
            else:
                found = _conversation_problems(it.record)
            for kind, severity, message in found:
                report.problems.append(Problem(kind, severity, message, src.path, it.raw.line, rid))
            images = it.record.get("images") or []
            for image, blob in zip(images, it.record.get("image_data") or [b""] * len(images)):
                if blob:  # stored inside the dataset (llava_ft.data.hub): check the bytes themselves
                    bad = image_problem(blob)
                    if bad is not None:
                        report.problems.append(Problem(bad[0], "error", f"{image}: {bad[1]}",
                                                       src.path, it.raw.line, rid))
                    continue
                image_refs.setdefault(image, []).append((it.raw.line, rid))
                if src.image_folder is not None and outside_folder(image, src.image_folder):
                    report.problems.append(Problem(
                        "image_outside_folder", "warning",
                        f"image {image} lies outside the image folder {os.path.abspath(src.image_folder)}",
                        src.path, it.raw.line, rid))
            # a record already in error is not encoded: its drop would only repeat that error
            if tokenizer is not None and not any(severity == "error" for _, severity, _ in found):
                pending.append(it)
                if len(pending) >= _ENCODE_BATCH:
                    flush()
        if tokenizer is not None and pending:
            flush()
        check_image_refs(image_refs, src.path, report, workers)
    report.problems.sort(key=lambda p: (report.files.index(p.file) if p.file in report.files else 0, p.line or 0))
    return report


def check_image_refs(image_refs: dict, file: str, report: CheckReport, workers: int) -> None:
    """Check each image path once (thread pool); a bad one is reported for every (line, id) using it."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        paths = list(image_refs)
        for path, found in zip(paths, pool.map(check_image_file, paths)):
            if found is None:
                continue
            kind, message = found
            for line, rid in image_refs[path]:
                report.problems.append(Problem(kind, "error", message, file, line, rid))


def _as_source(src):
    from llava_ft.config import DataSource

    return src if isinstance(src, DataSource) else DataSource(path=src.path, format=src.format,
                                                              image_folder=src.image_folder)


def format_summary(report: CheckReport, limit: int = 20) -> str:
    """A table of problem counts by kind, then the first `limit` problems."""
    lines = [f"checked {report.records} record(s) in {len(report.files)} file(s): "
             f"{report.errors} error(s), {report.warnings} warning(s)"
             + ("" if report.lengths_checked else " (lengths not checked: give a tokenizer and max_length)")]
    counts = Counter((p.kind, p.severity) for p in report.problems)
    if counts:
        lines.append(f"  {'kind':<22} {'severity':<8} {'count':>6}")
        for (kind, severity), n in sorted(counts.items()):
            lines.append(f"  {kind:<22} {severity:<8} {n:>6}")
        lines.append("")
        for p in report.problems[:limit]:
            lines.append(f"  {p.severity}: {p.where()}: {p.kind}: {p.message}")
        if len(report.problems) > limit:
            lines.append(f"  ... {len(report.problems) - limit} more in the JSON report")
    return "\n".join(lines)


def default_report_path(data_path: str) -> str:
    p = Path(data_path)
    return str(p.with_name(p.name + ".check.json"))


def write_report(report: CheckReport, path: str) -> None:
    write_json(path, report.to_json())
