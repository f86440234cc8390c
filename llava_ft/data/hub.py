"""Data sources read through the `datasets` library: Hub ids, data folders, parquet files, save_to_disk folders.

    if is_dataset_source(src):                  # anything but a plain .json/.jsonl file
        ds, fmt = open_source(src)              # datasets.Dataset (columns mapped, Arrow format), format
        for where, record in iter_source_records(src): ...   # canonical records (llava_ft.data.formats)
        records = batch_records(batch, indices, src, fmt)     # the same, for a batch of `ds.map(batched=True)`

What `data.sources[i].path` may be, and how it is opened:
  * a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` -> `datasets.load_from_disk`;
  * any other folder (parquet / json / csv files, no script) or a .parquet file -> `datasets.load_dataset`
    (the same call as for a Hub id, so a local folder behaves like its uploaded copy);
  * a Hub dataset id (`liuhaotian/LLaVA-Instruct-150K`) -> `datasets.load_dataset(path, name=subset,
    split=split, data_files=data_files, revision=revision)`; offline (HF_HUB_OFFLINE=1) without a cached
    copy -> one UserError line saying so.
`split` defaults to `train`. `columns: {messages: conversations, images: image}` renames the dataset's
columns (value) to the names llava_ft reads (key) before the format is detected, as LLaMA-Factory's
dataset_info `columns` does.

Images inside the dataset: a `datasets.Image` column or a list of them under `image` / `images`
(TRL's vision format is `messages` + `images`, with content parts `{"type": "image"}` /
`{"type": "text", "text": ...}`). Rows are read in Arrow format, so preparing the data never decodes a
picture (only the number of images matters for token counts): a record keeps each image's
encoded bytes in `image_data` (aligned with `images`, which then holds a readable label such as
`org/ds[#12].images[0]` for messages) and `llava_ft.data.llava_dataset` decodes them lazily with
`llava_ft.data.images.load_image_bytes`. Images given as path strings are resolved against `image_folder`
exactly like LLaVA json.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

from llava_ft import IMAGE_TOKEN
from llava_ft.config import DataSource
from llava_ft.errors import UserError

# Files read by llava_ft's own streaming JSON reader (llava_ft.data.jsonio); everything else goes through datasets.
JSON_SUFFIXES = (".json", ".jsonl")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt", ".tsv")
IMAGE_COLUMNS = ("images", "image")


def is_dataset_source(src: DataSource) -> bool:
    """True when the source is read with `datasets` (folder, .parquet, Hub id), False for .json/.jsonl files."""
    path = src.path
    if os.path.isfile(path):
        return not path.lower().endswith(JSON_SUFFIXES)
    if os.path.isdir(path):
        return True
    return is_hub_id(path)


def is_hub_id(path: str) -> bool:
    """A path that does not exist locally and does not look like a local file name is taken as a Hub id."""
    if os.path.exists(path):
        return False
    looks_local = (path.startswith(("/", "./", "../", "~", ".\\")) or path.lower().endswith(_DATA_SUFFIXES)
                   or path.count("/") > 1)
    return not looks_local


def _is_saved_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json")))


def _pick_split(dsd, src: DataSource):
    split = src.split or "train"
    if split in dsd:
        return dsd[split]
    if not src.split and len(dsd) == 1:
        return dsd[next(iter(dsd))]
    raise UserError(f"data source '{src.path}' has no split '{split}'; its splits: {', '.join(dsd)}. "
                    "Set data.sources[].split")


def _offline() -> bool:
    import datasets

    return bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))


def _load_dataset(src: DataSource, hub: bool):
    import datasets

    kwargs: dict = {"name": src.subset or src.name, "data_files": src.data_files, "revision": src.revision}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    path = src.path
    if not hub and os.path.isfile(path):  # one .parquet (or csv...) file: the packaged builder for its type
        builder = os.path.splitext(path)[1].lstrip(".").lower()
        kwargs.setdefault("data_files", path)
        path = {"jsonl": "json", "txt": "text", "tsv": "csv"}.get(builder, builder)
    try:
        # Only the split asked for (default train): a Hub dataset's other splits are not downloaded.
        return _call_load_dataset(src, hub, path, split=src.split or "train", **kwargs)
    except _NoSuchSplit:
        # Load the split list to name it (or, with no split set, to take a dataset's only split).
        loaded = _call_load_dataset(src, hub, path, **kwargs)
        return _pick_split(loaded, src) if isinstance(loaded, datasets.DatasetDict) else loaded


class _NoSuchSplit(Exception):
    pass


def _call_load_dataset(src: DataSource, hub: bool, path: str, **kwargs):
    """datasets.load_dataset with its failures turned into one actionable UserError line."""
    import datasets

    try:
        return datasets.load_dataset(path, **kwargs)
    except Exception as err:  # datasets/hub raise many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if hub and _offline():
            raise UserError(f"data source '{src.path}': no such local path, and offline (HF_HUB_OFFLINE=1) with "
                            "no cached copy of this Hub dataset; run once with network access (or unset "
                            "HF_HUB_OFFLINE), or point data.sources[].path at a local copy") from None
        if hub and type(err).__name__ in ("DatasetNotFoundError", "FileNotFoundError", "RepositoryNotFoundError"):
            raise UserError(f"data source '{src.path}': no such dataset on the Hugging Face Hub (or no access: "
                            f"log in with `hf auth login`); a local path must exist ({first})") from None
        if "split" in kwargs and isinstance(err, (ValueError, KeyError)) and "split" in first.lower():
            raise _NoSuchSplit() from None
        raise UserError(f"data source '{src.path}': datasets.load_dataset failed: {type(err).__name__}: {first}") from None


def load_source(src: DataSource):
    """The source as a datasets.Dataset, before column mapping (see module docstring for the rules)."""
    import datasets

    path = src.path
    if os.path.isdir(path) and _is_saved_folder(path):
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as err:  # a damaged or foreign folder
            raise UserError(f"data source '{path}': cannot read this save_to_disk folder ({err})") from None
        return _pick_split(loaded, src) if isinstance(loaded, datasets.DatasetDict) else loaded
    if not os.path.exists(path) and not is_hub_id(path):
        raise UserError(f"data file '{path}' does not exist; fix data.sources[].path in the config")
    return _load_dataset(src, hub=not os.path.exists(path))


def map_columns(ds, src: DataSource):
    """Rename the dataset's columns per `src.columns` ({llava_ft name: dataset column}); Arrow-formatted."""
    columns = src.columns or {}
    missing = [col for col in columns.values() if col not in ds.column_names]
    if missing:
        raise UserError(f"data source '{src.path}': columns {missing} named in data.sources[].columns are not in "
                        f"the dataset; its columns: {', '.join(ds.column_names)}")
    renames = {col: name for name, col in columns.items() if col != name}
    clash = [name for name in renames.values() if name in ds.column_names and name not in renames]
    if clash:
        ds = ds.remove_columns(clash)  # the mapped column replaces a same-named one
    if renames:
        ds = ds.rename_columns(renames)
    # Rows are read in Arrow format (see `rows_of`): images stay {"bytes", "path"} and are never decoded.
    # (A cast to Image(decode=False) would do it too, but for a list of images it rewrites the whole dataset.)
    return ds.with_format("arrow")


