"""Benchmark: cold vs cached `prepare_dataset` on synthetic conversations, and packing padding.

    python benchmarks/bench_data_prep.py            # 100k alpaca-like conversations, max_length 2048
    python benchmarks/bench_data_prep.py --n 20000 --num-proc 2

Prints seconds for the cold run (read + tokenize + save cache), the cached run (must be < 5 s), and
the packing padding ratio (target <= 5 %). Uses the demo byte-level BPE tokenizer; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time


def synth_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    words = ("the a cat dog red blue square circle answer question model data train image small large "
             "why how what when explain describe list three tips for staying healthy write poem").split()
    for i in range(n):
        # Alpaca-like: short instructions, answers from a few words to a few hundred.
        q = " ".join(rng.choices(words, k=rng.randint(4, 40)))
        a = " ".join(rng.choices(words, k=int(rng.lognormvariate(4.0, 0.9)) + 1))
        yield {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "id": f"c{i}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--num-proc", type=int, default=1)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from llava_ft.config import DataConfig, DataSource
    from llava_ft.data.dataset import prepare_dataset
    from llava_ft.demo.assets import build_tokenizer

    work = tempfile.mkdtemp(prefix="bench_data_")
    tok = AutoTokenizer.from_pretrained(build_tokenizer(os.path.join(work, "tok")))
    path = os.path.join(work, "data.jsonl")
    with open(path, "w") as fh:
        for row in synth_rows(args.n):
            fh.write(json.dumps(row) + "\n")
    for pack in (False, True):
        cfg = DataConfig(sources=[DataSource(path=path)], template="qwen_chat", max_length=args.max_length,
                         pack_to_max_length=pack, num_proc=args.num_proc, cache_dir=os.path.join(work, "cache"))
        t0 = time.perf_counter()
        cold = prepare_dataset(cfg, tok)
        t1 = time.perf_counter()
        warm = prepare_dataset(cfg, tok)
        t2 = time.perf_counter()
        assert warm.stats["cache_hit"]
        label = "packed" if pack else "unpacked"
        print(f"{label}: {args.n} conversations -> {len(cold.dataset)} rows; cold {t1 - t0:.2f} s, cached {t2 - t1:.2f} s")
        if pack:
            print(f"packing padding: {100 * cold.stats['packing']['padding_ratio']:.2f} % "
                  f"({cold.stats['packing']['blocks']} blocks of {args.max_length})")
    print(f"(work dir {work}; delete it when done)")


if __name__ == "__main__":
    main()
