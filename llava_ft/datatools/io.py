"""Streaming record I/O for the data tools: read JSON lists / JSONL one record at a time, write safely.

    for rec in iter_raw("data.json"):            # RawRecord(index, line, value); a JSON list is parsed
        ...                                      # incrementally, so memory does not grow with the file
    with RecordWriter("out.jsonl", "jsonl", inputs=["data.json"], force=False) as w:
        w.write(record)                          # written to a temp file, renamed over OUT on success

Output rules shared by every tool: the output may never be one of the inputs; an existing output is
refused unless `force`; a failed run leaves no partial output (the temp file is removed).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from llava_ft.errors import UserError

CONTAINERS = ("json", "jsonl")
_CHUNK = 1 << 20


@dataclass
class RawRecord:
    index: int  # 0-based position in the file
    line: int  # 1-based line where the record starts
    value: Any


@dataclass
class JsonProblem:
    line: int
    message: str


def detect_container(path: str | os.PathLike) -> str:
    """'json' when the first non-blank character is '[', else 'jsonl'."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with open(path, encoding="utf-8-sig") as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                return "jsonl"
            stripped = chunk.lstrip()
            if stripped:
                return "json" if stripped[0] == "[" else "jsonl"


def container_for_output(path: str | os.PathLike, default: str) -> str:
    suffix = Path(path).suffix.lower()
    return {".jsonl": "jsonl", ".json": "json"}.get(suffix, default)


def iter_raw(path: str | os.PathLike, on_error: Optional[Callable[[JsonProblem], None]] = None) -> Iterator[RawRecord]:
    """Yield the records of a JSON list or JSONL file with their line numbers.

    Invalid JSON raises UserError naming the file and line, unless `on_error` is given: then the problem is
    reported to it and reading goes on (JSONL: with the next line; JSON list: it stops, as nothing after a
    syntax error can be located reliably).
    """
    path = Path(path)
    container = detect_container(path)

    def fail(line: int, message: str) -> None:
        problem = JsonProblem(line, message)
        if on_error is None:
            raise UserError(f"{path}:{line}: invalid JSON: {message}. Fix that line (or remove it) and rerun")
        on_error(problem)

    if container == "jsonl":
        with open(path, encoding="utf-8-sig") as f:
            index = 0
            for lineno, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as err:
                    fail(lineno, f"{err.msg} (column {err.colno})")
                    continue
                yield RawRecord(index, lineno, value)
                index += 1
        return
    yield from _iter_json_list(path, fail)


def _iter_json_list(path: Path, fail: Callable[[int, str], None]) -> Iterator[RawRecord]:
    """Incremental parse of `[item, item, ...]` with json.JSONDecoder.raw_decode over a sliding buffer."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as f:
        buf = ""
        line = 1  # line number of buf[0]
        eof = False

        def more() -> bool:
            nonlocal buf, eof
            if eof:
                return False
            chunk = f.read(_CHUNK)
            if not chunk:
                eof = True
                return False
            buf += chunk
            return True

        def skip_ws() -> None:
            nonlocal buf, line
            while True:
                stripped = buf.lstrip()
                line += buf.count("\n", 0, len(buf) - len(stripped))
                buf = stripped
                if buf or not more():
                    return

        skip_ws()
        if not buf.startswith("["):
            fail(line, "expected '[' at the start of a JSON list")
            return
        buf = buf[1:]
        skip_ws()
        if buf.startswith("]"):
            return
        index = 0
        while True:
            skip_ws()
            while True:
                try:
                    value, end = decoder.raw_decode(buf)
                    # a number or literal cut at the buffer's end would decode short: make sure it ended
                    if end == len(buf) and more():
                        continue
                    break
                except json.JSONDecodeError as err:
                    if more():
                        continue
                    fail(line + buf.count("\n", 0, err.pos), err.msg)
                    return
            yield RawRecord(index, line, value)
            index += 1
            line += buf.count("\n", 0, end)
            buf = buf[end:]
            skip_ws()
            if buf.startswith(","):
                buf = buf[1:]
                continue
            if buf.startswith("]"):
                buf = buf[1:]
                skip_ws()
                if buf:
                    fail(line, "extra data after the closing ']'")
                return
            fail(line, "expected ',' or ']' after a list item" if buf else "the list is not closed with ']'")
            return


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


class AtomicFile:
    """A text file written under a temp name beside `path`, renamed over it on `commit()`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".partial")
        self.f = os.fdopen(fd, "w", encoding="utf-8")

    def commit(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


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


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    f = AtomicFile(path)
    try:
        json.dump(obj, f.f, ensure_ascii=False, indent=2)
        f.f.write("\n")
    except BaseException:
        f.abort()
        raise
    f.commit()
