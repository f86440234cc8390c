"""QLoRA memory (section `qlora`) and the GPU-only 7B-shaped throughput/MFU section (`gpu`) of benchmarks/run.py.

    python benchmarks/run.py --only qlora [--quick]
    python benchmarks/bench_memory.py [--quick]          # this section alone, prints its dict as JSON

qlora: a random-init model of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 KV, MLP 4864,
vocab 151,936, tied embeddings; 494 M parameters) saved in bf16, then loaded by llava_ft's `load_llm`
twice, each in a fresh process so peaks do not mix: 4-bit (NF4 + double quant) and full precision (fp32
on CPU, bf16 on a GPU). Each process applies LoRA (r 64, every Linear but lm_head) and runs one training
step (batch 1 x 512 tokens, AdamW). Reported: peak RSS (CPU) or torch.cuda.max_memory_allocated (GPU),
the bytes of the weights as loaded, and the bits per parameter of the 4-bit Linear weights (packed
values + absmax + double-quant statistics).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time

from common import current_rss_mb, figure, has_gpu, measured_matmul_peak, peak_rss_mb, run_json_child, section


def model_shape(quick: bool) -> dict:
    if quick:
        return dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=512, vocab_size=4096, tie_word_embeddings=True)
    return dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)


def build_model_dir(out: str, quick: bool) -> str:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from llava_ft.demo.assets import build_tokenizer

    tok_dir = build_tokenizer(os.path.join(os.path.dirname(out), "tok"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = Qwen2Config(max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **model_shape(quick))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)  # hub checkpoints ship in bf16
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def weight_stats(model) -> dict:
    """Bytes of the weights as loaded; for bnb Linear4bit also the quantization statistics and bits/param."""
    q_bytes = q_params = other_params = other_bytes = 0
    seen = set()
    for module in model.modules():
        w = getattr(module, "weight", None)
        qs = getattr(w, "quant_state", None) if w is not None else None
        if qs is None:
            continue
        seen.add(id(w))
        stats = _tensor_bytes(qs.absmax)
        if getattr(qs, "nested", False) and qs.state2 is not None:
            stats += _tensor_bytes(qs.state2.absmax) + _tensor_bytes(qs.state2.code) + 4  # + offset scalar
        stats += _tensor_bytes(qs.code) if getattr(qs, "code", None) is not None else 0
        q_bytes += _tensor_bytes(w) + stats
        q_params += int(qs.shape.numel())
    for name, p in model.named_parameters():
        if id(p) in seen or "lora_" in name:
            continue
        other_params += p.numel()
        other_bytes += _tensor_bytes(p)
    return {"quantized_params": q_params, "quantized_bytes": q_bytes, "other_params": other_params,
            "other_bytes": other_bytes, "bits_per_param_4bit": 8 * q_bytes / q_params if q_params else None}


def _child(kind: str, model_dir: str, out: str, seq: int) -> None:
    import torch

    from llava_ft.config import LoraSettings, ModelConfig
    from llava_ft.model.llm import apply_lora, load_llm

    gpu = has_gpu()
    base_rss = current_rss_mb()
    t0 = time.perf_counter()
    mcfg = ModelConfig(llm=model_dir, quantization="4bit" if kind == "4bit" else "none", dtype="auto",
                       llm_lora=LoraSettings(enabled=True, r=64, alpha=16, dropout=0.05))
    model, tok = load_llm(mcfg, for_training=True, verbose=False)
    stats = weight_stats(model)
    model = apply_lora(model, mcfg.llm_lora)
    load_s = time.perf_counter() - t0
    after_load = current_rss_mb()
    gpu_after_load = torch.cuda.memory_allocated() / 2**20 if gpu else None
    device = next(model.parameters()).device
    ids = torch.randint(10, min(tok.vocab_size, 400), (1, seq), device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    t1 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - t1
    result = {"kind": kind, "load_seconds": load_s, "step_seconds": step_s, "rss_before_mb": base_rss,
              "rss_after_load_mb": after_load, "peak_rss_mb": peak_rss_mb(), "weights": stats,
              "dtype": str(next(p for n, p in model.named_parameters() if "embed" in n).dtype)}
    if gpu:
        result["gpu_after_load_mb"] = gpu_after_load
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    with open(out, "w") as fh:
        json.dump(result, fh)


def _run_child(kind: str, model_dir: str, seq: int, timeout: float) -> dict:
    return run_json_child("bench_memory.py", ["--child", kind, "--model", model_dir, "--seq", str(seq)], timeout,
                          f"{kind} run")


def section_qlora(quick: bool = False) -> dict:
    gpu = has_gpu()
    seq = 64 if quick else 512
    work = tempfile.mkdtemp(prefix="bench_mem_")
    try:
        model_dir = build_model_dir(os.path.join(work, "model"), quick)
        res = {k: _run_child(k, model_dir, seq, 300 if quick else 900) for k in ("4bit", "full")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    q, f = res["4bit"], res["full"]
    full_name = "bf16" if gpu else "fp32"
    shape = model_shape(quick)
    n_params = f["weights"]["other_params"]
    w4 = q["weights"]
    peak_key = "peak_gpu_mb" if gpu else "peak_rss_mb"
    peak_how = ("torch.cuda.max_memory_allocated" if gpu else
                "peak RSS (VmHWM) of a fresh process (Python + torch + transformers included)")
    step = f"load_llm + LoRA r64 on every Linear but lm_head + one AdamW step on 1 x {seq} tokens"
    # What the 4-bit model's weights weigh with 16-bit non-quantized parts (as on a GPU, compute dtype bf16),
    # against the whole model in bf16: the comparison the QLoRA target is about, measured from the tensors.
    w4_bf16 = w4["quantized_bytes"] + 2 * w4["other_params"]
    bf16_all = 2 * n_params
    ratio = w4_bf16 / bf16_all
    linear_ratio = w4["quantized_bytes"] / (2 * w4["quantized_params"]) if w4["quantized_params"] else None
    figs = [
        figure("4-bit: peak memory", q[peak_key], "MiB", f"{peak_how}; {step}"),
        figure(f"{full_name}: peak memory", f[peak_key], "MiB", f"{peak_how}; {step}"),
        figure(f"4-bit / {full_name} peak", q[peak_key] / f[peak_key], "x", "ratio of the two peaks above"),
        figure("4-bit Linear weights: bits per parameter", w4["bits_per_param_4bit"], "bits",
               "bytes of bnb Linear4bit storage (packed NF4 + absmax + double-quant absmax/code) x 8 / "
               f"Linear parameters ({w4['quantized_params'] / 1e6:.1f} M)"),
        figure("4-bit Linear weights / bf16", linear_ratio, "x", "Linear4bit bytes / (Linear params x 2 bytes)",
               target="<= 0.40", met=linear_ratio is not None and linear_ratio <= 0.40),
        figure("4-bit model weights / bf16 model weights", ratio, "x",
               "(Linear4bit bytes + non-quantized params x 2 bytes) / (all params x 2 bytes); embeddings and norms "
               "stay 16-bit in QLoRA", target="<= 0.40", met=ratio <= 0.40),
        figure("4-bit: load time", q["load_seconds"], "s", "load_llm(quantization=4bit) incl. on-the-fly quantization"),
        figure(f"{full_name}: load time", f["load_seconds"], "s", "load_llm(quantization=none), dtype auto"),
    ]
    notes = [
        f"Model: random-init Qwen2 of shape {shape} = {n_params / 1e6:.0f} M parameters, saved in bf16; "
        f"{w4['other_params'] / 1e6:.0f} M of them (embeddings, norms) are not Linear layers and stay unquantized.",
        f"On {'GPU' if gpu else 'CPU'}: the full-precision run is {full_name} (dtype auto); the 4-bit run keeps its "
        f"non-quantized parts in {q['dtype']}.",
        f"RSS after load: 4-bit {q['rss_after_load_mb']:.0f} MiB, {full_name} {f['rss_after_load_mb']:.0f} MiB; "
        f"one step took 4-bit {q['step_seconds']:.1f} s, {full_name} {f['step_seconds']:.1f} s.",
    ]
    if not gpu:
        notes.append("CPU peaks include ~0.5-1 GiB of interpreter + libraries in both runs, and the 4-bit run "
                     "reads the bf16 checkpoint before quantizing, so the peak ratio is above the weight ratio.")
    return section("qlora", "QLoRA memory: 4-bit vs full precision", figs, notes)


# ----------------------------------------------------------------------------------------------------
# GPU only: 7B-shaped LLaVA / text QLoRA throughput and MFU

GPU_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def _peak_tflops() -> float | None:
    import torch

    name = torch.cuda.get_device_name(0)
    for key, tflops in GPU_PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None


# Llama-2-7B LLM + CLIP ViT-L/14-336 (LLaVA-1.5-7B's shapes); tests pass tiny ones to run the logic on CPU.
SHAPE_7B = dict(hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32, vocab=32000,
                vis_hidden=1024, vis_inter=4096, vis_layers=24, vis_heads=16, image=336, patch=14)


def _build_gpu_assets(work: str, shape: dict, device: str, n_records: int) -> dict:
    """Random-init LLM and CLIP tower of `shape` (HF folders), text and LLaVA-mix-like data."""
    import random

    import torch
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                              LlamaForCausalLM)

    from bench_data_prep import synth_rows
    from bench_train import make_records
    from llava_ft.demo import assets as demo

    tok_dir = demo.build_tokenizer(os.path.join(work, "tok"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["inter"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                      vocab_size=shape["vocab"], max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    out = {"llm": os.path.join(work, "llm"), "clip": os.path.join(work, "clip"), "images": os.path.join(work, "img")}
    with torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(dtype)
    out["n_params"] = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out["llm"])
    tok.save_pretrained(out["llm"])
    del model
    vcfg = CLIPVisionConfig(hidden_size=shape["vis_hidden"], intermediate_size=shape["vis_inter"],
                            num_hidden_layers=shape["vis_layers"], num_attention_heads=shape["vis_heads"],
                            image_size=shape["image"], patch_size=shape["patch"], projection_dim=shape["vis_hidden"])
    with torch.device(device):
        tower = CLIPVisionModel(vcfg).to(dtype)
    tower.save_pretrained(out["clip"])
    side = shape["image"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(out["clip"])
    del tower
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    out["text"] = os.path.join(work, "text.jsonl")
    with open(out["text"], "w") as fh:
        for row in synth_rows(max(n_records, 64)):
            fh.write(json.dumps(row) + "\n")
    os.makedirs(out["images"])
    rng = random.Random(0)
    for i in range(16):
        demo.draw_shape(list(demo.COLOURS)[i % len(demo.COLOURS)], demo.SHAPES[i % 3], rng, size=384).save(
            os.path.join(out["images"], f"img_{i:03d}.png"))
    num_image_tokens = (side // shape["patch"]) ** 2
    out["llava"] = os.path.join(work, "llava.json")
    scale = num_image_tokens / 576  # the LLaVA-mix length model, scaled to this tower's image tokens
    with open(out["llava"], "w") as fh:
        json.dump(make_records(tok, n_records, scale, num_image_tokens, 2048, 16), fh)
    return out


def gpu_qlora_throughput(quick: bool = False, device: str = "cuda", shape: dict | None = None,
                         steps: int | None = None) -> dict:
    """7B-shaped QLoRA through run_training: text and LLaVA finetune, each unpacked vs packed, sdpa vs flash.

    `device`/`shape`/`steps` exist so a CPU test can run this very code with tiny shapes (no GPU figures)."""
    import torch

    from llava_ft.config import Config, DataConfig, DataSource, LoraSettings, ModelConfig, TrainConfig
    from llava_ft.engine.run import run_training

    shape = dict(shape or SHAPE_7B)
    if quick and shape["layers"] > 4:
        shape["layers"] = 4
    steps = steps or (5 if quick else 20)
    gpu = device.startswith("cuda")
    work = tempfile.mkdtemp(prefix="bench_gpu_")
    figs, notes = [], []
    try:
        assets = _build_gpu_assets(work, shape, device, n_records=steps * 8)
        n_params = assets["n_params"]
        peak = _peak_tflops() if gpu else None
        measured, measured_how = measured_matmul_peak() if gpu else (None, None)  # the same run's peak
        if gpu and importlib.util.find_spec("flash_attn") is not None:
            attns = ("sdpa", "flash_attention_2")
        else:
            attns = ("sdpa",)
            notes.append("flash-attn not installed (or no GPU): flash_attention_2 runs skipped.")
        # LLaVA packed: the same records in 2048-position blocks (image features counted), one block a step;
        # with flash_attention_2 its samples run as varlen sequences (cu_seqlens from the expanded position_ids).
        arms = (("text, unpacked batch 8", "text", False, 8), ("text, packed 2048", "text", True, 1),
                ("LLaVA finetune, grouped batch 4", "llava", False, 4), ("LLaVA finetune, packed 2048", "llava", True, 1))
        for attn in attns:
            rate_of = {}
            for label, kind, pack, batch in arms:
                name = f"gpu_{attn}_{kind}_{'packed' if pack else 'unpacked'}"
                model = ModelConfig(llm=assets["llm"], quantization="4bit", dtype="auto", attn_implementation=attn,
                                    gradient_checkpointing=True,
                                    llm_lora=LoraSettings(enabled=True, r=64, alpha=16, dropout=0.05))
                if kind == "llava":
                    model.visual_encoder, model.projector_depth = assets["clip"], 2
                    source = DataSource(path=assets["llava"], format="llava", image_folder=assets["images"])
                else:
                    source = DataSource(path=assets["text"], format="openai")
                c = Config(name=name, phase="finetune" if kind == "llava" else "sft", model=model,
                           data=DataConfig(sources=[source], template="qwen_chat", max_length=2048,
                                           pack_to_max_length=pack, cache_dir=os.path.join(work, "cache")),
                           train=TrainConfig(per_device_batch_size=batch, max_steps=steps, logging_steps=1,
                                             save_steps=100_000, dataloader_num_workers=2 if gpu else 0))
                res = run_training(c, work_dir=os.path.join(work, name))
                rates = [h["tokens_per_s"] for h in res.log_history if h.get("tokens_per_s")][1:]
                tps = sorted(rates)[len(rates) // 2] if rates else float("nan")
                rate_of[(kind, pack)] = tps
                figs.append(figure(f"7B-shaped QLoRA {label} ({attn}): tokens/s", tps, "tokens/s",
                                   f"run_training on {device}, {steps} steps, median of per-step tokens_per_s after "
                                   "the first; gradient checkpointing on, NF4 double quant, LoRA r64"))
                if peak:
                    figs.append(figure(f"7B-shaped QLoRA {label} ({attn}): MFU", 100 * 6 * n_params * tps / (peak * 1e12),
                                       "%", f"6 x {n_params / 1e9:.2f} B LLM params x tokens/s / {peak:.0f} TFLOPs bf16 "
                                       "dense peak (PaLM convention; a frozen 4-bit base does ~2/3 of that work)"))
                if measured:
                    figs.append(figure(f"7B-shaped QLoRA {label} ({attn}): MFU vs measured peak",
                                       100 * 6 * n_params * tps / measured, "%",
                                       f"6 x {n_params / 1e9:.2f} B x tokens/s / measured matmul peak "
                                       f"{measured / 1e12:.0f} TFLOP/s ({measured_how}, taken in this run)"))
                if gpu:
                    figs.append(figure(f"7B-shaped QLoRA {label} ({attn}): peak GPU memory",
                                       torch.cuda.max_memory_allocated() / 2**30, "GiB",
                                       "torch.cuda.max_memory_allocated since the section started (cumulative)"))
            packed_gain = rate_of[("llava", True)] / rate_of[("llava", False)]
            figs.append(figure(f"7B-shaped QLoRA LLaVA finetune packed / grouped ({attn}): tokens/s ratio", packed_gain,
                               "x", "ratio of the two LLaVA arms' tokens/s above (same records; image features "
                               "counted as tokens on both sides)"))
        notes.append(f"Model: random-init Llama-2-7B dims ({shape['layers']} layers"
                     f"{' -- quick: 4 of 32' if quick else ''}), {n_params / 1e9:.2f} B LLM params; LLaVA arm adds a "
                     f"CLIP tower ({shape['vis_layers']} layers, {shape['image']} px / patch {shape['patch']}) + "
                     "2-layer projector, LLaVA-mix-like records (bench_train.make_records); text data is "
                     "bench_data_prep.synth_rows.")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return section("gpu", "GPU: 7B-shaped QLoRA throughput and MFU", figs, notes)


def section_gpu(quick: bool = False) -> dict:
    """The GPU section of benchmarks/run.py (skipped without CUDA)."""
    if not has_gpu():
        return section("gpu", "GPU: 7B-shaped LLaVA QLoRA throughput and MFU", [], ["skipped: no GPU"],
                       status="skipped")
    result = gpu_qlora_throughput(quick)
    from bench_precision import gpu_precision_steps  # fp16/bf16 QLoRA LLaVA steps (issue 19.1)

    figs, notes = gpu_precision_steps(_build_gpu_assets, SHAPE_7B, quick)
    result["figures"] += figs
    result["notes"] += notes
    return result


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", choices=("4bit", "full"))
    ap.add_argument("--model")
    ap.add_argument("--out")
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.model, args.out, args.seq)
    else:
        print(json.dumps(section_qlora(args.quick), indent=1))


if __name__ == "__main__":
    main()
