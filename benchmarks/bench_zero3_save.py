"""Benchmark: memory of a ZeRO-3 save (iter_N.pth) in a full fine-tune, per rank.

    python benchmarks/bench_zero3_save.py                      # ~200M-parameter text model, 2 processes
    python benchmarks/bench_zero3_save.py --layers 4 --hidden 256   # small, checks the script works
    PYTHONPATH=/path/to/older/checkout python benchmarks/bench_zero3_save.py   # the same on other code

Builds a random-init Qwen2-shaped model locally (fp32; default hidden 1024, 12 layers, vocabulary 32,000:
about 200M parameters, 0.8 GB), then runs `llava_ft train --deepspeed zero3` under torchrun with 2
processes on the CPU (gloo): a full fine-tune, one step, one save. Each rank measures its own peak RSS
while `Trainer.trainable_state_dict()` runs (the gather for the save: /proc/self/clear_refs resets the
peak just before, VmHWM is read just after) and prints it beside the RSS before the call. Rank 1 writes
nothing, so whatever it gains is the price of the gather alone. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field)) / 1024


def child(args) -> None:
    """Under torchrun: train with the save measured on this rank, results to <out>/rank<N>.json."""
    from llava_ft.cli import main
    from llava_ft.engine.trainer import LlavaFtTrainer

    original = LlavaFtTrainer.trainable_state_dict
    records = []

    def measured(self):
        before = _rss_mb("VmRSS:")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # peak (VmHWM) := current RSS, so the peak below is the gather's own
        start = time.perf_counter()
        state = original(self)
        records.append({"rss_before_mb": before, "peak_mb": _rss_mb("VmHWM:"),
                        "seconds": time.perf_counter() - start, "tensors_kept": len(state)})
        return state

    LlavaFtTrainer.trainable_state_dict = measured
    code = main(["train", args.config, "--work-dir", args.work_dir, "--deepspeed", "zero3"])
    with open(os.path.join(args.out, f"rank{os.environ.get('RANK', '0')}.json"), "w") as fh:
        json.dump(records, fh)
    sys.exit(code)


def build(work: str, hidden: int, layers: int) -> str:
    """Model folder + openai-format data + config; returns the config path."""
    import torch
    import yaml
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from llava_ft.demo.assets import build_tokenizer

    tok = AutoTokenizer.from_pretrained(build_tokenizer(os.path.join(work, "tok")))
    cfg = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=max(1, hidden // 256), intermediate_size=hidden * 11 // 4,
                      vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model_dir = os.path.join(work, "model")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    del model
    data = os.path.join(work, "data.jsonl")
    with open(data, "w") as fh:
        for i in range(8):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                                              {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n")
    config = {"name": "zero3_save", "model": {"llm": model_dir, "dtype": "fp32"},
              "data": {"sources": [{"path": data, "format": "openai"}], "template": "qwen_chat", "max_length": 64,
                       "cache_dir": os.path.join(work, "cache")},
              "train": {"per_device_batch_size": 1, "max_steps": 1, "save_steps": 1, "logging_steps": 1,
                        "learning_rate": 1e-5, "warmup_ratio": 0.0}}
    path = os.path.join(work, "config.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(config, fh)
    print(f"model: {n_params / 1e6:.0f}M parameters ({n_params * 4 / 1e9:.2f} GB fp32), hidden {hidden}, "
          f"{layers} layers")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    import llava_ft
    from llava_ft.engine.launch import free_port

    print(f"llava_ft from {os.path.dirname(llava_ft.__file__)}")
    with tempfile.TemporaryDirectory() as work:
        config = build(work, args.hidden, args.layers)
        out = os.path.join(work, "measured")
        os.makedirs(out)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               os.path.abspath(__file__), "--child", "--config", config, "--work-dir", os.path.join(work, "w"),
               "--out", out]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"training failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
        iter_file = os.path.join(work, "w", "iter_1.pth")
        print(f"iter_1.pth: {os.path.getsize(iter_file) / 1e6:.0f} MB")
        for rank in (0, 1):
            with open(os.path.join(out, f"rank{rank}.json")) as fh:
                for rec in json.load(fh):
                    print(f"rank {rank} save: peak RSS {rec['peak_mb']:.0f} MB, RSS before {rec['rss_before_mb']:.0f} MB "
                          f"(+{rec['peak_mb'] - rec['rss_before_mb']:.0f} MB), {rec['seconds']:.1f} s, "
                          f"{rec['tensors_kept']} tensors kept")


if __name__ == "__main__":
    main()
