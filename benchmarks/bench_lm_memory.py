"""Memory near the limit (section `memory` of benchmarks/run.py): QLoRA peak and tokens/s, before and after
the chunked loss (llava_ft.model.lm_loss) and the shard-by-shard 4-bit load, and the floor they approach.

    python benchmarks/run.py --only memory [--quick]
    python benchmarks/bench_lm_memory.py [--quick]                 # this section alone, JSON on stdout
    python benchmarks/bench_lm_memory.py --child step --model DIR --seq 4096 --chunk 0 --out r.json

Models: random-init Qwen2.5-0.5B-shaped (hidden 896, 14 / 2 heads, MLP 4864, vocab 151,936, tied) and
Qwen2.5-3B-shaped (hidden 2048, 16 / 2 heads, MLP 11008, vocab 151,936, tied) checkpoints written in bf16
as several safetensors shards, tensor by tensor (no model is ever built in memory to make them). Each
measurement runs in a fresh process (peak RSS = VmHWM of that process, common.peak_rss_mb):

  load   load_llm(quantization 4bit) alone: peak RSS vs RSS after loading, and the loaded weights' bytes;
         "before" is transformers' default load, "after" llava_ft's (llava_ft.model.llm).
  step   load_llm 4-bit + LoRA r 64 on every Linear but lm_head + gradient checkpointing, then AdamW steps
         of batch 1 x seq positions with LLaVA-style labels (image features and prompts -100: 6,016 of
         18,228 positions supervised in bench_train's mix, 33 %, laid out as image / prompt / answer
         turns); "before" = train.loss_chunk_tokens 0 (transformers' forward: logits at every position),
         "after" = the default chunked loss. tokens/s counts every position, as Trainer does.

On 2 shared CPU cores the decoder depth is cut (`layers` below; the full models have 24 / 36): the head,
the vocabulary and the widths are the real ones, and the head's share of the step is larger than at full
depth, so the tokens/s ratio is also projected to full depth from the model FLOPs (stated in the notes).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time

from common import current_rss_mb, figure, peak_rss_mb, run_json_child, section

SHAPES = {
    "0.5B": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "3B": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
               intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True),
}
QUICK_SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=256, vocab_size=8192, tie_word_embeddings=True)
LORA_R = 64
SUPERVISED_SHARE = 6016 / 18228  # bench_train's LLaVA mix


def write_sharded_checkpoint(out: str, shape: dict, shard_mb: int = 500, seed: int = 0) -> dict:
    """A Qwen2 checkpoint of `shape` in bf16, random N(0, 0.02) weights (norms 1), in shards of ~shard_mb,
    written tensor by tensor from the meta-device model's names and shapes. Returns sizes."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llava_ft.demo.assets import build_tokenizer

    os.makedirs(out, exist_ok=True)
    tok_dir = build_tokenizer(os.path.join(os.path.dirname(out), os.path.basename(out) + "_tok"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = Qwen2Config(max_position_embeddings=8192, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, dtype="bfloat16", **shape)
    with torch.device("meta"):
        meta = Qwen2ForCausalLM(cfg)
    names = [(n, p.shape) for n, p in meta.state_dict().items() if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    gen = torch.Generator().manual_seed(seed)
    shards, current, size, weight_map, total = [], {}, 0, {}, 0

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, os.path.join(out, name), metadata={"format": "pt"})
            shards.append(name)
            for k in current:
                weight_map[k] = name
            current, size = {}, 0

    for name, shp in names:
        if name.endswith("norm.weight"):
            t = torch.ones(shp, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shp, generator=gen) * 0.02).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if size and size + nbytes > shard_mb * 2**20:
            flush()
        current[name] = t
        size += nbytes
        total += nbytes
    flush()
    # Rename to the -of-N form transformers writes, and the index.
    final = {}
    for i, name in enumerate(shards):
        new = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.rename(os.path.join(out, name), os.path.join(out, new))
        final[name] = new
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}, fh)
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    n_params = sum(math.prod(s) for _, s in names)
    return {"dir": out, "shards": len(shards), "bytes": total, "params": n_params}


