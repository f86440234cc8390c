"""Safe record output for the data tools (reading lives in llava_ft.data.jsonio).

    with RecordWriter("out.jsonl", "jsonl", inputs=["data.json"], force=False) as w:
        w.write(record)                          # written to a temp file, renamed over OUT on success

Output rules shared by every tool: the output may never be one of the inputs; an existing output is
refused unless `force`; a failed run leaves no partial output (the temp file is removed).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from llava_ft.errors import UserError
from llava_ft.fileio import AtomicFile, write_json  # noqa: F401  (AtomicFile: used below and re-exported)

CONTAINERS = ("json", "jsonl")


def container_for_output(path: str | os.PathLike, default: str) -> str:
    suffix = Path(path).suffix.lower()
    return {".jsonl": "jsonl", ".json": "json"}.get(suffix, default)


def check_output(out: str | os.PathLike, inputs: list, force: bool) -> Path:
    """Refuse to write over an input (always) or an existing output (unless force)."""
    out = Path(out)
    for src in inputs:
        same = Path(src).resolve() == out.resolve() or (
            Path(src).exists() and out.exists() and os.path.samefile(src, out))
        if same:
            raise UserError(f"{out}: the output is the input file; write to a new file (the input is never overwritten)")
    if out.exists() and not force:
        raise UserError(f"{out}: already exists; choose another output path or pass --force to overwrite it")
    if out.is_dir():
        raise UserError(f"{out}: is a folder; give a file path for the output")
    return out


class RecordWriter:
    """Write records one at a time as a JSON list (streamed: `[`, items, `]`) or JSONL."""

    def __init__(self, path: str | os.PathLike, container: str, inputs: tuple | list = (), force: bool = False):
        if container not in CONTAINERS:
            raise UserError(f"unknown output container {container!r}; use json or jsonl")
        self.path = check_output(path, list(inputs), force)
        self.container = container
        self.count = 0
        self._file: Optional[AtomicFile] = None

    def __enter__(self) -> "RecordWriter":
        self._file = AtomicFile(self.path)
        if self.container == "json":
            self._file.f.write("[")
        return self

    def write_raw(self, text: str) -> None:
        """Write one already-serialized record (one line of compact JSON)."""
        f = self._file.f
        if self.container == "json":
            f.write("\n" if self.count == 0 else ",\n")
            f.write(text)
        else:
            f.write(text + "\n")
        self.count += 1

    def write(self, record: Any) -> None:
        self.write_raw(json.dumps(record, ensure_ascii=False))

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._file.abort()
            return
        if self.container == "json":
            self._file.f.write("\n]\n")
        self._file.commit()


write_json_atomic = write_json  # old name (one release) of llava_ft.fileio.write_json
