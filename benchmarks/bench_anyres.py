"""What AnyRes costs: image tokens per image and training step time, `pad` vs `anyres`, on the same data.

    python benchmarks/bench_anyres.py [--steps 20] [--batch 4] [--workspace DIR]

Builds (or reuses) the demo workspace (tiny Llama-style LLM, 32 px CLIP with 8 px patches), writes a
LLaVA finetune set whose images have mixed aspect ratios (square, 3:1 wide, 1:3 tall, 2:1), prepares it
once per mode with the real `prepare_dataset` + `LlavaDataset` + `MultimodalCollator`, and times forward
+ backward + AdamW of the finetune model (4-bit LLM + LoRA, projector) in a plain loop after a warm-up.
Reported, not targeted: AnyRes multiplies the image tokens (overview + up to 4 tiles + newlines), and the
step time follows the sequence length.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = [(48, 48), (32, 96), (96, 32), (48, 96)]  # (height, width)


def _write_data(root: Path, n: int = 48) -> tuple[str, str]:
    from PIL import Image

    folder = root / "anyres_images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    records = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        img = Image.new("RGB", (w, h), (255, 255, 255))
        x, y = rng.randrange(0, w - 8), rng.randrange(0, h - 8)
        img.paste((220, 40, 40), (x, y, x + 8, y + 8))
        img.save(folder / f"{i}.png")
        records.append({"id": f"a{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the small square?"},
            {"from": "gpt", "value": "The small square is red."}]})
    path = root / "anyres.json"
    path.write_text(json.dumps(records))
    return str(path), str(folder)


def measure(workspace: str, aspect: str, steps: int, batch: int, warmup: int = 3) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from llava_ft.config import load_config
    from llava_ft.demo.assets import build_demo_workspace
    from llava_ft.engine.run import build_train_data
    from llava_ft.model.builder import build_model

    build_demo_workspace(workspace)
    root = Path(workspace).resolve()
    data, folder = _write_data(root)
    cfg = load_config(str(REPO / "configs/demo/tiny_llava_finetune_qlora.yaml"), overrides=[
        f"model.llm={root / 'llm'}", f"model.visual_encoder={root / 'clip'}", "model.pretrained_pth=null",
        f"model.image_aspect={aspect}", "data.pad_image_to_square=false", "data.max_length=1024",
        f"data.sources.0.path={data}", f"data.sources.0.image_folder={folder}", f"data.cache_dir={root / 'cache'}",
    ])
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg, for_training=True)
    dataset, collator, _ = build_train_data(cfg, model, tokenizer)
    lengths = [dataset[i]["length"] for i in range(len(dataset))]
    text_lengths = [len(dataset[i]["input_ids"]) - 1 for i in range(len(dataset))]  # one placeholder each
    tokens_per_image = sum(a - b for a, b in zip(lengths, text_lengths)) / len(lengths)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0, collate_fn=collator,
                        drop_last=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    done, elapsed = 0, 0.0
    iterator = iter(loader)
    while done < warmup + steps:
        try:
            inputs = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            continue
        t0 = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if done >= warmup:
            elapsed += time.perf_counter() - t0
        done += 1
    return {"aspect": aspect, "tokens_per_image": tokens_per_image, "mean_length": sum(lengths) / len(lengths),
            "step_ms": 1000 * elapsed / steps, "steps": steps, "batch": batch}


def section_anyres(quick: bool = False) -> dict:
    """benchmarks/run.py section: tokens per image and step time, pad vs anyres."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import figure, section

    from common import median

    steps, repeats = (5, 1) if quick else (20, 3)
    workspace = tempfile.mkdtemp(prefix="llava_ft_bench_anyres_")
    runs: dict = {"pad": [], "anyres": []}
    for _ in range(repeats):  # alternating, so a load spike on the shared machine hits both arms alike
        for aspect in runs:
            runs[aspect].append(measure(workspace, aspect, steps, batch=4))
    pad, anyres = ({"tokens_per_image": r[0]["tokens_per_image"], "step_ms": median([x["step_ms"] for x in r])}
                   for r in (runs["pad"], runs["anyres"]))
    method = (f"tiny demo finetune model (4-bit LLM + LoRA, 32 px CLIP, patch 8), 48 images of sizes {SIZES} (h, w), "
              f"batch 4, {steps} timed steps after 3 warm-up, forward+backward+AdamW in a plain loop; "
              f"median of {repeats} alternating runs")
    figs = [figure("image tokens per image, pad", pad["tokens_per_image"], "tokens", method),
            figure("image tokens per image, anyres", anyres["tokens_per_image"], "tokens", method),
            figure("step time, pad", pad["step_ms"], "ms", method),
            figure("step time, anyres", anyres["step_ms"], "ms", method),
            figure("step time ratio anyres / pad", anyres["step_ms"] / pad["step_ms"], "x", method)]
    return section("anyres", "AnyRes cost: image tokens and step time vs pad", figs,
                   ["Reported, not targeted (issue 15). With a 336 px tower the ratio of image tokens is the same "
                    "(16 -> up to 16 x (1 + 4) + rows of newlines here; 576 -> up to 2,928 there)."])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workspace", default=os.path.join(tempfile.gettempdir(), "llava_ft_bench_ws"))
    args = parser.parse_args(argv)
    for aspect in ("pad", "anyres"):
        r = measure(args.workspace, aspect, args.steps, args.batch)
        print(f"bench_anyres: {aspect:6s} image tokens/image {r['tokens_per_image']:.1f}, mean sample length "
              f"{r['mean_length']:.1f}, step {r['step_ms']:.0f} ms (batch {r['batch']}, {r['steps']} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
