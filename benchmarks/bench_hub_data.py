"""Benchmark: preparing LLaVA data from json + image folder vs from a saved `datasets` folder holding the images.

    python benchmarks/bench_hub_data.py              # the demo's 60 finetune records x 100 = 6000 samples
    python benchmarks/bench_hub_data.py --times 20

Prints seconds for the cold prepare (read + tokenize + write cache) and the cached load of each source, the
size of the source and of the tokenized cache (a `datasets` source keeps a copy of its image bytes there),
and the time to decode the images of 256 samples through LlavaDataset. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def folder_size(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--times", type=int, default=100, help="copies of the 60 demo finetune records")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_hub_"))
    try:
        run(root, args.times)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path, times: int) -> None:
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from llava_ft.config import DataConfig, DataSource
    from llava_ft.data.dataset import prepare_dataset
    from llava_ft.data.llava_dataset import LlavaDataset
    from llava_ft.demo import assets
    from llava_ft.testing.hf_datasets import llava_json_as_dataset

    data = assets.make_demo_data(root / "data")
    tok = AutoTokenizer.from_pretrained(assets.build_tokenizer(root / "tok"))
    records = json.loads(Path(data["finetune"]).read_text())
    big = [dict(r, id=f"{r['id']}_{k}") for k in range(times) for r in records]
    json_path = root / "big.json"
    json_path.write_text(json.dumps(big))
    small = llava_json_as_dataset(data["finetune"], data["image_folder"], "llava_list")
    import datasets

    saved = root / "saved"
    datasets.concatenate_datasets([small] * times).save_to_disk(str(saved))

    sources = {"json + image_folder": DataSource(path=str(json_path), image_folder=data["image_folder"]),
               "save_to_disk (Image list)": DataSource(path=str(saved))}
    for name, src in sources.items():
        cfg = DataConfig(sources=[src], template="qwen_chat", max_length=2048, cache_dir=str(root / f"cache_{len(name)}"))
        t = time.perf_counter()
        cold = prepare_dataset(cfg, tok, num_image_tokens=576)
        t_cold = time.perf_counter() - t
        t = time.perf_counter()
        warm = prepare_dataset(cfg, tok, num_image_tokens=576)
        t_warm = time.perf_counter() - t
        assert warm.stats["cache_hit"]
        ds = LlavaDataset(warm.dataset, preprocess=lambda img: torch.from_numpy(np.asarray(img).copy()))
        t = time.perf_counter()
        for i in range(256):
            ds[i]
        t_decode = time.perf_counter() - t
        source_mb = (folder_size(saved) if name.startswith("save") else
                     os.path.getsize(json_path) + folder_size(data["image_folder"])) / 1e6
        print(f"{name:<28} samples {len(cold.dataset):>6}  cold {t_cold:6.2f} s  cached {t_warm:5.2f} s  "
              f"decode 256 {t_decode:5.2f} s  source {source_mb:7.1f} MB  cache {folder_size(warm.stats['cache_path']) / 1e6:7.1f} MB")


if __name__ == "__main__":
    main()
