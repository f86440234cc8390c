"""Streaming JSON / JSONL reading with line numbers: the one reader every data path uses.

    for rec in iter_raw("data.json"):            # RawRecord(index, line, value)
        ...
    for rec in iter_raw("data.jsonl", on_error=problems.append):   # collect bad lines instead of raising

A JSON list is parsed incrementally (json.JSONDecoder.raw_decode over a sliding buffer), so memory does not
grow with the file and every record knows the line it starts on; the standard library has no streaming
list parser and pulling in ijson for this one loop is not worth a dependency. Training data
(llava_ft.data.formats), the data tools (llava_ft.datatools) and `llava_ft eval` all read through here, so
a bad line gets the same message everywhere: file, line, what is wrong, what to do.

Bytes that are not UTF-8 (a latin-1 `\xe9`, say) are a problem of kind `not_utf8` naming file, line and
byte offset, reported like invalid JSON: JSONL lines are decoded one by one (the bad line is skipped when
`on_error` is given); a JSON list is decoded with `surrogateescape`, so a bad byte inside a record marks
that record only and reading goes on.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from llava_ft.errors import UserError
from llava_ft.utf8 import BOM as _BOM
from llava_ft.utf8 import decode_utf8  # noqa: F401  (re-exported: evaluate.py reads .tsv with it)
from llava_ft.utf8 import utf8_message as _utf8_message

_CHUNK = 1 << 20
# What `surrogateescape` turns an undecodable byte 0x80..0xff into.
_ESCAPED = re.compile("[\udc80-\udcff]")
_JSON_WS = re.compile(r"[ \t\n\r]*")  # the whitespace JSON allows between values


@dataclass
class RawRecord:
    index: int  # 0-based position in the file
    line: int  # 1-based line where the record starts
    value: Any


@dataclass
class JsonProblem:
    line: int
    message: str
    kind: str = "invalid_json"  # or "not_utf8"
    stops: bool = False  # a JSON list cannot be read past this point: the records after it are lost

    def describe(self, path) -> str:
        """The one-line message naming file and line (what iter_raw raises without `on_error`)."""
        lost = "; nothing after it in this JSON list can be read" if self.stops else ""
        if self.kind == "not_utf8":
            return f"{path}:{self.line}: {self.message}{lost}"
        return f"{path}:{self.line}: not valid JSON ({self.message}){lost}; fix or delete that line and rerun"


def _char_to_byte(path: Path, chars: int) -> tuple[int, int]:
    """(byte value, file offset) of character number `chars` of a file read with utf-8-sig/surrogateescape.

    Only run when a bad byte was found, so the normal path pays nothing for byte offsets.
    """
    with open(path, "rb") as f:
        bom = len(_BOM) if f.read(len(_BOM)) == _BOM else 0
    offset = bom
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        while chars > 0:
            piece = f.read(min(chars, _CHUNK))
            if not piece:
                break
            chars -= len(piece)
            offset += len(piece.encode("utf-8", "surrogateescape"))
    with open(path, "rb") as f:
        f.seek(offset)
        return (f.read(1) or b"\0")[0], offset


def detect_container(path: str | os.PathLike) -> str:
    """'json' when the first non-blank character is '[', else 'jsonl'."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with open(path, "rb") as f:  # bytes: a non-UTF-8 byte up front must not fail here (the reader names it)
        first = True
        while True:
            chunk = f.read(4096)
            if not chunk:
                return "jsonl"
            if first and chunk.startswith(_BOM):
                chunk = chunk[len(_BOM):]
            first = False
            stripped = chunk.lstrip()
            if stripped:
                return "json" if stripped[:1] == b"[" else "jsonl"


