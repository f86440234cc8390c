"""Read data files in the formats users bring and turn each record into one canonical record.

Formats (`data.sources[i].format`, `auto` detects from the first record's keys):
  openai    {"messages": [{"role": system|user|assistant, "content": ..., "loss": false?}]}
  alpaca    {"instruction", "input", "output"}            (XTuner: input = instruction + "\\n" + input)
  sharegpt  {"conversations": [{"from": human|gpt|system, "value": ...}]}
  llava     sharegpt + {"id", "image": str | [str]}       (images resolved against `image_folder`;
            + "video": "clip.mp4" with a <video> marker, an image entry + <image> marker: data/videos.py)
  oasst1    {"text": "### Human: ... ### Assistant: ..."}
  text      {"text": ...}                                  (incremental pretraining: all text supervised)
Files: .json (a list), .jsonl, .parquet, or a folder written by `datasets.Dataset.save_to_disk`.

Canonical record (see docs/architecture.md): {"id", "messages": [{"role", "content", "loss"}], "images"}
or {"id", "text"}. Errors name the file and line (or record index) and say what to do.

    for rec in iter_records(DataSource(path="train.jsonl")): ...
    for rec in iter_records(src, on_problem=lambda reason, message: ...): ...   # bad records reported, skipped

With `on_problem`, a record that cannot be read (invalid JSON or UTF-8, not an object, a bad role, a
missing key, wrong types) is reported as (reason, message) and skipped instead of raising; problems with
the file itself (missing, unsupported type) still raise. A syntax error inside a JSON list is reported with
reason LIST_CUT: nothing after it can be read, so callers must not treat it as skippable.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator, Optional

from llava_ft import IMAGE_TOKEN
from llava_ft.config import DATA_FORMATS, DataSource
from llava_ft.data.jsonio import detect_container, iter_raw as iter_json
from llava_ft.errors import UserError

FORMATS = tuple(f for f in DATA_FORMATS if f != "auto")
OnProblem = Callable[[str, str], None]  # (reason, message naming file and line)
# Reason of a JSON-list syntax error: the rest of that file is unreadable, so no flag may skip it.
LIST_CUT = "json_list_cut"


class RecordError(UserError):
    """A problem with one record (not the file or the config), with a short `reason` used for counting."""

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


_ROLE_FROM = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "bot": "assistant", "model": "assistant", "system": "system"}


def source_files(path: str) -> list[str]:
    """The files that make up a source (for cache fingerprints). A missing path is a UserError."""
    if os.path.isdir(path):
        return sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files)
    if os.path.isfile(path):
        return [path]
    raise UserError(f"data file '{path}' does not exist; fix data.sources[].path in the config")


def iter_raw(path: str, on_problem: Optional[OnProblem] = None) -> Iterator[tuple[str, Any]]:
    """Yield (where, raw_dict) for every record of a file; `where` is 'file:line' (JSON/JSONL) or 'file[#index]'.

    With `on_problem`, unreadable records (invalid JSON / UTF-8, not an object) go there and are skipped."""
    source_files(path)
    lower = path.lower()
    if os.path.isdir(path):
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except Exception as err:  # datasets raises several types for a folder it cannot read
            raise UserError(f"'{path}' is a folder but not a saved `datasets` dataset ({err}); "
                            "point data.sources[].path at a .json/.jsonl/.parquet file or a save_to_disk folder") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        for i, row in enumerate(ds):
            yield f"{path}[#{i}]", row
    elif lower.endswith((".jsonl", ".json")):
        container = "jsonl" if lower.endswith(".jsonl") else detect_container(path)
        if container == "jsonl" and lower.endswith(".json"):
            single = _single_json_object(path)
            if single is not None:
                yield f"{path}:1", single
                return
        on_error = None if on_problem is None else (lambda p: on_problem(LIST_CUT if p.stops else p.kind, p.describe(path)))
        # Streamed with line numbers by the shared reader (memory does not grow with the file).
        for rec in iter_json(path, container=container, on_error=on_error):
            if not isinstance(rec.value, dict):
                kind = "line" if container == "jsonl" else "list item"
                message = (f"{path}:{rec.line}: expected a JSON object per {kind}, got "
                           f"{type(rec.value).__name__}; each record must be an object such as "
                           '{"messages": [...]}')
                if on_problem is None:
                    raise UserError(message)
                on_problem("not_an_object", message)
                continue
            yield f"{path}:{rec.line}", rec.value
    elif lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}[#{i}]", row
    else:
        raise UserError(f"'{path}': unsupported file type; use .json, .jsonl, .parquet or a `datasets` folder")


def _single_json_object(path: str) -> Optional[dict]:
    """A .json file that is not a list: one (maybe pretty-printed) object, or JSON Lines saved as .json
    (None: let the JSONL reader go through it line by line and name any bad line)."""
    with open(path, encoding="utf-8-sig") as fh:
        try:
            value = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError):  # the line reader names the bad line / byte
            return None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON list of records, got {type(value).__name__}")
    return value


def detect_format(row: dict, where: str, image_folder: Optional[str] = None) -> str:
    """Guess the format from one record's keys (what `format: auto` does)."""
    if "messages" in row:
        return "openai"
    if "conversations" in row:
        return "llava" if ("image" in row or "images" in row or "video" in row or image_folder) else "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        text = str(row["text"])
        return "oasst1" if "### Human:" in text and "### Assistant:" in text else "text"
    raise UserError(f"{where}: cannot detect the data format from keys {sorted(row)}; set "
                    f"data.sources[].format to one of: {', '.join(FORMATS)}")