def llava_labels(seq: int, vocab: int, seed: int = 0):
    """input_ids and LLaVA-style labels for one row of `seq` positions: 576 'image' positions and a prompt
    unsupervised, then alternating answer (supervised) / prompt (not) turns, ~33 % supervised overall."""
    import random

    import torch

    rng = random.Random(seed)
    ids = torch.tensor([rng.randrange(10, min(vocab, 4000)) for _ in range(seq)])
    labels = torch.full((seq,), -100)
    prefix = min(576 + 40, seq // 4)  # image features + first prompt
    share = min(1.0, SUPERVISED_SHARE * seq / (seq - prefix))  # of the rest, in turns of 100 positions
    for start in range(prefix, seq, 100):
        answer = start + int(round(100 * (1 - share)))
        labels[answer:start + 100] = ids[answer:start + 100]
    return ids[None], labels[None]


def _child_load(model_dir: str, out: str, how: str) -> None:
    from llava_ft.config import ModelConfig
    from llava_ft.model import llm as llm_mod

    base = current_rss_mb()
    t0 = time.perf_counter()
    mcfg = ModelConfig(llm=model_dir, quantization="4bit", dtype="auto")
    if how == "before":
        os.environ["LLAVA_FT_TRANSFORMERS_LOAD"] = "1"
    model, _ = llm_mod.load_llm(mcfg, for_training=False, verbose=False)
    seconds = time.perf_counter() - t0
    loaded = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    with open(out, "w") as fh:
        json.dump({"rss_before_mb": base, "rss_after_load_mb": current_rss_mb(), "peak_rss_mb": peak_rss_mb(),
                   "loaded_mb": loaded / 2**20, "seconds": seconds}, fh)


def _child_step(model_dir: str, out: str, seq: int, chunk: int, steps: int) -> None:
    import torch

    from llava_ft.config import LoraSettings, ModelConfig
    from llava_ft.model.llava import LlavaFtModel
    from llava_ft.model.llm import apply_lora, load_llm

    torch.manual_seed(0)
    mcfg = ModelConfig(llm=model_dir, quantization="4bit", dtype="auto", gradient_checkpointing=True,
                       llm_lora=LoraSettings(enabled=True, r=LORA_R, alpha=16, dropout=0.05))
    llm, _ = load_llm(mcfg, for_training=True, verbose=False)
    model = LlavaFtModel(apply_lora(llm, mcfg.llm_lora))
    model.loss_chunk_tokens = chunk
    model.train()
    after_load = current_rss_mb()
    ids, labels = llava_labels(seq, llm.config.vocab_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with open(out, "w") as fh:
        json.dump({"rss_after_load_mb": after_load, "peak_rss_mb": peak_rss_mb(), "step_seconds": times,
                   "loss": loss.item(), "supervised": int((labels[:, 1:] != -100).sum()), "lora_params": n_lora}, fh)


def floor_mb(shape: dict, layers: int, seq: int, chunk: int, lora_params: int) -> dict:
    """The computed floor of a QLoRA step: 4-bit weights + LoRA weights, grads and AdamW states + one
    layer's activations under checkpointing + the layer inputs kept + one loss chunk."""
    h, v, inter = shape["hidden_size"], shape["vocab_size"], shape["intermediate_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = h // heads
    per_layer_linear = h * h * 2 + 2 * h * kv * head_dim + 3 * h * inter
    nf4 = layers * per_layer_linear * (4 + 0.127 * 4) / 8  # ~4.127 bits: NF4 + double-quantized absmax
    embed = v * h * 4  # fp32 on CPU (dtype auto); tied, so the head is the same tensor
    lora = lora_params * 4 * 4  # weight, grad, exp_avg, exp_avg_sq (fp32)
    kept_inputs = layers * seq * h * 4
    # One layer recomputed in backward: q/k/v/o, MLP gate/up/act/product, norms (fp32), no attention matrix
    # (sdpa), + the same again for their gradients.
    layer_act = 2 * seq * (6 * h + 2 * kv * head_dim + 4 * inter) * 4
    loss_chunk = 2 * chunk * v * 4  # logits and their gradient, fp32
    parts = {"4-bit weights": nf4, "embeddings/head": embed, "LoRA + grads + AdamW": lora,
             "checkpointed layer inputs": kept_inputs, "one layer's activations": layer_act, "one loss chunk": loss_chunk}
    return {k: b / 2**20 for k, b in parts.items()}


def step_flops(shape: dict, layers: int, seq: int, head_rows: int) -> float:
    """Model FLOPs of one QLoRA step with gradient checkpointing and a frozen base: decoder Linear layers
    forward + recompute + input-gradient (3 x 2 x params x tokens) + attention scores (3 x 4 x seq^2 x h x 1/2
    causal), head forward + input-gradient (2 x 2 x h x vocab x head_rows). LoRA adds < 3 % and is left out."""
    h, v, inter = shape["hidden_size"], shape["vocab_size"], shape["intermediate_size"]
    head_dim = h // shape["num_attention_heads"]
    per_layer = h * h * 2 + 2 * h * shape["num_key_value_heads"] * head_dim + 3 * h * inter
    decoder = layers * (3 * 2 * per_layer * seq + 3 * 2 * seq * seq * h)
    return decoder + 2 * 2 * h * v * head_rows


def chunk_sweep(shape: dict, rows: int) -> list:
    """Seconds of head + log-softmax forward and backward over `rows` supervised rows, per chunk size, and
    the bytes of one chunk's logits + gradient: what train.loss_chunk_tokens trades."""
    import torch
    from torch import nn

    from llava_ft.model.lm_loss import chunked_token_logprobs

    torch.manual_seed(0)
    head = nn.Linear(shape["hidden_size"], shape["vocab_size"], bias=False)
    head.weight.requires_grad_(False)  # QLoRA: the (tied) head is frozen
    hidden = torch.randn(rows, shape["hidden_size"], requires_grad=True)
    targets = torch.randint(0, shape["vocab_size"], (rows,))
    figs = []
    for chunk in (64, 128, 256, 512, 1024):
        times = []
        for _ in range(2):
            t = time.perf_counter()
            chunked_token_logprobs(hidden, head, targets, chunk).sum().backward()
            times.append(time.perf_counter() - t)
        figs.append(figure(f"loss chunk {chunk}: head + loss fwd+bwd over {rows} rows", min(times), "s",
                           f"fastest of 2; one chunk's fp32 logits + gradient = "
                           f"{2 * chunk * shape['vocab_size'] * 4 / 2**20:.0f} MiB (vocab {shape['vocab_size']})"))
    return figs


def full_depth_projection(label: str, full_shape: dict, seq: int, supervised: int) -> dict:
    """At full depth the decoder dominates the step: the tokens/s ratio the model FLOPs predict there
    (the measured ratio at cut depth is larger, as the head is a larger share of the step)."""
    depth = full_shape["num_hidden_layers"]
    ratio = step_flops(full_shape, depth, seq, seq) / step_flops(full_shape, depth, seq, supervised)
    return figure(f"{label} {seq}: tokens/s after / before at {depth} layers, from model FLOPs", ratio, "x",
                  f"step_flops with the head on all {seq} positions / on the {supervised} supervised ones "
                  "(computed, not measured)")


def section_memory(quick: bool = False) -> dict:
    figs, notes = [], []
    work = tempfile.mkdtemp(prefix="bench_lmmem_")
    env = os.environ.get
    plan = ([("tiny", QUICK_SHAPE, 2, (256,), 1, 2)] if quick else
            [("0.5B", SHAPES["0.5B"], int(env("BENCH_MEM_LAYERS_05B", 2)), (2048, 4096), 1, 0),
             ("3B", SHAPES["3B"], int(env("BENCH_MEM_LAYERS_3B", 1)), (2048, 4096), 1,
              int(env("BENCH_MEM_LOAD_LAYERS_3B", 6)))])
    try:
        figs += chunk_sweep(QUICK_SHAPE if quick else SHAPES["0.5B"], 64 if quick else 512)
        for label, full_shape, layers, seqs, steps, load_layers in plan:
            if load_layers:
                load_shape = dict(full_shape, num_hidden_layers=load_layers)
                ck = write_sharded_checkpoint(os.path.join(work, label + "_load"), load_shape,
                                              shard_mb=1 if quick else 300)
                notes.append(f"{label} load: {load_layers} of {full_shape['num_hidden_layers']} decoder layers, "
                             f"{ck['params'] / 1e6:.0f} M parameters, bf16 checkpoint {ck['bytes'] / 2**20:.0f} MiB "
                             f"in {ck['shards']} shards.")
                for how in ("before", "after"):
                    r = run_json_child("bench_lm_memory.py", ["--child", "load", "--model", ck["dir"], "--how", how],
                                       1800, f"{label} load {how}")
                    figs.append(figure(f"{label}: 4-bit load peak RSS ({how})", r["peak_rss_mb"], "MiB",
                                       "peak RSS (VmHWM) of a fresh process running load_llm(quantization=4bit)"))
                    ratio = r["peak_rss_mb"] / r["rss_after_load_mb"]
                    figs.append(figure(f"{label}: 4-bit load peak / RSS after load ({how})", ratio, "x",
                                       f"RSS after load {r['rss_after_load_mb']:.0f} MiB (weights "
                                       f"{r['loaded_mb']:.0f} MiB + interpreter and libraries); load took "
                                       f"{r['seconds']:.0f} s", target="<= 1.3" if how == "after" else None,
                                       met=ratio <= 1.3 if how == "after" else None))
                shutil.rmtree(ck["dir"], ignore_errors=True)
            shape = dict(full_shape, num_hidden_layers=layers)
            ck = write_sharded_checkpoint(os.path.join(work, label), shape, shard_mb=64 if quick else 500)
            notes.append(f"{label} steps: {layers} of {full_shape['num_hidden_layers']} decoder layers, "
                         f"{ck['params'] / 1e6:.0f} M parameters.")
            for seq in seqs:
                res = {}
                for how, chunk in (("before", 0), ("after", 256)):
                    res[how] = run_json_child(
                        "bench_lm_memory.py", ["--child", "step", "--model", ck["dir"], "--seq", str(seq),
                                               "--chunk", str(chunk), "--steps", str(steps)],
                        3600, f"{label} step {seq} {how}")
                b, a = res["before"], res["after"]
                tps = {k: seq / min(r["step_seconds"]) for k, r in res.items()}
                peak_ratio = a["peak_rss_mb"] / b["peak_rss_mb"]
                speed = tps["after"] / tps["before"]
                fl = floor_mb(shape, layers, seq, 256, a["lora_params"])
                figs += [
                    figure(f"{label} {seq}: peak RSS before (full logits)", b["peak_rss_mb"], "MiB",
                           "peak RSS (VmHWM), fresh process: 4-bit load + LoRA + AdamW steps, gradient checkpointing"),
                    figure(f"{label} {seq}: peak RSS after (chunked loss)", a["peak_rss_mb"], "MiB", "same, default "
                           "train.loss_chunk_tokens 256"),
                    figure(f"{label} {seq}: peak after / before", peak_ratio, "x", "ratio of the two peaks",
                           target="<= 0.5" if (label == "0.5B" and seq == 4096) else None,
                           met=peak_ratio <= 0.5 if (label == "0.5B" and seq == 4096) else None),
                    figure(f"{label} {seq}: tokens/s before", tps["before"], "tokens/s",
                           f"positions / fastest of {steps} step(s) (forward + backward + AdamW)"),
                    figure(f"{label} {seq}: tokens/s after", tps["after"], "tokens/s", "same"),
                    figure(f"{label} {seq}: tokens/s after / before", speed, "x", "measured at this depth",
                           target=">= 1.15" if label == "0.5B" else None,
                           met=speed >= 1.15 if label == "0.5B" else None),
                    figure(f"{label} {seq}: computed floor", sum(fl.values()), "MiB",
                           " + ".join(f"{k} {v:.0f}" for k, v in fl.items()) + " (no interpreter/libraries)"),
                ]
                if layers < full_shape["num_hidden_layers"]:
                    figs.append(full_depth_projection(label, full_shape, seq, a["supervised"]))
        notes.append(f"LLaVA-style labels: {SUPERVISED_SHARE:.0%} of positions supervised (bench_train's mix), "
                     "the rest -100 (image features, prompts); batch 1; LoRA r 64 on every Linear but lm_head; "
                     "tied embeddings stay fp32 on CPU (dtype auto).")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return section("memory", "Memory near the limit: chunked loss and 4-bit loading", figs, notes)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", choices=("load", "step"))
    ap.add_argument("--model")
    ap.add_argument("--out")
    ap.add_argument("--how", default="after")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1)
    args = ap.parse_args()
    if args.child == "load":
        _child_load(args.model, args.out, args.how)
    elif args.child == "step":
        _child_step(args.model, args.out, args.seq, args.chunk, args.steps)
    else:
        print(json.dumps(section_memory(args.quick), indent=1))


if __name__ == "__main__":
    main()
