"""Streaming JSON / JSONL reading with line numbers: the one reader every data path uses.

    for rec in iter_raw("data.json"):            # RawRecord(index, line, value)
        ...
    for rec in iter_raw("data.jsonl", on_error=problems.append):   # collect bad lines instead of raising

A JSON list is parsed incrementally (json.JSONDecoder.raw_decode over a sliding buffer), so memory does not
grow with the file and every record knows the line it starts on; the standard library has no streaming
list parser and pulling in ijson for this one loop is not worth a dependency. Training data
(llava_ft.data.formats), the data tools (llava_ft.datatools) and `llava_ft eval` all read through here, so
a bad line gets the same message everywhere: file, line, what is wrong, what to do.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from llava_ft.errors import UserError

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


def iter_raw(path: str | os.PathLike, on_error: Optional[Callable[[JsonProblem], None]] = None,
             container: Optional[str] = None) -> Iterator[RawRecord]:
    """Yield the records of a JSON list or JSONL file with their line numbers.

    `container` is "json" or "jsonl"; None detects it from the first character. Invalid JSON raises
    UserError naming the file and line, unless `on_error` is given: then the problem is reported to it and
    reading goes on (JSONL: with the next line; JSON list: it stops, as nothing after a syntax error can be
    located reliably).
    """
    path = Path(path)
    container = container or detect_container(path)

    def fail(line: int, message: str) -> None:
        problem = JsonProblem(line, message)
        if on_error is None:
            raise UserError(f"{path}:{line}: not valid JSON ({message}); fix or delete that line and rerun")
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
