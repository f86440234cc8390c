"""fp16 and bf16 QLoRA LLaVA training steps on a GPU: part of the `gpu` section of benchmarks/run.py.

    python benchmarks/run.py --quick --only gpu      # or: bash benchmarks/gpu_check.sh

For each model (the tiny test model, and Llama-2-7B / CLIP-L widths with a few layers) and each compute
dtype the GPU has (fp16 always, bf16 on Ampere and newer), a QLoRA LLaVA finetune (4-bit NF4 LLM + LoRA,
vision LoRA, trainable projector) runs a few steps through run_training, i.e. Trainer's own mixed precision
(autocast; GradScaler for fp16). Reported: the last loss (finite), the share of trainable weights that are
fp32 masters (100 %), the share of trainable tensors the steps changed, tokens/s and peak GPU memory.
`device`/`shape`/`steps` exist so a CPU test (tests/test_precision.py) runs this very code with tiny shapes.
Kept apart from bench_memory.gpu_qlora_throughput so either can change without touching the other.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile

from common import figure


def _snapshot_callback():
    """A TrainerCallback keeping a CPU copy of the trainable weights as training starts."""
    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        before: dict = {}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.before = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    return Snapshot()


def _tiny_assets(work: str) -> dict:
    from llava_ft.demo import assets as demo

    tok = demo.build_tokenizer(os.path.join(work, "tok"))
    data = demo.make_demo_data(os.path.join(work, "data"), n_pretrain=4, n_finetune=32, n_eval=2, n_text=4)
    return {"llm": demo.build_tiny_llm(os.path.join(work, "llm"), tok, arch="llama"),
            "clip": demo.build_tiny_clip(os.path.join(work, "clip")),
            "llava": data["finetune"], "images": data["image_folder"]}


def _run(assets: dict, dtype: str, steps: int, big: bool, work: str, device: str):
    import torch

    from llava_ft.config import Config, DataConfig, DataSource, LoraSettings, ModelConfig, TrainConfig
    from llava_ft.engine.run import run_training

    model = ModelConfig(llm=assets["llm"], quantization="4bit", dtype=dtype, attn_implementation="sdpa",
                        gradient_checkpointing=big, visual_encoder=assets["clip"], projector_depth=2,
                        llm_lora=LoraSettings(enabled=True, r=64 if big else 8, alpha=16, dropout=0.05),
                        visual_encoder_lora=LoraSettings(enabled=True, r=16 if big else 4, alpha=16, dropout=0.05))
    name = f"precision_{'7b' if big else 'tiny'}_{dtype}"
    cfg = Config(name=name, phase="finetune", model=model,
                 data=DataConfig(sources=[DataSource(path=assets["llava"], format="llava", image_folder=assets["images"])],
                                 template="qwen_chat", max_length=2048 if big else 256,
                                 cache_dir=os.path.join(work, "cache")),
                 train=TrainConfig(per_device_batch_size=4 if big else 2, max_steps=steps, learning_rate=2e-4,
                                   logging_steps=1, save_steps=100_000, warmup_ratio=0.0, dataloader_num_workers=0))
    snap = _snapshot_callback()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    res = run_training(cfg, work_dir=os.path.join(work, name), extra_callbacks=[snap])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    after = {n: p for n, p in res.model.named_parameters() if p.requires_grad}
    n_fp32 = sum(p.numel() for p in after.values() if p.dtype == torch.float32)
    n_all = sum(p.numel() for p in after.values())
    changed = sum(not torch.equal(snap.before[n], p.detach().float().cpu()) for n, p in after.items())
    losses = [h["loss"] for h in res.log_history if "loss" in h]
    rates = [h["tokens_per_s"] for h in res.log_history if h.get("tokens_per_s")][1:]
    return {"loss": losses[-1] if losses else float("nan"), "fp32": 100.0 * n_fp32 / max(n_all, 1),
            "changed": 100.0 * changed / max(len(after), 1),
            "tps": sorted(rates)[len(rates) // 2] if rates else None, "peak": peak}


def gpu_precision_steps(build_assets, shape: dict, quick: bool = False, device: str = "cuda",
                        steps: int | None = None) -> tuple[list, list]:
    """-> (figures, notes) for the gpu section; see the module docstring. `build_assets(work, shape, device,
    n_records)` and `shape` are bench_memory's 7B-shaped asset builder and SHAPE_7B (passed in by
    bench_memory.section_gpu, so that neither module imports the other)."""
    import torch

    gpu = device.startswith("cuda")
    steps = steps or (3 if quick else 10)
    shape = dict(shape)
    shape["layers"] = min(shape["layers"], 2 if quick else 8)  # per-layer memory and speed; 32 would take minutes
    dtypes = ["fp16"] + (["bf16"] if (not gpu or torch.cuda.is_bf16_supported()) else [])
    figs, notes = [], []
    work = tempfile.mkdtemp(prefix="bench_precision_")
    try:
        models = (("tiny", _tiny_assets(os.path.join(work, "tiny")), False),
                  (f"7B-shaped ({shape['layers']} layers)",
                   build_assets(os.path.join(work, "big"), shape, device, n_records=steps * 8), True))
        for label, assets, big in models:
            for dtype in dtypes:
                r = _run(assets, dtype, steps, big, work, device)
                what = f"QLoRA LLaVA {label}, {dtype}"
                how = (f"run_training on {device}, {steps} steps, model.dtype {dtype} (Trainer {dtype} autocast"
                       f"{' + GradScaler' if dtype == 'fp16' else ''}), NF4 LLM + LoRA, vision LoRA, projector")
                figs.append(figure(f"{what}: last loss", r["loss"], "loss", how, "finite", math.isfinite(r["loss"])))
                figs.append(figure(f"{what}: trainable weights in fp32", r["fp32"], "%",
                                   "share of requires_grad elements that are fp32 after training", "100 %",
                                   r["fp32"] == 100.0))
                figs.append(figure(f"{what}: trainable tensors changed", r["changed"], "%",
                                   f"share of requires_grad tensors that differ from their value at train begin "
                                   f"after {steps} steps (fp16: GradScaler may skip the first steps)", "> 0",
                                   r["changed"] > 0))
                if r["tps"] is not None:
                    figs.append(figure(f"{what}: tokens/s", r["tps"], "tokens/s",
                                       "median of per-step tokens_per_s after the first (image features counted)"))
                if r["peak"] is not None:
                    figs.append(figure(f"{what}: peak GPU memory", r["peak"], "GiB",
                                       "torch.cuda.max_memory_allocated, reset before this run"))
        if "bf16" not in dtypes:
            notes.append("This GPU has no bf16 (pre-Ampere): only fp16 ran; model.dtype auto picks fp16 here.")
        notes.append("Precision steps: fp16 and bf16 QLoRA LLaVA runs through run_training; trainable weights "
                     "are fp32 masters, frozen ones stay in the compute dtype (README: Precision and GPUs).")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return figs, notes
