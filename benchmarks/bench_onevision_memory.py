"""Memory of a QLoRA step on a released-LLaVA-OneVision-shaped model (`model.llava`), 4-bit vs 16-bit (issue 21).

    python benchmarks/bench_onevision_memory.py            # scaled OneVision shape (CPU: a few minutes)
    python benchmarks/bench_onevision_memory.py --quick    # tiny shape (seconds; what the test runs)

LLaVA-NeXT #203: LoRA on OneVision-7B ran out of 48 GB. This builds a random-init LlavaOnevision checkpoint
locally (transformers' own class, saved in bf16 as the Hub's are; llava_ft.testing.llava_next), then in a fresh
process per run loads it through `model.llava` exactly as a finetune does and runs ONE training step of
2,048 positions (one image + text) with gradient checkpointing, LLM LoRA r128 and tower LoRA r64 (the
recipe's settings), AdamW:
  * 4bit: model.quantization 4bit (NF4 + double quant), compute bf16 -- QLoRA;
  * bf16: no quantization, weights bf16 (fp16 weighs the same; bf16 is what the CPU computes in well).
Reported: peak RSS of each process (CPU), and the weight bytes per parameter as loaded (quantized Linear
layers vs the rest), measured from the tensors.

A 7B-shaped OneVision (Qwen2-7B + SigLIP-so400m, 8.0 B parameters) does not fit this machine's memory in
16 bit, so the 7B figures are extrapolated, on paper, from (a) the exact parameter counts of the 7B
shape (its model built on the meta device: no memory), split into quantized Linear layers and the rest,
times the bytes per parameter measured here, plus (b) LoRA trainables x 16 bytes (fp32 weight, grad, two
AdamW moments), plus (c) activations with gradient checkpointing: one bf16 hidden state per layer
(layers x positions x hidden x 2 B), one layer recomputed in full, and the logits (bf16 + fp32 upcast +
grad). That is the GPU budget (torch.cuda.max_memory_allocated; the CUDA context's ~0.5 GB comes on top);
the CPU peaks below also hold Python, torch and transformers (~1 GB), and the 4-bit run reads the bf16
checkpoint before quantizing it.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import current_rss_mb, figure, peak_rss_mb, run_json_child, section  # noqa: E402

POSITIONS = 2048
LLM_LORA = {"enabled": True, "r": 128, "alpha": 256, "dropout": 0.05}
TOWER_LORA = {"enabled": True, "r": 64, "alpha": 16, "dropout": 0.05}
# llava-onevision-qwen2-7b-ov-hf: Qwen2-7B text model, SigLIP-so400m-patch14-384 tower.
SHAPE_7B = {
    "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
    "image_size": 384, "patch_size": 14,
}
# What runs here: the 0.5B-ov widths (Qwen2-0.5B: hidden 896, vocab 151,936; the so400m tower's width) at
# fewer layers, so two 16-bit copies, activations of 2,048 positions and a step fit a shared CPU machine.
SHAPE_SCALED = {
    "text": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=6, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=4, num_attention_heads=16),
    "image_size": 384, "patch_size": 14,
}
SHAPE_QUICK = {
    "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "image_size": 32, "patch_size": 8,
}


def build(out: str, shape: dict) -> str:
    from llava_ft.demo.assets import build_tokenizer
    from llava_ft.testing.llava_next import build_tiny_llava_onevision

    tok = build_tokenizer(os.path.join(os.path.dirname(out), "tok"))
    return build_tiny_llava_onevision(out, tok, image_size=shape["image_size"], patch_size=shape["patch_size"],
                                      text_shape=shape["text"], vision_shape=shape["vision"], dtype="bfloat16")


def _weights(model) -> dict:
    """Bytes and parameters of bnb 4-bit Linear layers (packed values + quantization statistics) vs the rest."""
    q_bytes = q_params = o_bytes = o_params = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if "lora_" in name:
                continue
            if type(p).__name__ == "Params4bit":
                state = p.quant_state
                stats = state.absmax.numel() * state.absmax.element_size()
                if state.state2 is not None:
                    stats += sum(t.numel() * t.element_size() for t in (state.state2.absmax, state.state2.code))
                q_bytes += p.numel() * p.element_size() + stats
                q_params += p.numel() * p.element_size() * 2
            else:
                o_bytes += p.numel() * p.element_size()
                o_params += p.numel()
    return {"q_bytes": q_bytes, "q_params": q_params, "o_bytes": o_bytes, "o_params": o_params}


def _child(kind: str, folder: str, out: str) -> None:
    import torch

    from llava_ft import IMAGE_TOKEN_INDEX
    from llava_ft.config import config_from_dict
    from llava_ft.model.builder import build_model

    base = current_rss_mb()
    t0 = time.perf_counter()
    cfg = config_from_dict({
        "model": {"llava": folder, "quantization": "4bit" if kind == "4bit" else "none", "dtype": "bf16",
                  "gradient_checkpointing": True, "freeze_llm": True, "llm_lora": LLM_LORA,
                  "visual_encoder_lora": TOWER_LORA},
        "data": {"sources": [{"path": "unused.json"}], "template": "hf"}})
    model, _ = build_model(cfg)
    model.activation_checkpointing_enable()
    weights = _weights(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    after_load = current_rss_mb()
    load_s = time.perf_counter() - t0
    spec = model.visual_encoder.anyres
    n_text = POSITIONS - (spec.base_tokens + 1)  # one image seen as one view: base + newline
    ids = torch.randint(10, 300, (1, n_text + 1))
    ids[0, 5] = IMAGE_TOKEN_INDEX
    pixel_values = torch.randn(1, 3, spec.tile_size, spec.tile_size)
    sizes = torch.tensor([[0, 0]])
    labels = ids.clone()
    labels[0, :6] = -100
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    t1 = time.perf_counter()
    loss = model(input_ids=ids, labels=labels, pixel_values=pixel_values, image_sizes=sizes).loss
    loss.backward()
    opt.step()
    step_s = time.perf_counter() - t1
    with open(out, "w") as fh:
        json.dump({"kind": kind, "rss_before_mb": base, "rss_after_load_mb": after_load, "peak_rss_mb": peak_rss_mb(),
                   "load_seconds": load_s, "step_seconds": step_s, "weights": weights, "trainable": trainable,
                   "loss": float(loss)}, fh)


def count_7b() -> dict:
    """Parameters of the 7B OneVision shape, built on the meta device: Linear layers of the LLM and tower
    (what 4-bit quantizes) vs the rest, and the LoRA trainables of the recipe's settings (counted per Linear)."""
    import torch
    from torch import nn
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    s = SHAPE_7B
    config = LlavaOnevisionConfig(
        text_config=Qwen2Config(**s["text"]).to_dict(),
        vision_config=SiglipVisionConfig(image_size=s["image_size"], patch_size=s["patch_size"], **s["vision"]).to_dict(),
        vision_feature_layer=-1, vision_feature_select_strategy="full")
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    linear = lora = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and "lm_head" not in name and "multi_modal_projector" not in name:
            linear += m.weight.numel()
            r = LLM_LORA["r"] if "language_model" in name else TOWER_LORA["r"]
            lora += r * (m.in_features + m.out_features)
    total = sum(p.numel() for p in model.parameters())
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters()) + config.text_config.hidden_size
    return {"total": total, "linear": linear, "other": total - linear, "lora": lora, "projector": projector}


