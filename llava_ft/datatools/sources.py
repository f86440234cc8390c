"""What `data check` / `data stats` look at: data files + tokenizer settings, from a config or from flags.

    plan = plan_from_args(args)        # CONFIG -> every data source, tokenizer, template, max_length, ...
    for item in iter_canonical(src.path, src.format, src.image_folder, on_problem, source=src):  # lenient reader
        item.raw, item.record          # RawRecord (line) and the canonical record (llava_ft.data.formats)

Sources read with `datasets` (Hub ids, dataset folders, parquet; llava_ft.data.hub) are checked too: their
`line` is the 1-based row number, and images stored inside the dataset travel as `record["image_data"]`.

Records are parsed with llava_ft.data.formats.to_record (the parser training uses); a record it rejects
is reported to `on_problem` as kind `malformed` and skipped, so one bad record never hides the others.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from llava_ft.data.formats import FORMATS, detect_format, rename_keys, to_record
from llava_ft.data.jsonio import RawRecord, iter_raw
from llava_ft.errors import UserError


@dataclass
class Source:
    path: str
    format: str = "auto"
    image_folder: Optional[str] = None


@dataclass
class Plan:
    sources: list = field(default_factory=list)  # list[Source]
    tokenizer: Optional[str] = None
    template: str = "default"
    system: Optional[str] = None
    max_length: Optional[int] = None
    num_image_tokens: object = 0  # an int, or an ImageTokenCount (AnyRes: llava_ft.model.anyres)
    max_prompt_length: Optional[int] = None  # preference pairs (None: max_length // 2)


@dataclass
class Problem:
    kind: str
    severity: str  # error | warning
    message: str
    file: str
    line: Optional[int] = None
    id: Optional[str] = None

    def where(self) -> str:
        loc = f"{self.file}:{self.line}" if self.line else self.file
        return loc + (f" (id {self.id})" if self.id is not None else "")


@dataclass
class Item:
    raw: RawRecord
    record: dict
    format: str


def num_image_tokens_from_encoder(path: str) -> int:
    """Patches per image for an HF CLIP/SigLIP folder (CLIP's CLS is dropped, SigLIP has none)."""
    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        vision = cfg.get("vision_config", cfg)
        if "image_size" in vision and "patch_size" in vision:
            return (int(vision["image_size"]) // int(vision["patch_size"])) ** 2
    raise UserError(f"cannot tell how many tokens an image takes from visual encoder '{path}'; "
                    "pass --num-image-tokens N")


def plan_from_args(args) -> Plan:
    """Build the plan from `CONFIG` (positional) or `--data` flags; flags override the config's values."""
    plan = Plan()
    if getattr(args, "config", None):
        from llava_ft.config import load_config

        cfg = load_config(args.config, getattr(args, "overrides", None) or [])
        # DataSource (split/subset/columns for `datasets` sources); validation sources are checked too
        plan.sources = list(cfg.data.sources) + list(cfg.data.val_sources)
        plan.tokenizer = cfg.model.tokenizer or cfg.model.llava or cfg.model.llm or None
        plan.template, plan.system, plan.max_length = cfg.data.template, cfg.data.system, cfg.data.max_length
        plan.max_prompt_length = cfg.preference.max_prompt_length
        if cfg.is_llava and not getattr(args, "num_image_tokens", None):
            plan.num_image_tokens = num_image_tokens_from_encoder(cfg.model.llava or cfg.model.visual_encoder)
            if cfg.model.image_aspect == "anyres":
                from llava_ft.model.anyres import counter_from_model_config

                plan.num_image_tokens = counter_from_model_config(cfg.model, plan.num_image_tokens)
    if getattr(args, "data", None):
        plan.sources = [Source(args.data, args.format or "auto", args.image_folder)]
    if not plan.sources:
        raise UserError("give a CONFIG or --data FILE to check")
    for attr in ("tokenizer", "template", "max_length", "num_image_tokens", "system", "max_prompt_length"):
        value = getattr(args, attr, None)
        if value is not None:
            setattr(plan, attr, value)
    return plan


def load_tokenizer(path: str):
    """The tokenizer training would use for `path` (llava_ft.model.llm.load_tokenizer: InternLM2's
    sentencepiece tokenizer converted natively, tokenizer-only folders accepted)."""
    from types import SimpleNamespace

    from llava_ft.model.llm import load_tokenizer as load_training_tokenizer

    if not os.path.exists(path):
        raise UserError(f"tokenizer '{path}' does not exist; pass --tokenizer DIR (a folder with tokenizer files)")
    try:
        return load_training_tokenizer(SimpleNamespace(llm=path, tokenizer=None, trust_remote_code=False))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from '{path}': {err}") from None


def record_id(raw: RawRecord, file: str) -> Optional[str]:
    if isinstance(raw.value, dict) and raw.value.get("id") not in (None, ""):
        return str(raw.value["id"])
    return None


def _iter_dataset_source(src, on_problem: Callable[[Problem], None]) -> Iterator[Item]:
    """iter_canonical for a source read with `datasets` (llava_ft.data.hub); line = 1-based row number."""
    from llava_ft.data import hub

    ds, fmt = hub.open_source(src)
    for index, row in enumerate(hub.iter_rows(ds)):
        where = f"{src.path}[#{index}]"
        rid = str(row["id"]) if row.get("id") not in (None, "") else None
        try:
            record = hub.row_record(row, fmt, where, index, src)
        except UserError as err:
            message = str(err).removeprefix(where + ": ").removeprefix(where + " ")
            on_problem(Problem("malformed", "error", message, src.path, index + 1, rid))
            continue
        yield Item(RawRecord(index, index + 1, row), record, fmt)


def iter_canonical(path: str, fmt: str, image_folder: Optional[str],
                   on_problem: Callable[[Problem], None], source=None) -> Iterator[Item]:
    """Canonical records of a file; invalid JSON and records the parser rejects go to `on_problem`.

    `source` (a DataSource) carries split/subset/columns for sources read with `datasets`."""
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not a format; choose auto or one of: {', '.join(FORMATS)}")
    from llava_ft.config import DataSource
    from llava_ft.data import hub

    src = source if isinstance(source, DataSource) else DataSource(path=path, format=fmt, image_folder=image_folder)
    if hub.is_dataset_source(src):
        yield from _iter_dataset_source(src, on_problem)
        return
    base_dir = os.path.dirname(os.path.abspath(path))
    folder = image_folder if image_folder is not None else base_dir
    detected: Optional[str] = None if fmt == "auto" else fmt

    def json_problem(p) -> None:
        lost = "; nothing after it in this JSON list can be read" if p.stops else ""
        on_problem(Problem(p.kind, "error", p.message + lost, path, p.line))  # invalid_json or not_utf8

    for raw in iter_raw(path, on_error=json_problem):
        rid = record_id(raw, path)
        where = f"{path}:{raw.line}"
        if not isinstance(raw.value, dict):
            on_problem(Problem("malformed", "error", f"expected a JSON object, got {type(raw.value).__name__}",
                               path, raw.line, rid))
            continue
        try:
            value = rename_keys(raw.value, src.columns) if src.columns else raw.value
            rec_fmt = detected or detect_format(value, where, image_folder)
            record = to_record(value, rec_fmt, where, raw.index, folder, base_dir)
        except UserError as err:
            message = str(err).removeprefix(where + ": ").removeprefix(where + " ")
            on_problem(Problem("malformed", "error", message, path, raw.line, rid))
            continue
        if detected is None:
            detected = rec_fmt
        yield Item(raw, record, rec_fmt)


def encode_lengths(records: list, tokenizer, plan: Plan) -> list:
    """EncodeResult per record with no truncation (max_length huge): true lengths after image expansion."""
    from llava_ft.data.encode import encode_records

    return encode_records(records, tokenizer, plan.template, max_length=1 << 40, system=plan.system,
                          num_image_tokens=plan.num_image_tokens, skip_bad_samples=True)


def as_dict(obj: Any) -> dict:
    from dataclasses import asdict

    return asdict(obj)
