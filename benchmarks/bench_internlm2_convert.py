"""Benchmark: converting an InternLM2 checkpoint to the cached Llama folder, cold and cached.

    python benchmarks/bench_internlm2_convert.py                 # internlm2-chat-1_8b shapes, 4 layers, bf16
    python benchmarks/bench_internlm2_convert.py --layers 24     # the whole 1.8B (about 3.8 GB)

Writes a random bf16 checkpoint with InternLM2-1.8B's shapes (hidden 2048, 16 heads / 8 kv heads, ffn 8192,
vocabulary 92,544), one safetensors shard per layer plus embeddings and head, then prints the seconds of
the first conversion (GB/s), of the second (the cache hit) and the conversion process's peak RSS next to
its baseline after imports (the conversion holds one shard and its converted copy at a time).
The conversion runs in a child process so the RSS is its own. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import sys, time
from llava_ft.model.internlm2_convert import convert_to_llama
import safetensors.torch, transformers  # noqa: F401  (imported before the peak is reset)

def rss_gb(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field)) / 1e6

base = rss_gb("VmRSS:")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak (VmHWM) to the current RSS: measure the conversion alone
t = time.time(); convert_to_llama(sys.argv[1]); cold = time.time() - t
peak = rss_gb("VmHWM:")
t = time.time(); convert_to_llama(sys.argv[1]); warm = time.time() - t
print(cold, warm, base, peak)
"""

def write_checkpoint(folder: str, layers: int, seed: int = 0) -> tuple[float, float]:
    """Random bf16 InternLM2-1.8B-shaped checkpoint -> (total GB, largest shard GB)."""
    import torch
    from safetensors.torch import save_file

    hidden, inter, heads, kv, vocab = 2048, 8192, 16, 8, 92544
    head_dim = hidden // heads
    config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab, "rms_norm_eps": 1e-5,
              "rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 2.0},
              "max_position_embeddings": 32768, "torch_dtype": "bfloat16"}
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    def shards():
        yield {"model.tok_embeddings.weight": rand(vocab, hidden)}
        for i in range(layers):
            p = f"model.layers.{i}."
            yield {p + "attention.wqkv.weight": rand((heads + 2 * kv) * head_dim, hidden),
                   p + "attention.wo.weight": rand(hidden, hidden), p + "feed_forward.w1.weight": rand(inter, hidden),
                   p + "feed_forward.w3.weight": rand(inter, hidden), p + "feed_forward.w2.weight": rand(hidden, inter),
                   p + "attention_norm.weight": rand(hidden), p + "ffn_norm.weight": rand(hidden)}
        yield {"model.norm.weight": rand(hidden), "output.weight": rand(vocab, hidden)}

    n = layers + 2
    weight_map, total, largest = {}, 0, 0
    for k, shard in enumerate(shards()):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        size = sum(t.numel() * t.element_size() for t in shard.values())
        total, largest = total + size, max(largest, size)
        weight_map.update({key: name for key in shard})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    return total / 1e9, largest / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "internlm2")
        os.makedirs(src)
        total, largest = write_checkpoint(src, args.layers)
        env = {**os.environ, "LLAVA_FT_CACHE": os.path.join(tmp, "cache")}
        out = subprocess.run([sys.executable, "-c", CHILD, src], env=env, capture_output=True, text=True, check=True)
        cold, warm, base, peak = (float(v) for v in out.stdout.split()[-4:])
    print(f"checkpoint: {total:.2f} GB in {args.layers + 2} shards (largest {largest:.2f} GB)")
    print(f"first conversion: {cold:.2f} s ({total / cold:.2f} GB/s); second run (cache hit): {warm * 1000:.1f} ms")
    print(f"conversion process peak RSS: {peak:.2f} GB (baseline after imports {base:.2f} GB)")


if __name__ == "__main__":
    main()