def detect_columns_format(ds, src: DataSource) -> str:
    """`format: auto` for a dataset: from its column names (and the first row for text/oasst1)."""
    from llava_ft.data.formats import detect_format

    if src.format != "auto":
        return src.format
    cols = set(ds.column_names)
    if "messages" in cols:
        fmt = "openai"
    elif "conversations" in cols:
        fmt = "llava" if (cols & set(IMAGE_COLUMNS) or src.image_folder) else "sharegpt"
    elif len(ds) == 0:
        raise UserError(f"data source '{src.path}' holds no records")
    else:
        fmt = detect_format(rows_of(ds[:1])[0], f"{src.path}[#0]", src.image_folder)
    print(f"[llava_ft] {src.path}: format auto -> {fmt} (columns: {', '.join(ds.column_names)})", flush=True)
    return fmt


def open_source(src: DataSource):
    """-> (datasets.Dataset with columns mapped and images undecoded, resolved format)."""
    ds = map_columns(load_source(src), src)
    return ds, detect_columns_format(ds, src)


def source_key(src: DataSource) -> list:
    """What identifies a dataset source's content for the tokenized-data cache key."""
    from llava_ft.data.formats import source_files

    settings = [src.split, src.subset or src.name, src.data_files, src.revision, sorted((src.columns or {}).items())]
    if os.path.exists(src.path):
        files = []
        for path in source_files(src.path):
            st = os.stat(path)
            files.append((os.path.abspath(path), st.st_size, st.st_mtime_ns))
        return [files, settings]
    # Hub: the loaded dataset's fingerprint covers the resolved revision and data files of the cached copy.
    return [src.path, load_source(src)._fingerprint, settings]


