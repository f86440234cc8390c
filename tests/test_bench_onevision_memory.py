"""benchmarks/bench_onevision_memory.py: the 7B OneVision parameter count its extrapolation rests on (built on
the meta device, no memory), and the on-paper GPU budget from measured 4-bit bytes per parameter. The
measured part (two child processes, minutes on CPU) runs with `python benchmarks/bench_onevision_memory.py`."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_onevision_memory  # noqa: PLC0415  (benchmarks/ is not a package)

    return bench_onevision_memory


def test_7b_shape_counts_and_budget():
    bench = _bench()
    counts = bench.count_7b()
    # llava-onevision-qwen2-7b-ov-hf has about 8.0 B parameters; nearly all of them sit in Linear layers
    assert 7.9e9 < counts["total"] < 8.2e9 and counts["linear"] > 0.8 * counts["total"]
    assert counts["lora"] > 0 and counts["projector"] > 0
    # a 4-bit Linear weight at ~0.52-0.56 B/param (NF4 + statistics): QLoRA fits 24 GB, 16 bit does not
    est = bench.estimate_7b_gpu({"q_bytes": 55, "q_params": 100}, counts)
    qlora = est["qlora_weights_gb"] + est["trainable_and_optimizer_gb"] + est["activations_gb"]
    bf16 = est["bf16_weights_gb"] + est["trainable_and_optimizer_gb"] + est["activations_gb"]
    assert qlora < 24 < bf16
