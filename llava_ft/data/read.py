"""The data pass that runs before any model loads: check the sources, read every record, collect problems.

    check_sources(cfg.data)                        # cheap: data files and image folders exist
    data = read_sources(cfg.data, check_images=cfg.is_llava)
    data.records[i]            # canonical records of data.sources[i], as JSON strings (what encoding reads)
    data.skipped               # {reason: n} of bad records skipped (data.skip_bad_samples: true)
    data.outside_image_folder  # image paths that leave their source's image_folder (`../x.png`)

Training calls this first (llava_ft.engine.run), so a missing file, a missing image folder, undecodable
data or bad records are reported in seconds, not after the model has loaded. Without
`data.skip_bad_samples` every problem of the pass is listed in one UserError (llava_ft.data.problems):
invalid JSON or UTF-8, records the parser rejects (bad role, missing `conversations`, ...), `<image>`
markers that do not match the record's images, and (LLaVA runs) unreadable image files. With the flag
those records are skipped and counted (except a syntax error inside a JSON list, after which the rest of
the file cannot be read: that stays an error, so a run never silently trains on part of a file); unreadable images are then found and skipped during training
(llava_ft.data.llava_dataset), as checking every image up front is what the flag lets a user avoid.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from llava_ft import IMAGE_TOKEN
from llava_ft.config import DataConfig, DataSource
from llava_ft.data.formats import LIST_CUT, iter_records, source_files
from llava_ft.data.problems import DataProblems
from llava_ft.errors import UserError

log = logging.getLogger(__name__)

REASON_MISMATCH = "image_marker_mismatch"
REASON_UNREADABLE_IMAGE = "unreadable_image"


@dataclass
class SourceData:
    records: list = field(default_factory=list)  # list[list[str]], one per data source (None: `datasets` source)
    skipped: dict = field(default_factory=dict)  # {reason: n}
    outside_image_folder: int = 0  # image paths resolving outside their image_folder
    outside_example: Optional[str] = None  # "sample 7: ../elsewhere/x.png" (the first one)


def default_cache_dir() -> str:
    return os.environ.get("LLAVA_FT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llava_ft", "datasets")


def data_cache_dir(data_cfg: DataConfig) -> str:
    """Where prepared data is cached: `data.cache_dir`, else $LLAVA_FT_CACHE, else ~/.cache/llava_ft/datasets."""
    return data_cfg.cache_dir or default_cache_dir()


def image_memo_key(data_cfg: DataConfig) -> str:
    """What names a data set for the memo of its image checks (image_check_memo): its sources' files and
    image folders, not their contents, so a grown or reshuffled file keeps the verdicts of its images."""
    return json.dumps([(os.path.abspath(src.path), src.image_folder and os.path.abspath(src.image_folder))
                       for src in map(_source, data_cfg.sources)])


def _source(src) -> DataSource:
    return src if isinstance(src, DataSource) else DataSource(**src)


def folder_prefix(folder: str) -> str:
    """`folder` as an absolute path ending in the separator, for `outside_folder`."""
    return os.path.join(os.path.abspath(folder), "")


def outside_folder(path: str, folder: str) -> bool:
    """True when `path` (absolute, as the readers resolve image paths) does not lie inside `folder`.

    A plain prefix test against `folder_prefix(folder)`: it runs once per image of the data set."""
    return not os.path.abspath(path).startswith(folder_prefix(folder))


def check_sources(data_cfg: DataConfig) -> None:
    """Every data file and image folder exists (UserError naming the first that does not)."""
    if not data_cfg.sources:
        raise UserError("data.sources is empty; add at least one {path: ...} entry")
    from llava_ft.data import hub

    for i, src in enumerate(map(_source, data_cfg.sources)):
        if not hub.is_dataset_source(src):  # `datasets` sources (folders, parquet, Hub ids) are opened later
            source_files(src.path)
        if src.image_folder is not None and not os.path.isdir(src.image_folder):
            raise UserError(f"data.sources[{i}].image_folder '{src.image_folder}' is not a folder; fix the "
                            "path (image paths in the data are relative to it)")


def _marker_problem(record: dict, path: str) -> Optional[str]:
    """Same rule as encoding (user turns; images without any marker are placed automatically)."""
    images = record.get("images") or []
    markers = sum(m["content"].count(IMAGE_TOKEN) for m in record.get("messages", ()) if m["role"] == "user")
    if markers and markers != len(images):
        rid = str(record["id"])
        where = rid if rid.startswith(path) else f"{path}: sample {rid}"  # records without id are named file:line
        return (f"{where}: {markers} '<image>' marker(s) in the text but {len(images)} image(s); "
                "make them match")
    return None


def read_sources(data_cfg: DataConfig, check_images: bool = False, num_threads: int = 16) -> SourceData:
    """Read and check every source of `data_cfg` (module docstring); raises UserError listing all problems."""
    check_sources(data_cfg)
    problems = DataProblems(skip=data_cfg.skip_bad_samples, fatal_reasons=frozenset({LIST_CUT}))
    out = SourceData()
    image_rows: list = []
    from llava_ft.data import hub

    for src in map(_source, data_cfg.sources):
        if hub.is_dataset_source(src):
            # Read row by row by `datasets` during encoding (llava_ft.data.hub), images stay inside it.
            out.records.append(None)
            continue
        records: list = []
        prefix = folder_prefix(src.image_folder) if src.image_folder is not None else None
        for rec in iter_records(src, on_problem=problems.add):
            mismatch = _marker_problem(rec, src.path) if "messages" in rec else None
            if mismatch:
                problems.add(REASON_MISMATCH, mismatch)
                continue
            images = rec.get("images") or []
            if prefix is not None:
                for image in images:
                    if not image.startswith(prefix):  # images are absolute and normalised (formats._images)
                        out.outside_image_folder += 1
                        out.outside_example = out.outside_example or f"sample {rec['id']}: {image}"
            if images and check_images and not data_cfg.skip_bad_samples:
                image_rows.append({"id": rec["id"], "images": images})
            records.append(json.dumps(rec, ensure_ascii=False))
        if not records and not problems.total:
            raise UserError(f"data file '{src.path}' holds no records")
        out.records.append(records)
    if image_rows:
        from llava_ft.data.images import verify_images

        # Unreadable images are found here, before the model loads, rather than hours into the run. Files
        # that passed on an earlier run and have not changed are not read again (image_check_memo).
        for problem in verify_images(image_rows, num_threads=num_threads,
                                     memo_dir=data_cache_dir(data_cfg), memo_key=image_memo_key(data_cfg)):
            problems.add(REASON_UNREADABLE_IMAGE, str(problem))
    problems.finish()
    out.skipped = dict(problems.counts)
    if out.outside_image_folder:
        log.info("%d image path(s) lie outside their image_folder (e.g. %s); they are used as given",
                 out.outside_image_folder, out.outside_example)
    return out
