"""The benchmark suite (benchmarks/run.py) produces a well-formed report; figures themselves are not checked.

The quick subset run here (padding, data_prep, gpu) takes ~1 min on 2 shared cores, hence `slow`; the
train/qlora/generation sections are exercised by `python benchmarks/run.py --quick` (a few minutes).
Never asserts on timings: only on the report's structure (sections, methods, numeric fields, targets).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "benchmarks", "run.py")


def _import_run():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import run  # noqa: PLC0415  (benchmarks/ is not a package)

    return run


def _check_figure(fig: dict) -> None:
    assert set(fig) >= {"name", "value", "unit", "method", "target", "met"}
    assert fig["name"] and fig["unit"] and len(fig["method"]) > 10
    assert isinstance(fig["value"], float) and math.isfinite(fig["value"]), fig
    if fig["target"] is not None:
        assert isinstance(fig["met"], bool), fig


@pytest.mark.slow
def test_quick_subset_writes_markdown_and_json(tmp_path):
    proc = subprocess.run([sys.executable, RUN, "--quick", "--only", "padding,data_prep,gpu",
                           "--results-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jsons = list(tmp_path.glob("*-quick.json"))
    mds = list(tmp_path.glob("*-quick.md"))
    assert len(jsons) == 1 and len(mds) == 1
    report = json.loads(jsons[0].read_text())
    assert report["quick"] is True
    assert report["machine"]["cpu_count"] >= 1 and "load_average_1_5_15" in report["machine"]
    by_name = {s["name"]: s for s in report["sections"]}
    assert list(by_name) == ["padding", "data_prep", "gpu"]
    for name in ("padding", "data_prep"):
        sec = by_name[name]
        assert sec["status"] == "ok", sec.get("error")
        assert sec["figures"] and sec["notes"]
        for fig in sec["figures"]:
            _check_figure(fig)
    names = {f["name"] for f in by_name["padding"]["figures"]}
    assert {"random batching", "packed"} <= names and any(n.startswith("length-grouped") for n in names)
    assert any(f["name"].endswith("cached start") and f["target"] for f in by_name["data_prep"]["figures"])
    gpu = by_name["gpu"]
    if gpu["status"] == "skipped":
        assert gpu["notes"] == ["skipped: no GPU"]
    md = mds[0].read_text()
    for heading in ("## padding", "## data_prep", "## gpu", "| figure | value | unit | target | method |"):
        assert heading in md
    assert "random batching" in proc.stdout  # the printed table


def test_failing_section_is_a_row_not_a_crash(tmp_path, monkeypatch):
    run = _import_run()
    monkeypatch.setitem(run.SECTIONS, "broken", ("common", "no_such_function", "Broken on purpose", 60, 60))
    out = tmp_path / "broken.json"
    run.run_child("broken", quick=True, out=str(out))
    result = json.loads(out.read_text())
    assert result["status"] == "failed" and "no_such_function" in result["error"]
    report = {"quick": True, "machine": {"time": "t", "cpu_count": 2, "gpu": None, "load_average_1_5_15": [0, 0, 0],
                                         "python": "3", "torch": "x", "transformers": "x", "peft": "x", "trl": "x",
                                         "bitsandbytes": "x"},
              "load_average_after": [0, 0, 0], "command": "c", "seconds": 1.0, "sections": [dict(result, seconds=0.1)]}
    md = run.to_markdown(report)
    assert "Status: **failed**" in md and "no_such_function" in md


def test_unknown_section_is_rejected():
    proc = subprocess.run([sys.executable, RUN, "--only", "nope"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unknown section" in proc.stderr


def test_only_run_updates_the_days_report_and_keeps_other_sections(tmp_path):
    run = _import_run()

    def sec(name, value, command):
        return {"name": name, "title": name, "status": "ok", "seconds": 2.0, "command": command, "notes": [],
                "error": None, "figures": [{"name": "f", "value": value, "unit": "u", "method": "m" * 12,
                                            "target": None, "met": None}]}

    path = tmp_path / "2026-01-01.json"
    old = {"quick": False, "command": "python benchmarks/run.py",
           "sections": [sec("train", 1.0, "python benchmarks/run.py"), sec("padding", 2.0, "python benchmarks/run.py")]}
    path.write_text(json.dumps(old))
    fresh = {"quick": False, "command": "python benchmarks/run.py --only qlora,padding", "seconds": 4.0,
             "sections": [sec("padding", 3.0, "python benchmarks/run.py --only qlora,padding"),
                          sec("qlora", 4.0, "python benchmarks/run.py --only qlora,padding")]}
    merged = run.merge_into_existing(str(path), fresh)
    assert [s["name"] for s in merged["sections"]] == ["train", "padding", "qlora"]  # suite order
    assert [s["figures"][0]["value"] for s in merged["sections"]] == [1.0, 3.0, 4.0]  # padding replaced
    assert merged["command"] == "python benchmarks/run.py; python benchmarks/run.py --only qlora,padding"
    quick = dict(fresh, quick=True)
    assert run.merge_into_existing(str(path), quick) is quick  # a quick run never mixes into a full report


@pytest.mark.slow
def test_gpu_section_code_runs_on_cpu_with_tiny_shapes():
    """The GPU section has no GPU here; its own code (assets, four arms through run_training, figures) runs
    on CPU with tiny shapes so it does not fail for the first time on a lent GPU."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_memory  # noqa: PLC0415

    tiny = dict(hidden=64, inter=128, layers=2, heads=4, kv_heads=2, vocab=1024, vis_hidden=32, vis_inter=64,
                vis_layers=2, vis_heads=4, image=32, patch=8)
    result = bench_memory.gpu_qlora_throughput(quick=True, device="cpu", shape=tiny, steps=3)
    assert result["status"] == "ok"
    names = [f["name"] for f in result["figures"]]
    assert len(names) == 5 and any("text, packed" in n for n in names)
    assert sum("LLaVA finetune" in n for n in names) == 3 and any("LLaVA finetune, packed" in n for n in names)
    assert any("packed / grouped" in n for n in names)
    for fig in result["figures"]:
        _check_figure(fig)
        assert fig["value"] > 0


