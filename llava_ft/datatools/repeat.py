"""Repeat a dataset N times, keeping its container (JSON list or JSONL): `llava_ft data repeat -i IN -o OUT -n N`.

Records are streamed from the input once per repetition and written as they are read, so memory does not
grow with N. With `shuffle`, each repetition is written in its own order (seed + repetition); that needs
the serialized records of one copy in memory (memory grows with the dataset, never with N).
"""
from __future__ import annotations

import json
import random

from tqdm import tqdm

from llava_ft.data.jsonio import detect_container, iter_raw
from llava_ft.datatools.io import RecordWriter
from llava_ft.errors import UserError


def repeat_dataset(src: str, out: str, n: int, shuffle: bool = False, seed: int = 0, force: bool = False,
                   progress: bool = False) -> int:
    """Write `src` repeated `n` times to `out` (same container as `src`); returns the records written."""
    if n < 1:
        raise UserError(f"-n must be >= 1, got {n}")
    container = detect_container(src)
    with RecordWriter(out, container, inputs=[src], force=force) as writer:
        bar = tqdm(total=None, unit="rec", desc="repeat", disable=not progress)
        if shuffle:
            rows = [json.dumps(r.value, ensure_ascii=False) for r in iter_raw(src)]
            for rep in range(n):
                order = list(range(len(rows)))
                random.Random(seed + rep).shuffle(order)
                for i in order:
                    writer.write_raw(rows[i])
                bar.update(len(rows))
        else:
            for _ in range(n):
                for rec in iter_raw(src):
                    writer.write(rec.value)
                    bar.update(1)
        bar.close()
    return writer.count
