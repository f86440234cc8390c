#!/usr/bin/env bash
# The prepared GPU check: one command for whoever has a CUDA GPU (< 10 minutes on one recent GPU).
#
#     bash benchmarks/gpu_check.sh            # quick gpu section (7B widths, few layers) + the gpu-marked tests
#     bash benchmarks/gpu_check.sh --full     # the full gpu section (more layers and steps; longer)
#
# Runs `python benchmarks/run.py --only gpu` (7B-shaped QLoRA throughput/MFU, fp16 and bf16 QLoRA LLaVA
# steps with peak GPU memory: benchmarks/bench_memory.py, bench_precision.py) and `python -m pytest -m gpu`
# (tests that skip without CUDA: mixed precision, attention, ...). Figures land in benchmarks/results/:
# <date>[-quick].md/.json from run.py, <date>-gpu-tests.txt from pytest; commit them with the date.
# Run from anywhere inside the repository, in the environment llava_ft is installed in.
# GPU_CHECK_ON_CPU=1 GPU_CHECK_RESULTS=/tmp/r bash benchmarks/gpu_check.sh checks the script's plumbing on a
# machine without a GPU (everything then skips).
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
mode=(--quick)
suffix=-quick
if [ "${1:-}" = "--full" ]; then mode=(); suffix=; fi
results=${GPU_CHECK_RESULTS:-benchmarks/results}
day=$(date -u +%Y-%m-%d)
mkdir -p "$results"

if [ "${GPU_CHECK_ON_CPU:-0}" != 1 ] && ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA GPU here; nothing to check (the gpu section and tests would skip)." >&2
    exit 2
fi
python - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: no GPU (GPU_CHECK_ON_CPU=1: plumbing check, everything skips)")
p = torch.cuda.get_device_properties(0)
print(f"gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}, "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}")
PY

start=$(date +%s)
python benchmarks/run.py "${mode[@]}" --only gpu --timeout-scale 1.5 --results-dir "$results"
bench_rc=$?
python -m pytest -m gpu -q -rs -p no:cacheprovider tests 2>&1 | tee "$results/$day-gpu-tests.txt"
test_rc=${PIPESTATUS[0]}

echo
echo "==================== gpu_check summary ($(( $(date +%s) - start )) s) ===================="
python - "$results/$day$suffix.json" <<'PY'
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except OSError as err:
    sys.exit(f"no benchmark report: {err}")
for sec in report["sections"]:
    if sec["name"] != "gpu":
        continue
    print(f"benchmark section gpu: {sec['status']}" + (f" ({sec['error'].splitlines()[-1]})" if sec.get("error") else ""))
    for f in sec["figures"]:
        value = "n/a" if f["value"] is None else f"{f['value']:.4g}"
        flag = "" if f["met"] is None else ("  [target met]" if f["met"] else f"  [TARGET MISSED: {f['target']}]")
        print(f"  {f['name']}: {value} {f['unit']}{flag}")
PY
echo "gpu tests: $(tail -n 1 "$results/$day-gpu-tests.txt")"
echo "figures: $results/$day$suffix.md, $results/$day$suffix.json, $results/$day-gpu-tests.txt"
[ "$bench_rc" -eq 0 ] && [ "$test_rc" -eq 0 ]