def _need(row: dict, key: str, where: str, fmt: str) -> Any:
    if key not in row or row[key] is None:
        raise RecordError(f"{where}: {fmt} record has no '{key}' (keys: {sorted(row)}); "
                          f"fix the record or set data.sources[].format correctly", f"no_{key}")
    return row[key]


def _msg(role: str, content: Any, where: str, loss: bool = True) -> dict:
    if not isinstance(content, str):
        raise UserError(f"{where}: message content must be a string, got {type(content).__name__}")
    return {"role": role, "content": content, "loss": loss}


def _parse_loss(value: Any) -> bool:
    # XTuner reads `loss` through str(): "false"/False both mean no loss.
    return str(value).lower() == "true"


def _openai(row: dict, where: str) -> list[dict]:
    messages = _need(row, "messages", where, "openai")
    if not isinstance(messages, list):
        raise UserError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: messages[{j}] must be an object with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise RecordError(f"{where}: messages[{j}] has role {m['role']!r}; expected system, user or assistant",
                              "bad_role")
        out.append(_msg(m["role"], m["content"], f"{where} messages[{j}]", _parse_loss(m.get("loss", True))))
    return out


def _alpaca(row: dict, where: str) -> list[dict]:
    output = _need(row, "output", where, "alpaca")
    if output == "<nooutput>":  # XTuner drops these (alpaca's marker for "no answer")
        return []
    text = f"{_need(row, 'instruction', where, 'alpaca')}\n{row.get('input') or ''}"
    return [_msg("user", text, where), _msg("assistant", output, where)]


def _move_image_tokens(text: str) -> str:
    """XTuner/LLaVA: strip every <image> from the turn and put them at its start, each followed by '\\n'."""
    n = text.count(IMAGE_TOKEN)
    if not n:
        return text
    rest = text.replace(IMAGE_TOKEN, "").strip()
    return (IMAGE_TOKEN + "\n") * n + rest if rest else ((IMAGE_TOKEN + "\n") * n).strip()


VIDEO_TOKEN = "<video>"


def _sharegpt(row: dict, where: str, move_images: bool) -> list[dict]:
    convs = _need(row, "conversations", where, "sharegpt")
    if not isinstance(convs, list):
        raise UserError(f"{where}: 'conversations' must be a list of {{from, value}} objects")
    out = []
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise UserError(f"{where}: conversations[{j}] must be an object with 'from' and 'value'")
        role = _ROLE_FROM.get(str(turn["from"]).lower())
        if role is None:
            raise RecordError(f"{where}: conversations[{j}] has from={turn['from']!r}; expected human, gpt or system",
                              "bad_role")
        value = turn["value"]
        if role == "user" and move_images and isinstance(value, str):
            # a clip's <video> marker becomes an ordinary placeholder: the clip is an entry of "images"
            value = _move_image_tokens(value.replace(VIDEO_TOKEN, IMAGE_TOKEN) if "video" in row else value)
        out.append(_msg(role, value, f"{where} conversations[{j}]", _parse_loss(turn.get("loss", True))))
    return out


