"""Atomic writes for every file and folder llava_ft produces, with the modes the user's umask asks for.

    from llava_ft import fileio
    fileio.write_text(work_dir / "last_checkpoint", "iter_500.pth\\n")
    fileio.write_json(folder / "llava_ft.json", meta)
    fileio.torch_save({"state_dict": sd}, work_dir / "iter_500.pth")
    with fileio.atomic_path(out / "model.safetensors") as tmp:   # for writers that want a path
        save_file(tensors, str(tmp))
    with fileio.atomic_open("out.jsonl") as fh:                   # streamed text
        fh.write(line)
    with fileio.atomic_dir("exports/hf") as tmp:                  # a whole folder, published by one rename
        model.save_pretrained(tmp)

Each file is written under a temporary name in the destination folder and `os.replace`d over the final
name only once complete, so a crash or Ctrl-C never leaves half a file under the real name (a reader sees
the old file or the new one). `tempfile.mkstemp` / `mkdtemp` create 0600 files and 0700 folders so that
temp files are private; that is wrong for outputs, which on a shared cluster must come out like any other
tool's (0644 / 0755 under umask 022). So every temp file and folder is chmod'ed to what a plain `open()` /
`os.mkdir()` would give under the current umask before it is renamed into place.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Union

PathLike = Union[str, os.PathLike]


def current_umask() -> int:
    """The process umask. Read from /proc where it is shown (Linux), since the portable way (set it, then
    set it back) briefly changes it for every thread of the process."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new file under the current umask (0o644 under umask 022)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode of a new folder under the current umask (0o755 under umask 022)."""
    return 0o777 & ~current_umask()


def unlink_quiet(path: PathLike) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block ends normally it gets the umask's file mode and is
    renamed over `path`, otherwise it is removed. `suffix` lets writers that choose the format from the
    file name (matplotlib) see the right one, e.g. ".tmp.png"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        unlink_quiet(tmp)
        raise


class AtomicFile:
    """A text file written under a temp name beside `path` (`.f` is the open file); `commit()` renames it
    over `path`, `abort()` removes it. For writers that open and finish in different calls."""

    def __init__(self, path: PathLike, suffix: str = ".partial"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=suffix)
        self.f: IO[str] = os.fdopen(fd, "w", encoding="utf-8")

    def commit(self) -> None:
        self.f.close()
        os.chmod(self.tmp, file_mode())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        unlink_quiet(self.tmp)


@contextlib.contextmanager
def atomic_open(path: PathLike) -> Iterator[IO[str]]:
    """A UTF-8 text file object; the content appears at `path` only when the block ends normally."""
    out = AtomicFile(path, suffix=".tmp")
    try:
        yield out.f
    except BaseException:
        out.abort()
        raise
    out.commit()


def write_text(path: PathLike, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: PathLike, obj: Any, indent: int | None = 2) -> None:
    """JSON (UTF-8, non-ASCII kept as is) plus a final newline."""
    with atomic_open(path) as fh:
        json.dump(obj, fh, indent=indent, ensure_ascii=False)
        fh.write("\n")


def write_jsonl(path: PathLike, rows: Iterable[Any]) -> None:
    """One compact JSON object per line."""
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def torch_save(obj: Any, path: PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def staging_dir(final: PathLike) -> Path:
    """An empty sibling folder of `final` (same file system, so the publishing rename is atomic), with the
    mode `os.mkdir` would give. Fill it, then `publish_dir` it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.staging."))
    os.chmod(tmp, dir_mode())
    return tmp


def follow_umask(root: PathLike) -> None:
    """Give every file and folder under `root` the mode a plain create would give under the umask.

    Needed for folders that libraries fill: safetensors (0.7+) writes each `.safetensors` file through its
    own private temp file, so `save_pretrained` leaves 0600 weights (peft adapters, HF exports) even under
    umask 022. Executable files stay executable (0o777 & ~umask)."""
    fmode, dmode = file_mode(), dir_mode()
    for folder, dirs, files in os.walk(root):
        os.chmod(folder, dmode)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, dmode if os.stat(path).st_mode & 0o111 else fmode)


def publish_dir(tmp: PathLike, final: PathLike) -> str:
    """Rename the staged folder over `final` (replacing an older `final` if there is one), after giving its
    content the umask's modes (`follow_umask`)."""
    final = Path(final)
    follow_umask(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return str(final)


@contextlib.contextmanager
def atomic_dir(final: PathLike) -> Iterator[Path]:
    """Yield a staging folder; published over `final` when the block ends normally, removed otherwise."""
    tmp = staging_dir(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, final)
