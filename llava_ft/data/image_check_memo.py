"""What earlier image checks found, so a rerun or `--resume` of a big LLaVA set does not read every image again.

    memo = ImageCheckMemo(cache_dir, key, paths)  # key: what names this data (its files and image folders)
    known_good = memo.known_good()                # bool per path: passed before, file unchanged since
    ...check the others...
    memo.save(passed)                             # bool per path, after checking

Training checks every image file before the model loads (llava_ft.data.read), and that check reads each
file's header, and every chunk of a PNG: ~0.4 ms an image on 2 cores from the page cache, so minutes for
LLaVA-665K on every start, resumes included. The verdicts are kept in
`<data.cache_dir>/image_checks/<hash of key>.npz`: each path with its size, mtime, ctime and inode number
and whether it passed. The memo is looked up by path, so samples added, removed or reordered in the data
file (`data repeat --shuffle`, a grown set) keep the verdicts of the images they still use. A path is taken
as good without reading it only when it passed last time and all four are unchanged (a `stat` per file,
~2 µs), so a replaced, rewritten, cut or deleted file is checked again: ctime as well as mtime because
tools that restore an old mtime (tar, `cp -p`, `rsync -t`) cannot restore the ctime. Files that failed are
always checked again. The memo is a cache: when it cannot be read or written the run checks everything and
goes on (a warning says why), and deleting it is always safe. `llava_ft data check` does not use it: there
the user asks for every file to be read.
"""
from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from llava_ft.fileio import atomic_path

log = logging.getLogger(__name__)

_FOLDER = "image_checks"


def _stat(path: str) -> tuple[int, int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1, -1, -1  # missing or unreadable: never taken as good
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


class ImageCheckMemo:
    """The stored verdicts of one data set's images (see the module docstring)."""

    def __init__(self, cache_dir: str, key: str, paths: Sequence[str], num_threads: int = 16):
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        self.file = Path(cache_dir) / _FOLDER / f"{digest}.npz"
        self.paths = list(paths)
        # Threads, each stat-ing a run of paths: a local stat takes ~2 µs, one on a cluster's network file
        # system far longer, and stat releases the GIL. (ThreadPoolExecutor.map ignores `chunksize`.)
        runs = [self.paths[i:i + 2048] for i in range(0, len(self.paths), 2048)]
        with ThreadPoolExecutor(max_workers=max(1, min(num_threads, len(runs)))) as pool:
            stats = [row for run in pool.map(lambda run: [_stat(p) for p in run], runs) for row in run]
        self.stats = np.array(stats, dtype=np.int64).reshape(-1, 4)  # [n, 4]: size, mtime_ns, ctime_ns, inode
        self._stored = None  # (paths, stats, passed) read by known_good()

    def known_good(self) -> np.ndarray:
        """True where the file passed its last check and its size, mtime, ctime and inode are unchanged."""
        good = np.zeros(len(self.paths), dtype=bool)
        if not self.file.is_file():
            return good
        try:
            with np.load(self.file) as stored:
                names, stats, passed = stored["paths"], stored["stats"], stored["passed"]
            names = [os.fsdecode(n) for n in names.tobytes().split(b"\0")] if names.size else []
            if stats.shape != (len(names), 4) or passed.shape != (len(names),):
                raise ValueError(f"{len(names)} paths but stats {stats.shape} and verdicts {passed.shape}")
        except Exception as err:  # a damaged memo is only a cache: check everything
            log.warning("ignoring the image-check memo %s (%s); every image is checked", self.file, err)
            return good
        row_of = {name: row for row, name in enumerate(names)}
        rows = np.array([row_of.get(path, -1) for path in self.paths], dtype=np.int64)
        known = rows >= 0
        good[known] = (passed[rows[known]] & (stats[rows[known]] == self.stats[known]).all(axis=1)
                       & (self.stats[known, 0] >= 0))
        self._stored = (names, stats, passed)
        return good

    def save(self, passed: np.ndarray) -> None:
        """Store the verdicts `passed` (bool per path) with the stats read when the memo was made."""
        passed = np.asarray(passed, dtype=bool)
        if self._stored is not None and self._stored[0] == self.paths and \
                np.array_equal(self._stored[1], self.stats) and np.array_equal(self._stored[2], passed):
            return  # the memo already says exactly this
        names = np.frombuffer(b"\0".join(os.fsencode(p) for p in self.paths), dtype=np.uint8)
        try:
            with atomic_path(self.file, suffix=".tmp.npz") as tmp:
                np.savez(tmp, paths=names, stats=self.stats, passed=passed)
        except OSError as err:
            log.warning("could not save the image-check memo %s (%s); the next run checks every image again",
                        self.file, err)