def iter_raw(path: str | os.PathLike, on_error: Optional[Callable[[JsonProblem], None]] = None,
             container: Optional[str] = None) -> Iterator[RawRecord]:
    """Yield the records of a JSON list or JSONL file with their line numbers.

    `container` is "json" or "jsonl"; None detects it from the first character. Invalid JSON raises
    UserError naming the file and line, unless `on_error` is given: then the problem is reported to it and
    reading goes on (JSONL: with the next line; JSON list: it stops, as nothing after a syntax error can be
    located reliably). Non-UTF-8 bytes: see the module docstring.
    """
    path = Path(path)
    container = container or detect_container(path)

    def fail(line: int, message: str, kind: str = "invalid_json", stops: bool = False) -> None:
        problem = JsonProblem(line, message, kind, stops)
        if on_error is None:
            raise UserError(problem.describe(path))
        on_error(problem)

    if container == "jsonl":
        with open(path, "rb") as f:
            index = 0
            offset = 0  # of the current line in the file
            for lineno, data in enumerate(f, 1):
                start, offset = offset, offset + len(data)
                if lineno == 1 and data.startswith(_BOM):
                    data, start = data[len(_BOM):], start + len(_BOM)
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as err:
                    fail(lineno, _utf8_message(data[err.start], start + err.start), "not_utf8")
                    continue
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


def _iter_json_list(path: Path, fail: Callable[..., None]) -> Iterator[RawRecord]:
    """Incremental parse of `[item, item, ...]` with json.JSONDecoder.raw_decode over a sliding buffer.

    The buffer is read through a position (`raw_decode(buf, pos)`) and compacted only when a chunk is
    added, so each record costs its own size, not a copy of the whole buffer.
    """
    decoder = json.JSONDecoder()
    # newline="": keep '\r\n' as two characters so character counts map back to byte offsets.
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        buf = ""
        pos = 0  # next character to parse
        line = 1  # line number of buf[pos]
        consumed = 0  # characters of the file before buf[0]
        eof = False

        def more() -> bool:
            nonlocal buf, pos, consumed, eof
            if eof:
                return False
            chunk = f.read(_CHUNK)
            if not chunk:
                eof = True
                return False
            consumed += pos
            buf = buf[pos:] + chunk
            pos = 0
            return True

        def advance(to: int) -> None:
            nonlocal pos, line
            line += buf.count("\n", pos, to)
            pos = to

        def skip_ws() -> None:
            while True:
                advance(_JSON_WS.match(buf, pos).end())
                if pos < len(buf) or not more():
                    return

        def bad_bytes(upto: int, stops: bool = True) -> bool:
            """Report the first undecodable byte in buf[pos:upto]; True if there was one."""
            found = _ESCAPED.search(buf, pos, upto)
            if found is None:
                return False
            byte, offset = _char_to_byte(path, consumed + found.start())
            fail(line + buf.count("\n", pos, found.start()), _utf8_message(byte, offset), "not_utf8", stops)
            return True

        skip_ws()
        if not buf.startswith("[", pos):
            if not bad_bytes(pos + 1):
                fail(line, "expected '[' at the start of a JSON list", stops=True)
            return
        advance(pos + 1)
        skip_ws()
        if buf.startswith("]", pos):
            return
        index = 0
        while True:
            skip_ws()
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    # a number or literal cut at the buffer's end would decode short: make sure it ended
                    if end == len(buf) and more():
                        continue
                    break
                except json.JSONDecodeError as err:
                    if more():
                        continue
                    if not bad_bytes(err.pos + 1):
                        fail(line + buf.count("\n", pos, err.pos), err.msg, stops=True)
                    return
            # A record with a non-UTF-8 byte is reported (skipped when on_error is given); reading goes on.
            if not bad_bytes(end, stops=False):
                yield RawRecord(index, line, value)
                index += 1
            advance(end)
            skip_ws()
            if buf.startswith(",", pos):
                advance(pos + 1)
                continue
            if buf.startswith("]", pos):
                advance(pos + 1)
                skip_ws()
                if pos < len(buf):
                    fail(line, "extra data after the closing ']'")
                return
            fail(line, "expected ',' or ']' after a list item" if pos < len(buf) else "the list is not closed with ']'",
                 stops=True)
            return
