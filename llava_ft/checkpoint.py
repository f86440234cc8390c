"""The `iter_<step>.pth` format: the one module that saves, loads and inspects it.

    iter_500.pth     torch.save of {"state_dict": trainable weights (CPU, contiguous),
                                    "meta": {"step", "phase", "llava_ft_version", "config": the resolved Config}}
    last_checkpoint  text file beside it naming the newest complete iter_<step>.pth (absolute path)

XTuner users know this file: `llava_ft convert pth_to_hf`, `chat`, `eval`, `model.pretrained_pth` and
`--resume` all take it. Training (engine), model building (`pretrained_pth`), inference and convert use the
functions below, so the layout is defined once; Trainer's `checkpoint-<step>/` folders, rotation and resume
lookup are training concerns and live in `llava_ft.engine.resume`.

    save_iter_checkpoint(work_dir, step, model.trainable_state_dict(), meta)   # atomic, umask modes
    raw = load_iter_checkpoint("work_dirs/x/iter_500.pth")                     # {"state_dict", "meta"}
    state_dict, meta, cfg = load_iter_and_config("work_dirs/x/iter_500.pth")  # cfg: the run's Config
    newest_iter_file("work_dirs/x")                                            # Path or None

Loading uses `torch.load(weights_only=True)`: a checkpoint from elsewhere cannot run code.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union

from llava_ft import fileio
from llava_ft.errors import UserError

PathLike = Union[str, os.PathLike]
ITER_RE = re.compile(r"^iter_(\d+)\.pth$")
LAST_CHECKPOINT = "last_checkpoint"


def iter_path(work_dir: PathLike, step: int) -> Path:
    return Path(work_dir) / f"iter_{step}.pth"


def save_iter_checkpoint(work_dir: PathLike, step: int, state_dict: dict, meta: dict) -> Path:
    """Write `iter_<step>.pth` (CPU tensors, contiguous) atomically and point `last_checkpoint` at it."""
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    path = iter_path(work_dir, step)
    fileio.torch_save({"state_dict": sd, "meta": dict(meta, step=int(step))}, path)
    fileio.write_text(Path(work_dir) / LAST_CHECKPOINT, str(path.resolve()) + "\n")
    return path


def load_iter_checkpoint(path: PathLike) -> dict:
    """The raw `{"state_dict", "meta"}` of an `iter_<step>.pth` (weights_only); UserError when missing or
    not ours."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, pickle of arbitrary objects, ...
        raise UserError(f"checkpoint {path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0]}); "
                        "it may be truncated: use an earlier iter_*.pth") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise UserError(f"checkpoint {path} is not an llava_ft iter_*.pth (no 'state_dict' key)")
    return obj


def load_iter_and_config(path: PathLike, need_config: bool = True):
    """(state_dict, meta, Config or None) of an `iter_<step>.pth`: the weights plus the run's config rebuilt
    from `meta.config`. UserError when it has none and `need_config` (pass the run's CONFIG instead)."""
    from llava_ft.config import config_from_dict

    ckpt = load_iter_checkpoint(path)
    if "config" not in (ckpt.get("meta") or {}):
        if not need_config:
            return ckpt["state_dict"], ckpt.get("meta") or {}, None
        raise UserError(f"{path}: has no meta.config (the run's config); pass the run's CONFIG explicitly "
                        "(llava_ft convert pth_to_hf CONFIG PTH OUT)")
    cfg = config_from_dict(ckpt["meta"]["config"], where=f"{path} (meta.config)")
    return ckpt["state_dict"], ckpt["meta"], cfg


def newest_iter_file(work_dir: PathLike) -> Optional[Path]:
    """The checkpoint named by `last_checkpoint`, else the `iter_N.pth` with the largest N, else None."""
    work = Path(work_dir)
    marker = work / LAST_CHECKPOINT
    if marker.is_file():
        name = marker.read_text(encoding="utf-8").strip()
        candidate = Path(name) if os.path.isabs(name) else work / name
        if candidate.is_file():
            return candidate
    steps = [(int(m.group(1)), p) for p in work.iterdir() if (m := ITER_RE.match(p.name)) and p.is_file()]
    return max(steps)[1] if steps else None
