"""What kind of trained artifact a path is, read from the files we (or transformers/PEFT) saved.

    art = detect_artifact("work_dirs/run")     # Artifact(kind="iter_pth", path=".../iter_500.pth")
    art.kind in ARTIFACT_KINDS

Never guessed from folder names (LLaVA #1021): an `iter_N.pth` file (or a work dir whose `last_checkpoint`
names one), a folder with `config.json` `model_type: llava`, `llava_next` or `llava_onevision` (llava-hf export),
a folder with `projector/`
(XTuner layout from `convert pth_to_hf`), a folder with `adapter_config.json` (PEFT adapter), or a folder
with `config.json` (a plain/merged Hugging Face causal LM).

Every folder `llava_ft convert` writes also holds `llava_ft.json` (`write_meta` / `read_meta`): the prompt
template, system prompt, image padding and the resolved training config, so inference renders prompts and
images exactly as training did without the user repeating them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llava_ft.checkpoint import newest_iter_file
from llava_ft.errors import UserError
from llava_ft.fileio import write_json

META_NAME = "llava_ft.json"
ARTIFACT_KINDS = ("iter_pth", "llava_hf", "xtuner_llava", "peft_adapter", "hf_model")


@dataclass
class Artifact:
    kind: str  # one of ARTIFACT_KINDS
    path: str  # the file (iter_pth) or folder


write_json_atomic = write_json  # old name (one release) of llava_ft.fileio.write_json


def write_meta(folder, meta: dict) -> None:
    write_json(Path(folder) / META_NAME, meta)


def read_meta(folder) -> dict:
    """The `llava_ft.json` of an exported folder, or {} for folders we did not write."""
    path = Path(folder) / META_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err}); re-run `llava_ft convert` to rewrite it") from None


def model_type_of(folder: Path) -> Optional[str]:
    """config.json's model_type of a folder (None without config.json); bad JSON is a UserError."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except json.JSONDecodeError as err:
        raise UserError(f"{cfg}: not valid JSON ({err})") from None


def detect_artifact(path) -> Artifact:
    """Classify `path` (see module docstring); UserError saying what was expected when it is none of them."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: no such file or folder. Give a work dir, an iter_N.pth file, a folder written by "
                        "`llava_ft convert`, or a Hugging Face model folder")
    if p.is_file():
        if p.suffix == ".pth":
            return Artifact("iter_pth", str(p))
        raise UserError(f"{p}: a file, but not an iter_N.pth checkpoint; give the checkpoint or a model folder")
    if (p / "projector").is_dir():
        return Artifact("xtuner_llava", str(p))
    model_type = model_type_of(p)
    if model_type in ("llava", "llava_next", "llava_onevision"):  # llava_next: an AnyRes run's export (or llava-v1.6)
        return Artifact("llava_hf", str(p))
    if (p / "adapter_config.json").is_file():
        return Artifact("peft_adapter", str(p))
    if model_type is not None:
        return Artifact("hf_model", str(p))
    newest = newest_iter_file(p)
    if newest is not None:
        return Artifact("iter_pth", str(newest))
    raise UserError(f"{p}: not a model folder (no config.json, adapter_config.json or projector/) and no "
                    "iter_N.pth checkpoint inside. Point at a work dir, a checkpoint or a converted folder")
