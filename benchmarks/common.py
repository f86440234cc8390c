"""Shared helpers of the benchmark suite (benchmarks/run.py): figures, machine facts, peak memory, medians.

Every section returns a dict built with `section(...)` holding `figures`, each made by `figure(...)`:
a name, a numeric value (or None), a unit, the method that produced it (one sentence a reader can
check), and optionally the target and whether it was met. `run.py` turns these into the Markdown/JSON
report; nothing here times anything by itself.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
for _p in (ROOT, BENCH_DIR):  # sections import llava_ft (repo root) and the sibling bench_*.py modules
    if _p not in sys.path:
        sys.path.insert(0, _p)


def figure(name: str, value: Optional[float], unit: str, method: str, target: Optional[str] = None,
           met: Optional[bool] = None) -> dict:
    """One reported number. `value` None means "not measured" (the report prints n/a)."""
    if value is not None:
        value = float(value)
    return {"name": name, "value": value, "unit": unit, "method": method, "target": target, "met": met}


def section(name: str, title: str, figures: list, notes: Optional[list] = None, status: str = "ok",
            error: Optional[str] = None) -> dict:
    return {"name": name, "title": title, "status": status, "figures": figures, "notes": list(notes or []),
            "error": error}


def median(values) -> float:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else float("nan")


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # a broken torch install must not stop the CPU sections
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    On Linux this is VmHWM, the high-water mark of this process's own memory map. Not ru_maxrss: Linux keeps
    ru_maxrss across exec, and Python's subprocess starts children with vfork, so a child's ru_maxrss starts
    at its PARENT's peak. A benchmark parent that had written a 1.5 GiB checkpoint made every child it
    started report at least that (seen: a 4-bit load measured 3,102 MiB by ru_maxrss, 2,576 by VmHWM).
    Elsewhere, ru_maxrss (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def load_average() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    """What the figures depend on: CPU count, load (other users of a shared machine), versions, GPU."""
    info: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": load_average(),
    }
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    for mod in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    info["gpu"] = None
    if has_gpu():
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def measured_matmul_peak(n: int = 2048, repeats: int = 5) -> tuple[float, str]:
    """(FLOP/s, how) of the best torch.mm of two n x n matrices on this machine now: fp32 on CPU (the
    training dtype there), bf16 on a GPU. The MFU denominators of the train and gpu sections."""
    import torch

    gpu = has_gpu()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4 if gpu else 1):
            a @ b
        if gpu:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / (4 if gpu else 1))
    how = (f"best of {repeats} torch.mm {n}x{n} {str(dtype).replace('torch.', '')} on {device}"
           f"{'' if gpu else f' ({torch.get_num_threads()} threads)'}")
    return 2 * n ** 3 / best, how


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def run_json_child(script: str, args: list, timeout: float, label: str) -> dict:
    """Run `python benchmarks/<script> *args --out FILE` in a fresh process (own peak memory); its JSON."""
    import json
    import subprocess
    import tempfile

    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        proc = subprocess.run([sys.executable, os.path.join(BENCH_DIR, script), *args, "--out", out], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        with open(out) as fh:
            text = fh.read()
        if proc.returncode != 0 or not text.strip():
            raise RuntimeError(f"{label} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-2500:]}")
        return json.loads(text)
    finally:
        os.unlink(out)


def alternating_runs(script: str, make_assets, quick: bool, sides, repeats: int, timeout: float,
                     prefix: str) -> tuple:
    """Build a comparison's assets once (`make_assets(work, quick)`, a JSON-able dict), then run every side
    `repeats` times in turn, A B C A B C (drift of a shared machine hits every side alike), each in a fresh
    process (`python benchmarks/<script> --child SIDE --assets FILE --out FILE`, its own peak memory).
    -> (assets, {side: [result, ...]}); the work folder is removed afterwards."""
    import json
    import shutil
    import tempfile

    work = tempfile.mkdtemp(prefix=prefix)
    try:
        assets = make_assets(work, quick)
        assets_file = os.path.join(work, "assets.json")
        with open(assets_file, "w") as fh:
            json.dump(assets, fh)
        runs: dict = {side: [] for side in sides}
        for _ in range(repeats):
            for side in runs:
                runs[side].append(run_json_child(script, ["--child", side, "--assets", assets_file], timeout,
                                                 f"{side} run"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return assets, runs


def comparison_main(doc: str, sides: dict, child, run_section) -> None:
    """Command line of a side-by-side comparison script (bench_train.py, bench_dpo.py): `--child SIDE` runs
    one side (child(side, assets_file, out_file)); otherwise run_section(quick, repeats=, sides=) is printed."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", choices=tuple(sides))
    ap.add_argument("--assets")
    ap.add_argument("--out")
    ap.add_argument("--repeats", type=int, help="runs per side (default: the section's)")
    ap.add_argument("--sides", default=",".join(sides), help=f"comma-separated subset of {','.join(sides)}")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.assets, args.out)
        return
    chosen = tuple(w.strip() for w in args.sides.split(",") if w.strip())
    unknown = sorted(set(chosen) - set(sides))
    if unknown:
        ap.error(f"unknown side(s) {', '.join(unknown)}; choose from {', '.join(sides)}")
    print(json.dumps(run_section(args.quick, repeats=args.repeats, sides=chosen), indent=1))