@pytest.mark.slow
def test_dpo_section_runs_every_side_with_tiny_shapes():
    """benchmarks/bench_dpo.py (`run.py --only dpo`): llava_ft shared prefix, llava_ft duplicated and TRL's
    DPOTrainer all train on the same tiny pairs; the report has every figure, ratios with their targets."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_dpo  # noqa: PLC0415

    result = bench_dpo.section_dpo(quick=True)
    assert result["status"] == "ok"
    names = [f["name"] for f in result["figures"]]
    for side in bench_dpo.SIDES.values():
        assert f"{side}: pairs/s" in names and f"{side}: positions per pair (real)" in names
    for fig in result["figures"]:
        _check_figure(fig)
    positions = {f["name"]: f["value"] for f in result["figures"]}
    # the shared layout runs each prompt + image once: fewer positions per pair than either duplicated side
    shared = positions["llava_ft (shared prefix): positions per pair (real)"]
    assert shared < positions["llava_ft (duplicated prompt): positions per pair (real)"]
    assert shared < positions["TRL DPOTrainer: positions per pair (real)"]
    assert any(f["target"] == ">= 1.5 x" for f in result["figures"])


def test_memory_section_helpers():
    """The memory section's inputs and formulas: LLaVA-style labels supervise ~33 % of the positions, the
    floor adds up its parts, and the train section's model FLOPs count the head only at supervised rows for
    llava_ft (every position for TRL)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_lm_memory  # noqa: PLC0415
    import bench_train  # noqa: PLC0415

    for seq in (2048, 4096):
        ids, labels = bench_lm_memory.llava_labels(seq, 151936)
        share = float((labels[:, 1:] != -100).float().mean())
        assert ids.shape == labels.shape == (1, seq) and abs(share - 6016 / 18228) < 0.01
    shape = bench_lm_memory.SHAPES["0.5B"]
    floor = bench_lm_memory.floor_mb(shape, 24, 4096, 256, 10**6)
    assert floor["one loss chunk"] == 2 * 256 * 151936 * 4 / 2**20 and all(v > 0 for v in floor.values())
    s = bench_train.settings(False)
    totals = {"padded": 1000, "supervised": 300, "attn_sq": 1000 * 250, "images": 4}
    trl, ours = (bench_train.epoch_model_flops(s, totals, w) for w in ("trl", "llava_ft"))
    assert trl - ours == 4 * s["hidden"] * s["vocab"] * (1000 - 300)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the inherited peak is Linux's exec behaviour")
def test_peak_memory_of_a_benchmark_child_is_its_own_not_its_parents():
    """A child started by subprocess (vfork + exec) from a parent that once held 1 GiB reports its own peak.

    ru_maxrss survives exec on Linux, so with it every child of a big benchmark parent read at least the
    parent's peak (the 4-bit load's "after" figure was the parent's 3.1 GiB)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import common  # noqa: PLC0415

    held = bytearray(1 << 30)
    for i in range(0, len(held), 4096):  # touch every page: this process's peak is now > 1 GiB
        held[i] = 1
    del held
    assert common.peak_rss_mb() > 1024
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import common; "
            "print(common.peak_rss_mb())")
    child = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "benchmarks")],
                           capture_output=True, text=True, check=True)
    assert float(child.stdout) < 512  # an interpreter importing two modules, not the parent's gigabyte