def estimate_7b_gpu(w4: dict, counts: dict) -> dict:
    """GB of GPU memory for one 7B QLoRA / bf16-LoRA step at 2,048 positions with checkpointing (on paper)."""
    t = SHAPE_7B["text"]
    bytes_per_q = w4["q_bytes"] / w4["q_params"]  # measured: packed NF4 + absmax + double-quant statistics
    trainable = counts["lora"] + counts["projector"]
    activations = (t["num_hidden_layers"] * POSITIONS * t["hidden_size"] * 2  # checkpointed layer inputs
                   + POSITIONS * (6 * t["hidden_size"] + 3 * t["intermediate_size"]) * 2 * 2  # one layer recomputed
                   + POSITIONS * t["vocab_size"] * (2 + 4 + 4))  # logits bf16, fp32 upcast for the loss, its grad
    optimizer = trainable * 16  # fp32 master + grad + 2 AdamW moments
    gb = 1e9
    return {
        "bytes_per_quantized_param": bytes_per_q,
        "qlora_weights_gb": (counts["linear"] * bytes_per_q + counts["other"] * 2) / gb,
        "bf16_weights_gb": counts["total"] * 2 / gb,
        "trainable_and_optimizer_gb": optimizer / gb,
        "activations_gb": activations / gb,
    }


