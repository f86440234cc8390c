"""Decoding users' text files as UTF-8, with an error that says where the bad byte is.

    text = decode_utf8(path.read_bytes(), path)   # YAML recipes, eval .tsv files; a BOM is dropped

A non-UTF-8 byte (a latin-1 `\\xe9`, say) is a UserError naming file, line and byte offset, never a
UnicodeDecodeError traceback. `llava_ft.data.jsonio` uses the same message for JSON / JSONL data; this
module sits below config and data so that both can use it (config reads YAML recipes through it).
"""
from __future__ import annotations

from llava_ft.errors import UserError

BOM = b"\xef\xbb\xbf"


def not_utf8_message(byte: int, offset: int) -> str:
    return (f"byte 0x{byte:02x} at byte offset {offset} is not UTF-8; re-save the file as UTF-8 "
            "(e.g. `iconv -f latin1 -t utf-8 IN > OUT`) or delete that line")


def decode_utf8(data: bytes, path) -> str:
    """A whole file's bytes as text (a UTF-8 BOM dropped); a non-UTF-8 byte is a UserError naming file,
    line and byte offset (for files read at once: YAML configs, MMBench .tsv)."""
    start = len(BOM) if data.startswith(BOM) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = start + err.start
        line = data.count(b"\n", 0, at) + 1
        raise UserError(f"{path}:{line}: {not_utf8_message(data[at], at)}") from None
