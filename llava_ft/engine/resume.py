"""Resuming a run: Trainer's `checkpoint-<step>/` folders, rotation, resume lookup, ZeRO shards -> iter file.

Layout of a work dir (see docs/architecture.md "Checkpoints"):

    iter_500.pth        {"state_dict": trainable weights, "meta": {"step", "phase", "llava_ft_version", "config"}}
    checkpoint-500/     transformers.Trainer state (optimizer, scheduler, RNG, trainer_state.json)
    last_checkpoint     text file naming the newest complete iter_<step>.pth

The `iter_<step>.pth` format itself (save, load, `last_checkpoint`) is `llava_ft.checkpoint`. Every file is written to a temporary name and `os.replace`d
(llava_ft.fileio), so Ctrl-C or a crash never leaves a half-written `iter_*.pth` under its final name. A `checkpoint-<step>/` folder counts as complete only
when its `trainer_state.json` exists (Trainer writes it last) and its `iter_<step>.pth` sits beside it;
`find_resume_checkpoint` skips incomplete ones with a warning.

    ckpt = find_resume_checkpoint(work_dir)     # -> "work_dirs/x/checkpoint-500" or None
"""
from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from llava_ft.checkpoint import ITER_RE as _ITER_RE
from llava_ft.checkpoint import iter_path, save_iter_checkpoint
from llava_ft.errors import UserError
from llava_ft.fileio import unlink_quiet as _unlink_quiet

PathLike = Union[str, os.PathLike]
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def _steps(work_dir: Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    if not work_dir.is_dir():
        return []
    found = []
    for child in work_dir.iterdir():
        m = pattern.match(child.name)
        if m:
            found.append((int(m.group(1)), child))
    return sorted(found)


def is_complete_trainer_checkpoint(folder: Path) -> bool:
    """Trainer writes trainer_state.json last; our iter file is written before the folder is used."""
    m = _CKPT_RE.match(folder.name)
    return (folder.is_dir() and (folder / "trainer_state.json").is_file() and m is not None
            and iter_path(folder.parent, int(m.group(1))).is_file())


def find_resume_checkpoint(work_dir: PathLike) -> Optional[str]:
    """Newest complete `checkpoint-<step>/` in `work_dir`, or None; warns about incomplete ones skipped."""
    for step, folder in reversed(_steps(Path(work_dir), _CKPT_RE)):
        if is_complete_trainer_checkpoint(folder):
            return str(folder)
        warnings.warn(f"ignoring incomplete checkpoint {folder} (interrupted while saving); "
                      "resuming from an earlier one", stacklevel=2)
    return None


def resolve_resume(resume: Optional[str], work_dir: PathLike) -> Optional[str]:
    """`--resume auto|PATH` -> a Trainer checkpoint folder (or None = start fresh).

    PATH may be a `checkpoint-<step>/` folder or an `iter_<step>.pth` whose folder sits beside it.
    """
    if not resume:
        return None
    if resume == "auto":
        found = find_resume_checkpoint(work_dir)
        if found is None:
            print(f"[llava_ft] --resume auto: no complete checkpoint in {work_dir}; starting from step 0", flush=True)
        return found
    path = Path(resume)
    m = _ITER_RE.match(path.name)
    if m:
        path = path.parent / f"checkpoint-{m.group(1)}"
    if not path.is_dir():
        raise UserError(f"--resume {resume}: no such checkpoint folder ({path}); use --resume auto or a "
                        "checkpoint-<step>/ folder in the work dir")
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume {resume}: {path} is incomplete (no trainer_state.json; the save was "
                        "interrupted); pick an earlier checkpoint or use --resume auto")
    return str(path)


def is_trainer_checkpoint_dir(path: PathLike) -> bool:
    return Path(path).is_dir() and _CKPT_RE.match(Path(path).resolve().name) is not None


def iter_from_trainer_checkpoint(folder: PathLike, out_dir: PathLike) -> str:
    """An `iter_<step>.pth` for a `checkpoint-<step>/` folder (what `convert pth_to_hf` is given).

    The iter file beside the folder when it exists (every run writes one). Otherwise (copied folder,
    deleted iter file) the trainable weights are gathered from the DeepSpeed ZeRO shards with
    deepspeed's zero_to_fp32 and written as `iter_<step>.pth` under `out_dir` (the caller's to delete;
    convert uses a scratch folder):
    the same keys as the iter file a single process writes (names from the shards' `param_shapes`,
    which list exactly the parameters the optimizer trained).
    """
    folder = Path(folder).resolve()
    m = _CKPT_RE.match(folder.name)
    if not folder.is_dir() or m is None:
        raise UserError(f"{folder} is not a checkpoint-<step>/ folder")
    step = int(m.group(1))
    beside = iter_path(folder.parent, step)
    if beside.is_file():
        return str(beside)
    shards = sorted(folder.glob("global_step*/*model_states.pt"))
    if not shards:
        raise UserError(f"{folder}: no {beside.name} beside it and no DeepSpeed shards (global_step*/) inside; "
                        "pass the iter_<step>.pth file instead")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    full = get_fp32_state_dict_from_zero_checkpoint(str(folder))
    states = torch.load(shards[0], map_location="cpu", weights_only=False)  # our own checkpoint, not user input
    trainable = set().union(*[set(group) for group in states.get("param_shapes") or []])
    meta = {"step": step, "source": str(folder)}
    saved_cfg = folder.parent / "config.yaml"
    if saved_cfg.is_file():  # run_training saves the resolved config in the work dir
        import yaml

        meta["config"] = yaml.safe_load(saved_cfg.read_text())
    return str(save_iter_checkpoint(Path(out_dir), step, {k: v for k, v in full.items() if k in trainable}, meta))


def rotate_checkpoints(work_dir: PathLike, limit: int, keep: Optional[int] = None) -> list[str]:
    """Keep the newest `limit` iter_<step>.pth files (and their checkpoint-<step>/ folders); return removed.

    `keep` (e.g. the step just saved) is never removed. `limit <= 0` keeps everything.
    Temp files of an interrupted save (`.iter_*.tmp`) are removed too.
    """
    work_dir = Path(work_dir)
    removed: list[str] = []
    for stale in work_dir.glob(".iter_*.pth.*.tmp"):
        _unlink_quiet(stale)
    if limit <= 0:
        return removed
    steps = sorted({s for s, _ in _steps(work_dir, _ITER_RE)} | {s for s, _ in _steps(work_dir, _CKPT_RE)})
    old = [s for s in steps if s != keep]
    excess = len(steps) - limit
    for step in old[:max(excess, 0)]:
        for target in (iter_path(work_dir, step), work_dir / f"checkpoint-{step}"):
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
                removed.append(str(target))
            elif target.exists():
                _unlink_quiet(target)
                removed.append(str(target))
    return removed
