"""How much of a LLaVA training step is spent waiting for data, with N DataLoader workers.

    python benchmarks/bench_data_wait.py [--workers 2] [--steps 60] [--batch 8] [--workspace DIR]

Builds (or reuses) the demo workspace, then runs the real finetune pieces — `build_model` (4-bit LLM +
LoRA, CLIP tower + LoRA, projector) and `build_train_data` (LlavaDataset decoding PNGs lazily in the
workers, pad to square, MultimodalCollator) — in a plain loop: time in `next(loader)` is the data wait,
the rest is forward + backward + AdamW step. Prints the wait fraction after a warm-up. The Trainer is
left out on purpose: it adds its own bookkeeping between the two and would blur the split.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(workspace: str, workers: int, steps: int, batch: int, warmup: int = 5) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from llava_ft.config import load_config
    from llava_ft.demo.assets import build_demo_workspace
    from llava_ft.engine.run import build_train_data
    from llava_ft.model.builder import build_model

    ws = build_demo_workspace(workspace)
    root = Path(workspace).resolve()
    cfg = load_config(str(REPO / "configs/demo/tiny_llava_finetune_qlora.yaml"), overrides=[
        f"model.llm={root / 'llm'}", f"model.visual_encoder={root / 'clip'}", "model.pretrained_pth=null",
        f"data.sources.0.path={root / 'data' / 'finetune.json'}",
        f"data.sources.0.image_folder={root / 'data' / 'images'}",
        f"data.cache_dir={root / 'cache'}",
    ])
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg, for_training=True)
    dataset, collator, _ = build_train_data(cfg, model, tokenizer)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collator,
                        persistent_workers=workers > 0, drop_last=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    wait = compute = 0.0
    done = 0
    iterator = iter(loader)
    while done < warmup + steps:
        t0 = time.perf_counter()
        try:
            batch_inputs = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            continue
        t1 = time.perf_counter()
        loss = model(**batch_inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if done >= warmup:
            wait += t1 - t0
            compute += t2 - t1
        done += 1
    return {"workers": workers, "steps": steps, "batch": batch, "wait_s": wait, "compute_s": compute,
            "wait_fraction": wait / max(wait + compute, 1e-9), "workspace": str(ws.get("root", workspace))}


def section_data_wait(quick: bool = False) -> dict:
    """benchmarks/run.py section: the wait fraction with 0 and 2 DataLoader workers, alternating."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import figure, median, section

    steps, repeats = (10, 1) if quick else (40, 2)
    workspace = tempfile.mkdtemp(prefix="llava_ft_bench_wait_")
    runs: dict = {0: [], 2: []}
    for _ in range(repeats):
        for workers in (2, 0):
            runs[workers].append(measure(workspace, workers, steps, batch=8))
    method = ("tiny demo LLaVA finetune (4-bit Llama + LoRA, CLIP + LoRA, projector), real LlavaDataset decoding "
              f"PNGs + MultimodalCollator, batch 8, {steps} timed steps after 5 warm-up, plain loop; "
              f"time in next(loader) / step time; median of {repeats}")
    figs = [figure(f"data wait, {w} workers", 100 * median([r["wait_fraction"] for r in runs[w]]), "% of step time",
                   method) for w in (2, 0)]
    figs.append(figure("step time, 2 workers", 1000 * median([(r["wait_s"] + r["compute_s"]) / r["steps"]
                                                              for r in runs[2]]), "ms", method))
    notes = ["The tiny model's steps take tens of milliseconds, so this is a worst case for the loader's share; "
             "with a real 7B model a step takes seconds and the same loader's share is far smaller."]
    return section("data_wait", "Data loading: time the step waits for the DataLoader", figs, notes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workspace", default=None, help="demo workspace to build or reuse (default: a temp dir)")
    args = parser.parse_args(argv)
    workspace = args.workspace or os.path.join(tempfile.gettempdir(), "llava_ft_bench_ws")
    r = measure(workspace, args.workers, args.steps, args.batch)
    print(f"bench_data_wait: {r['workers']} workers, batch {r['batch']}, {r['steps']} timed steps: "
          f"data wait {r['wait_s']:.2f} s, compute {r['compute_s']:.2f} s, "
          f"wait fraction {100 * r['wait_fraction']:.1f} % of step time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