def _oasst1(text: str) -> list[dict]:
    # Same split as XTuner's oasst1 map fn: segments between '###', an unanswered last question is dropped.
    parts = []
    for piece in text.strip().split("###"):
        piece = piece.strip()
        if piece.startswith("Human:"):
            parts.append(piece[6:].strip())
        elif piece.startswith("Assistant:"):
            parts.append(piece[10:].strip())
    if len(parts) % 2:
        parts.pop()
    out = []
    for i in range(0, len(parts), 2):
        out += [{"role": "user", "content": parts[i], "loss": True},
                {"role": "assistant", "content": parts[i + 1], "loss": True}]
    return out


def _images(row: dict, where: str, image_folder: Optional[str], base_dir: str) -> list[str]:
    value = row.get("image", row.get("images"))
    items = [] if value is None or value == "" else value if isinstance(value, list) else [value]
    video = row.get("video")  # LLaVA-NeXT's key for a clip (llava_ft.data.videos); it follows the images
    if video not in (None, ""):
        items = list(items) + [video]
    folder = image_folder if image_folder is not None else base_dir
    out = []
    for item in items:
        if not isinstance(item, str):
            raise UserError(f"{where}: 'image' must be a path string or a list of them, got {item!r}")
        out.append(os.path.abspath(os.path.join(folder, item)))
    return out


def to_record(row: dict, fmt: str, where: str, index: int, image_folder: Optional[str] = None,
              base_dir: str = ".") -> dict:
    """Convert one raw record of format `fmt` to the canonical record."""
    rid = str(row["id"]) if row.get("id") not in (None, "") else where
    if fmt == "text":
        text = _need(row, "text", where, "text")
        if not isinstance(text, str):
            raise UserError(f"{where}: 'text' must be a string")
        return {"id": rid, "text": text}
    if fmt == "openai":
        messages = _openai(row, where)
    elif fmt == "alpaca":
        messages = _alpaca(row, where)
    elif fmt in ("sharegpt", "llava"):
        messages = _sharegpt(row, where, move_images=True)
    elif fmt == "oasst1":
        messages = _oasst1(str(_need(row, "text", where, "oasst1")))
    else:
        raise UserError(f"unknown data format '{fmt}'; valid formats: auto, {', '.join(FORMATS)}")
    images = _images(row, where, image_folder, base_dir) if fmt in ("llava", "openai", "sharegpt") else []
    return {"id": rid, "messages": messages, "images": images}


def iter_records(source: DataSource, on_problem: Optional[OnProblem] = None) -> Iterator[dict]:
    """Canonical records of one source (without `repeat`, which the dataset builder applies).

    `on_problem(reason, message)`: report and skip bad records instead of raising (module docstring)."""
    fmt = source.format
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"unknown data format '{fmt}'; valid formats: auto, {', '.join(FORMATS)}")
    base_dir = os.path.dirname(os.path.abspath(source.path))
    for index, (where, row) in enumerate(iter_raw(source.path, on_problem)):
        if getattr(source, "columns", None):
            row = rename_keys(row, source.columns)
        try:
            rec_fmt = detect_format(row, where, source.image_folder) if fmt == "auto" else fmt
            record = to_record(row, rec_fmt, where, index, source.image_folder, base_dir)
        except UserError as err:  # everything to_record raises is about this one record
            if on_problem is None:
                raise
            on_problem(getattr(err, "reason", "malformed"), str(err))
            continue
        if fmt == "auto":
            print(f"[llava_ft] {source.path}: format auto -> {rec_fmt} (keys: {', '.join(row)})", flush=True)
        fmt = rec_fmt
        yield record


def rename_keys(row: dict, columns: dict) -> dict:
    """`data.sources[].columns` on one record: {llava_ft name: the record's key} -> keys llava_ft reads."""
    if not isinstance(row, dict):
        return row
    mapped = set(columns.values())
    out = {k: v for k, v in row.items() if k not in mapped and k not in columns}
    for name, key in columns.items():
        if key in row:
            out[name] = row[key]
    return out

