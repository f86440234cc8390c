"""Replace text inside every string of every record: `llava_ft data replace -i IN -o OUT --old A --new B`.

The self-cognition recipe: write `{{NAME}}`/`{{AUTHOR}}` in the data and replace them with your
assistant's name. Keys are left alone; every string value at any depth is rewritten. Streams records,
shows a tqdm bar, and reports how many replacements were made in how many records.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from llava_ft.data.jsonio import detect_container, iter_raw
from llava_ft.datatools.io import RecordWriter, container_for_output
from llava_ft.errors import UserError


@dataclass
class ReplaceResult:
    records: int
    records_changed: int
    replacements: int


def _replace(value: Any, old: str, new: str) -> tuple[Any, int]:
    if isinstance(value, str):
        n = value.count(old)
        return (value.replace(old, new), n) if n else (value, 0)
    if isinstance(value, list):
        total, out = 0, []
        for item in value:
            item, n = _replace(item, old, new)
            out.append(item)
            total += n
        return out, total
    if isinstance(value, dict):
        total, out = 0, {}
        for key, item in value.items():
            out[key], n = _replace(item, old, new)
            total += n
        return out, total
    return value, 0


def replace_in_dataset(src: str, out: str, old: str, new: str, force: bool = False,
                       progress: bool = True) -> ReplaceResult:
    if not old:
        raise UserError("--old must be a non-empty string")
    container = container_for_output(out, detect_container(src))
    result = ReplaceResult(0, 0, 0)
    with RecordWriter(out, container, inputs=[src], force=force) as writer:
        for rec in tqdm(iter_raw(src), unit="rec", desc="replace", disable=not progress):
            value, n = _replace(rec.value, old, new)
            writer.write(value)
            result.records += 1
            result.records_changed += bool(n)
            result.replacements += n
    return result
