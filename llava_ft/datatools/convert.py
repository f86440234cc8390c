"""Convert between data formats: `llava_ft data convert -i IN -o OUT --to llava|openai|alpaca|sharegpt|jsonl|json`.

  --to jsonl / json      change only the container (JSON list <-> JSONL); records are copied untouched.
  --to llava|openai|     read each record with llava_ft.data.formats (the parser training uses), write it
       alpaca|sharegpt   in the target format. The output container follows OUT's extension (.json list,
                         .jsonl lines), else the input's.

Image paths are copied as written in the input (relative to the same image folder). As in training,
`<image>` markers are moved to the start of their turn. Alpaca holds one user/assistant exchange: a
multi-turn record cannot be converted to it and is reported by id.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from llava_ft.data.formats import FORMATS, detect_format, to_record
from llava_ft.data.jsonio import detect_container, iter_raw
from llava_ft.datatools.io import RecordWriter, container_for_output
from llava_ft.errors import UserError

TARGETS = ("llava", "openai", "alpaca", "sharegpt", "jsonl", "json")
_FROM_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


def _raw_images(row: dict):
    value = row.get("image", row.get("images"))
    return None if value in (None, "", []) else value


def _messages(row: dict, fmt: str, where: str) -> list:
    rec = to_record(row, fmt, where, 0, image_folder=None, base_dir=".")
    if "text" in rec:
        raise UserError(f"{where}: raw-text record (format 'text') has no conversation to convert; "
                        "text data can only be converted with --to jsonl or --to json")
    messages = rec["messages"]
    if fmt == "alpaca" and not (row.get("input") or "") and messages:
        # formats joins instruction + "\n" + input (XTuner); with no input that leaves a trailing newline
        messages[0]["content"] = messages[0]["content"][:-1] if messages[0]["content"].endswith("\n") else messages[0]["content"]
    return messages


def convert_row(row: dict, fmt: str, to: str, where: str, new_id: str = "") -> dict:
    """One raw record of format `fmt` as a raw record of format `to` (`new_id` when llava needs an id)."""
    messages = _messages(row, fmt, where)
    images = _raw_images(row)
    rid = row.get("id")
    if to in ("llava", "sharegpt"):
        conv = []
        for m in messages:
            turn = {"from": _FROM_ROLE[m["role"]], "value": m["content"]}
            if not m.get("loss", True) and m["role"] == "assistant":
                turn["loss"] = False
            conv.append(turn)
        out: dict = {}
        if rid is not None:
            out["id"] = rid
        elif to == "llava":  # LLaVA records carry an id; derive a stable one from the position
            out["id"] = new_id or where
        if images is not None:
            out["image"] = images
        out["conversations"] = conv
        return out
    if to == "openai":
        msgs = []
        for m in messages:
            msg = {"role": m["role"], "content": m["content"]}
            if not m.get("loss", True) and m["role"] == "assistant":
                msg["loss"] = False
            msgs.append(msg)
        out = {} if rid is None else {"id": rid}
        if images is not None:
            out["images"] = images if isinstance(images, list) else [images]
        out["messages"] = msgs
        return out
    if to == "alpaca":
        if images is not None:
            raise UserError(f"{where}: record has images; alpaca cannot hold images (convert to llava or openai)")
        system = [m["content"] for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        if len(turns) != 2 or turns[0]["role"] != "user" or turns[1]["role"] != "assistant":
            raise UserError(f"{where}: record has {len(turns)} turns; alpaca holds exactly one user question and "
                            "one answer (convert multi-turn data to openai or sharegpt instead)")
        out = {} if rid is None else {"id": rid}
        if system:
            out["system"] = system[0]
        out.update({"instruction": turns[0]["content"], "input": "", "output": turns[1]["content"]})
        return out
    raise UserError(f"unknown target format {to!r}; choose one of: {', '.join(TARGETS)}")


def convert_dataset(src: str, out: str, to: str, source_format: str = "auto", force: bool = False,
                    progress: bool = True) -> int:
    """Convert `src` to format `to` in `out`; returns the number of records written."""
    if to not in TARGETS:
        raise UserError(f"--to {to!r} is not supported; choose one of: {', '.join(TARGETS)}")
    if source_format != "auto" and source_format not in FORMATS:
        raise UserError(f"--from {source_format!r} is not a format; choose auto or one of: {', '.join(FORMATS)}")
    in_container = detect_container(src)
    if to in ("json", "jsonl"):
        with RecordWriter(out, to, inputs=[src], force=force) as writer:
            for rec in tqdm(iter_raw(src), unit="rec", desc="convert", disable=not progress):
                writer.write(rec.value)
        return writer.count
    fmt: Optional[str] = None if source_format == "auto" else source_format
    with RecordWriter(out, container_for_output(out, in_container), inputs=[src], force=force) as writer:
        for rec in tqdm(iter_raw(src), unit="rec", desc="convert", disable=not progress):
            where = f"{os.fspath(src)}:{rec.line}" + (f" (id {rec.value.get('id')})" if isinstance(rec.value, dict) and "id" in rec.value else "")
            if not isinstance(rec.value, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(rec.value).__name__}")
            if fmt is None:
                fmt = detect_format(rec.value, where)
            writer.write(convert_row(rec.value, fmt, to, where, f"{Path(src).stem}-{rec.index}"))
    return writer.count