def _content_text(content: Any, where: str) -> Any:
    """TRL/OpenAI content parts -> one string: an image part becomes `<image>`, parts joined by newlines."""
    if not isinstance(content, list):
        return content
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image" or kind == "image_url":
            parts.append(IMAGE_TOKEN)
        elif kind == "text":
            parts.append(part.get("text") or "")
        else:
            raise UserError(f"{where}: content part {j} has type {kind!r}; expected 'text' or 'image'")
    return "\n".join(parts)


def _image_item(item: Any, where: str, folder: str) -> tuple:
    """(label-or-path, bytes) for one image value of a row."""
    if isinstance(item, str):
        return os.path.abspath(os.path.join(folder, item)), b""
    if isinstance(item, (bytes, bytearray)):
        return where, bytes(item)
    if isinstance(item, dict) and ("bytes" in item or "path" in item):
        if item.get("bytes"):
            return where, bytes(item["bytes"])
        if item.get("path"):
            return os.path.abspath(os.path.join(folder, item["path"])), b""
    if hasattr(item, "save") and hasattr(item, "mode"):  # a PIL image (a column that was decoded anyway)
        import io

        buf = io.BytesIO()
        item.save(buf, format="PNG")
        return where, buf.getvalue()
    raise UserError(f"{where}: an image must be a datasets.Image, bytes or a path string, got {type(item).__name__}")


def row_record(row: dict, fmt: str, where: str, index: int, src: DataSource) -> dict:
    """One dataset row -> canonical record (+ `image_data` bytes aligned with `images` for embedded images)."""
    from llava_ft.data.formats import to_record

    row = dict(row)
    base_dir = os.path.abspath(src.path) if os.path.isdir(src.path) else os.path.dirname(os.path.abspath(src.path))
    folder = src.image_folder if src.image_folder is not None else base_dir
    images = None
    for col in IMAGE_COLUMNS:
        if col in row:
            value = row.pop(col)
            if value is not None and value != "":
                items = value if isinstance(value, list) else [value]
                images = [_image_item(item, f"{where}.{col}[{k}]", folder) for k, item in enumerate(items)]
            break
    if fmt == "openai" and isinstance(row.get("messages"), list):
        row["messages"] = [dict(m, content=_content_text(m.get("content"), f"{where} messages[{j}]"))
                           if isinstance(m, dict) else m for j, m in enumerate(row["messages"])]
    for turns in (row.get("messages"), row.get("conversations")):
        for m in turns if isinstance(turns, list) else ():
            if isinstance(m, dict) and "loss" in m and m["loss"] is None:
                del m["loss"]  # a struct column gives every turn every key, None where unset
    record = to_record(row, fmt, where, index, src.image_folder, base_dir)
    if images and "messages" in record:
        record["images"] = [label for label, _ in images]
        if any(data for _, data in images):
            record["image_data"] = [data for _, data in images]
    return record


def rows_of(batch) -> list:
    """Python rows of a batch in Arrow format (a pyarrow Table) or as a dict of columns."""
    if hasattr(batch, "to_pylist"):
        return batch.to_pylist()
    names = list(batch)
    return [{k: batch[k][i] for k in names} for i in range(len(batch[names[0]]) if names else 0)]


def batch_records(batch, indices: list, src: DataSource, fmt: str) -> list:
    """Canonical records of a `ds.map(batched=True, with_indices=True)` batch of an opened source."""
    return [row_record(row, fmt, f"{src.path}[#{idx}]", idx, src) for row, idx in zip(rows_of(batch), indices)]


def iter_rows(ds, batch_size: int = 256) -> Iterator[dict]:
    """Every row of an opened source as a dict (images as {"bytes", "path"}), read in batches."""
    for batch in ds.iter(batch_size=batch_size):
        yield from rows_of(batch)


def iter_source_records(src: DataSource) -> Iterator[tuple]:
    """(where, canonical record) for every row of a dataset source."""
    ds, fmt = open_source(src)
    for index, row in enumerate(iter_rows(ds)):
        where = f"{src.path}[#{index}]"
        yield where, row_record(row, fmt, where, index, src)
