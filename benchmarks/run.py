"""The llava_ft benchmark suite: one command, one table, one dated report (Markdown + JSON).

    python benchmarks/run.py                       # full run (CPU: ~15-25 min on 2 cores; GPU adds section gpu)
    python benchmarks/run.py --quick               # tiny models and data: checks the suite works (~2-3 min)
    python benchmarks/run.py --quick --only padding,data_prep
    python benchmarks/run.py --results-dir /tmp/r  # default: benchmarks/results/

Sections (each runs in its own Python subprocess with a timeout, so peak memory of one does not leak into
another and a crash or hang in one is a row of the table, not the end of the run):

  train       llava_ft LLaVA finetune vs TRL SFTTrainer on the same model and data: tokens/s, samples/s,
              supervised tokens/s, peak memory; runs alternate A B A B, medians and the ratio reported
  padding     padding waste of random, length-grouped and packed batching on a LLaVA-mix-665K-like mix
  data_prep   prepare_dataset: records/s cold, cached start time (LLaVA records and conversations)
  qlora       peak memory of load + one step of a ~0.5B model, 4-bit vs full precision; bits/param
  data_wait   share of a LLaVA step spent waiting for the DataLoader, 0 vs 2 workers
  generation  chat time to first token and tokens/s; server requests/s and latency percentiles
  gpu         7B-shaped LLaVA QLoRA tokens/s and MFU (GPU only; "skipped: no GPU" elsewhere)
  dpo         preference (DPO) training on RLAIF-V-shaped pairs: llava_ft shared prefix vs llava_ft with the
              prompt duplicated vs TRL DPOTrainer (same weights): pairs/s, peak memory, positions per pair
  memory      QLoRA peak RSS and tokens/s before / after the chunked loss and the shard-by-shard 4-bit load
              (0.5B- and 3B-shaped, 2,048 and 4,096 positions), the computed floor, the loss-chunk sweep

Output: benchmarks/results/<YYYY-MM-DD>[-quick].md and .json (the JSON holds every figure with its
method, target and whether it was met, plus the machine's CPU count and load average before and after).
A run with --only updates that day's report: its sections replace the same-named ones, the rest stay,
and every section says when it ran, under what load and by which command.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT, load_average, machine_info, section  # noqa: E402
from llava_ft.fileio import write_text  # noqa: E402

# name -> (module, function, title, timeout full s, timeout quick s); generous: the CPUs may be shared
SECTIONS = {
    "train": ("bench_train", "section_train", "Training throughput: llava_ft vs TRL SFTTrainer", 3600, 900),
    "padding": ("bench_sections", "section_padding", "Padding waste on a LLaVA-mix-665K-like length mix", 600, 300),
    "data_prep": ("bench_sections", "section_data_prep", "Data preparation (prepare_dataset)", 2400, 600),
    "qlora": ("bench_memory", "section_qlora", "QLoRA memory: 4-bit vs full precision", 2400, 900),
    "data_wait": ("bench_data_wait", "section_data_wait", "Data loading: time the step waits for the DataLoader",
                  1200, 600),
    "generation": ("bench_sections", "section_generation", "Generation: chat and server", 1200, 600),
    "anyres": ("bench_anyres", "section_anyres", "AnyRes cost: image tokens and step time vs pad", 900, 300),
    "gpu": ("bench_memory", "section_gpu", "GPU: 7B-shaped LLaVA QLoRA throughput and MFU", 3000, 600),
    "dpo": ("bench_dpo", "section_dpo", "Preference training: shared prefix vs duplicated vs TRL DPOTrainer",
            2400, 900),
    "memory": ("bench_lm_memory", "section_memory", "Memory near the limit: chunked loss and 4-bit loading",
               5400, 600),
}


def run_child(name: str, quick: bool, out: str) -> None:
    """Child mode: run one section in this process and write its dict as JSON to `out`."""
    module, func, title, _, _ = SECTIONS[name]
    try:
        result = getattr(__import__(module), func)(quick=quick)
    except Exception as err:  # reported in the table by the parent
        result = section(name, title, [], status="failed", error=f"{type(err).__name__}: {err}\n"
                         + traceback.format_exc(limit=8))
    result.setdefault("name", name)
    result.setdefault("title", title)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)


def run_section(name: str, quick: bool, timeout_scale: float = 1.0) -> dict:
    _, _, title, t_full, t_quick = SECTIONS[name]
    timeout = (t_quick if quick else t_full) * timeout_scale
    fd, out = tempfile.mkstemp(prefix=f"bench_{name}_", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--out", out] + (["--quick"] if quick else [])
    start = time.perf_counter()
    log_tail = ""
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        log_tail = (proc.stdout + proc.stderr)[-3000:]
        with open(out) as fh:
            text = fh.read()
        if not text.strip():
            result = section(name, title, [], status="failed",
                             error=f"exit status {proc.returncode}, no result written\n{log_tail}")
        else:
            result = json.loads(text)
    except subprocess.TimeoutExpired as err:
        tail = ((err.stdout or b"") + (err.stderr or b""))[-2000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        result = section(name, title, [], status="timeout", error=f"timed out after {timeout:.0f} s\n{tail}")
    finally:
        os.unlink(out)
    result["seconds"] = round(time.perf_counter() - start, 1)
    if result.get("status") == "failed" and log_tail and log_tail not in (result.get("error") or ""):
        result["log_tail"] = log_tail
    return result


def fmt_value(v) -> str:
    if v is None:
        return "n/a"
    if v != v:  # NaN
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# llava_ft benchmarks{' (quick)' if report['quick'] else ''}: {m['time']}", "",
             f"Machine: {m['cpu_count']} CPUs (affinity {m.get('affinity_cpus', '?')}), "
             f"{m.get('ram_gib', '?')} GiB RAM, GPU: {m['gpu'] or 'none'}; load average (1/5/15 min) "
             f"before {m['load_average_1_5_15']}, after {report['load_average_after']}. "
             f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
             f"trl {m['trl']}, bitsandbytes {m['bitsandbytes']}.", "",
             f"Command: `{report['command']}`; total {report['seconds']:.0f} s.", ""]
    for s in report["sections"]:
        ran = ""
        if s.get("ran_at"):
            ran = f"; ran {s['ran_at']}, load average before {s.get('load_before')}, after {s.get('load_after')}"
        lines += [f"## {s['name']}: {s['title']}", "",
                  f"Status: **{s['status']}** ({s.get('seconds', 0):.0f} s{ran})", ""]
        if s.get("error"):
            lines += ["```", s["error"].strip()[-1500:], "```", ""]
        if s["figures"]:
            lines += ["| figure | value | unit | target | method |", "|---|---:|---|---|---|"]
            for f in s["figures"]:
                target = f["target"] or ""
                if f["met"] is not None:
                    target += " (met)" if f["met"] else " (**missed**)"
                lines.append(f"| {f['name']} | {fmt_value(f['value'])} | {f['unit']} | {target} | "
                             f"{f['method'].replace('|', '/')} |")
            lines.append("")
        for note in s.get("notes", []):
            lines.append(f"- {note}")
        if s.get("notes"):
            lines.append("")
    return "\n".join(lines) + "\n"


def print_table(report: dict) -> None:
    rows = []
    for s in report["sections"]:
        if not s["figures"]:
            msg = s["status"] + (": " + s["error"].strip().splitlines()[0] if s.get("error") else "")
            rows.append((s["name"], msg[:90], "", ""))
        for f in s["figures"]:
            met = "" if f["met"] is None else ("met" if f["met"] else "MISSED")
            rows.append((s["name"], f["name"], f"{fmt_value(f['value'])} {f['unit']}", met))
    widths = [max(len(r[i]) for r in rows) for i in range(4)] if rows else [0] * 4
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny models and data (checks the suite, not a measurement)")
    ap.add_argument("--only", help=f"comma-separated sections out of: {', '.join(SECTIONS)}")
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every section's timeout")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_child(args.child, args.quick, args.out)
        return 0
    names = list(SECTIONS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in SECTIONS]
        if unknown:
            ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    start = time.perf_counter()
    report = {"quick": args.quick, "machine": machine_info(),
              "command": "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "sections": []}
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        load_before, when = load_average(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
        result = run_section(name, args.quick, args.timeout_scale)
        # Each section keeps when it ran and how busy the machine was: a merged report mixes runs.
        result.update(ran_at=when, load_before=load_before, load_after=load_average(), command=report["command"])
        print(f"[bench] {name}: {result['status']} in {result['seconds']:.0f} s", flush=True)
        report["sections"].append(result)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["load_average_after"] = load_average()
    os.makedirs(args.results_dir, exist_ok=True)
    stem = time.strftime("%Y-%m-%d") + ("-quick" if args.quick else "")
    base = os.path.join(args.results_dir, stem)
    if args.only:
        report = merge_into_existing(base + ".json", report)
    write_text(base + ".json", json.dumps(report, indent=1))
    write_text(base + ".md", to_markdown(report))
    print()
    print_table(report)
    print(f"\nreport: {base}.md, {base}.json")
    return 0


def merge_into_existing(path: str, report: dict) -> dict:
    """`--only` runs update the day's report instead of replacing it: their sections replace the
    same-named ones and the rest are kept (each section records its own time, load and command)."""
    try:
        with open(path) as fh:
            old = json.load(fh)
    except (OSError, ValueError):
        return report
    if old.get("quick") != report["quick"]:
        return report
    fresh = {s["name"]: s for s in report["sections"]}
    kept = [s for s in old.get("sections", []) if s["name"] not in fresh]
    order = {name: i for i, name in enumerate(SECTIONS)}
    merged = dict(report, sections=sorted(kept + report["sections"], key=lambda s: order.get(s["name"], 99)))
    merged["seconds"] = round(sum(s.get("seconds", 0) for s in merged["sections"]), 1)
    merged["command"] = "; ".join(dict.fromkeys(s.get("command", old.get("command", "?"))
                                                for s in merged["sections"]))
    return merged


if __name__ == "__main__":
    sys.exit(main())
