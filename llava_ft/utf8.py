"""UTF-8 for files users give us: one message for a bad byte, naming file, line and byte offset.

    text = decode_utf8(Path("cfg.yaml").read_bytes(), "cfg.yaml")   # UserError "cfg.yaml:3: byte 0xe9 ..."
    utf8_message(0xE9, 120)   # the message's tail, for readers that find the byte themselves (data/jsonio.py)

It sits below config and data so that both the YAML loader and the data readers use it.
"""
from __future__ import annotations

from llava_ft.errors import UserError

BOM = b"\xef\xbb\xbf"


def utf8_message(byte: int, offset: int) -> str:
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
        raise UserError(f"{path}:{line}: {utf8_message(data[at], at)}") from None