def section_onevision_memory(quick: bool = False) -> dict:
    shape = SHAPE_QUICK if quick else SHAPE_SCALED
    work = tempfile.mkdtemp(prefix="bench_ov_mem_")
    try:
        folder = build(os.path.join(work, "ov"), shape)
        res = {k: run_json_child("bench_onevision_memory.py", ["--child", k, "--model", folder],
                                 600 if quick else 3600, f"{k} run") for k in ("4bit", "bf16")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    q, f = res["4bit"], res["bf16"]
    counts = count_7b()
    est = estimate_7b_gpu(q["weights"], counts)
    qlora_7b = est["qlora_weights_gb"] + est["trainable_and_optimizer_gb"] + est["activations_gb"]
    bf16_7b = est["bf16_weights_gb"] + est["trainable_and_optimizer_gb"] + est["activations_gb"]
    n_params = f["weights"]["o_params"]
    how = (f"peak RSS of a fresh process: model.llava load + tower and LLM LoRA + one AdamW step, {POSITIONS} "
           "positions (one image + text), gradient checkpointing")
    figs = [
        figure("measured shape: parameters", n_params / 1e6, "M", f"random-init LlavaOnevision, text {shape['text']}, "
               f"vision {shape['vision']}, {shape['image_size']} px"),
        figure("4-bit: peak RSS", q["peak_rss_mb"], "MiB", how),
        figure("bf16: peak RSS", f["peak_rss_mb"], "MiB", how),
        figure("4-bit / bf16 peak", q["peak_rss_mb"] / f["peak_rss_mb"], "x", "ratio of the two peaks above"),
        figure("4-bit Linear weights: bytes per parameter", est["bytes_per_quantized_param"], "B",
               "measured: bnb Linear4bit storage + statistics / Linear parameters"),
        figure("7B OneVision: parameters", counts["total"] / 1e9, "B", "Qwen2-7B + SigLIP-so400m built on meta"),
        figure("7B OneVision QLoRA step: GPU memory (on paper)", qlora_7b, "GB",
               "4-bit Linear x measured B/param + other params x 2 B + LoRA r128/r64 and projector x 16 B + "
               "checkpointed activations and logits at 2,048 positions", target="<= 24 GB", met=qlora_7b <= 24),
        figure("7B OneVision bf16 LoRA step: GPU memory (on paper)", bf16_7b, "GB", "same, weights in 16 bit"),
    ]
    notes = [
        f"7B estimate parts: QLoRA weights {est['qlora_weights_gb']:.1f} GB, bf16 weights {est['bf16_weights_gb']:.1f} "
        f"GB, LoRA + projector trainables with AdamW {est['trainable_and_optimizer_gb']:.1f} GB, activations "
        f"{est['activations_gb']:.1f} GB (of which logits {POSITIONS * SHAPE_7B['text']['vocab_size'] * 10 / 1e9:.1f} GB);"
        " add ~0.5 GB of CUDA context.",
        f"The measured CPU peaks include ~1 GB of Python + torch + transformers; load took 4-bit {q['load_seconds']:.0f} s,"
        f" bf16 {f['load_seconds']:.0f} s; the step 4-bit {q['step_seconds']:.0f} s, bf16 {f['step_seconds']:.0f} s.",
        "Extrapolated per parameter from the measured bytes, not measured at 7B: the machine has no GPU and two "
        "16-bit 8 B-parameter copies do not fit its memory.",
    ]
    return section("onevision_memory", "Released LLaVA-OneVision: QLoRA memory at 2,048 positions", figs, notes)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", choices=("4bit", "bf16"))
    ap.add_argument("--model")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.model, args.out)
    else:
        print(json.dumps(section_onevision_memory(args.quick), indent=1))


if __name__ == "__main__":
    main()
