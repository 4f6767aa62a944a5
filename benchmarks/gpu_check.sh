#!/usr/bin/env bash
# Every GPU test and the GPU benchmarks in one go (issue 4), for when a GPU machine is available.
# Hard budget: 7.5 minutes in all (each step gets what is left of it, capped), so it ends in < 8.
#
#   bash benchmarks/gpu_check.sh              # results under ./gpu_check_out
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Steps and files written under $OUT (or ./gpu_check_out):
#   env.txt             nvidia-smi, torch/CUDA, onnxruntime providers, mmbridge.info.conflicts()
#   pytest_gpu.txt/.xml pytest -m gpu over tests/ (every GPU test of every module; JUnit XML)
#   case21.txt          ../shared/cases/21 (raw CUDA IO-binding stream race), if present
#   bench_ort/          benchmarks/bench_ort.py --quick --device cuda (JSON) + bench_ort.log
#   bench_torch/        benchmarks/bench_torch.py --quick --device cuda, if that script exists
#   bench_suites/       python -m mmbridge.cli.bench --quick --device cuda --suites preprocess,encoders
#                       --no-external (only with time left; JSON + Markdown)
#   status.txt          exit code and seconds of each step
# Needs onnxruntime-gpu (not onnxruntime) for the CUDA EP; without it the ORT GPU tests skip with
# that reason and the benchmarks record the error.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
export MMBRIDGE_CACHE="${MMBRIDGE_CACHE:-$(mktemp -d)}"
BUDGET_S=450
start=$(date +%s)
: >"$OUT_DIR/status.txt"
overall=0

# run_step NAME CAP_S CMD... : runs CMD with a timeout of min(CAP_S, time left), logs status
run_step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - start)))
  if [ "$left" -lt 20 ]; then
    echo "$name: skipped (budget spent)" | tee -a "$OUT_DIR/status.txt"
    return 0
  fi
  local t=$((cap < left ? cap : left))
  local t0
  t0=$(date +%s)
  timeout "$t" "$@"
  local rc=$?
  echo "$name: exit $rc in $(($(date +%s) - t0)) s (limit $t s)" | tee -a "$OUT_DIR/status.txt"
  return $rc
}

{
  date -u
  nvidia-smi 2>&1 | head -20
  "$PY" - <<'EOF'
import torch, onnxruntime as ort
from mmbridge import info
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count())
print("onnxruntime", ort.__version__, ort.get_available_providers())
print("conflicts", info.conflicts())
EOF
} >"$OUT_DIR/env.txt" 2>&1

run_step pytest_gpu 200 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$OUT_DIR/pytest_gpu.xml" tests \
  >"$OUT_DIR/pytest_gpu.txt" 2>&1 || overall=1
tail -5 "$OUT_DIR/pytest_gpu.txt"

if [ -f ../shared/cases/21_iobinding_cuda_stream_sync.py ]; then
  run_step case21 40 "$PY" ../shared/cases/21_iobinding_cuda_stream_sync.py >"$OUT_DIR/case21.txt" 2>&1
fi

run_step bench_ort 170 "$PY" benchmarks/bench_ort.py --quick --device cuda --out "$OUT_DIR/bench_ort" \
  >"$OUT_DIR/bench_ort.log" 2>&1 || overall=1
tail -8 "$OUT_DIR/bench_ort.log"

if [ -f benchmarks/bench_torch.py ]; then
  run_step bench_torch 90 "$PY" benchmarks/bench_torch.py --quick --device cuda --out "$OUT_DIR/bench_torch" \
    >"$OUT_DIR/bench_torch.log" 2>&1 || overall=1
fi

run_step bench_suites 120 "$PY" -m mmbridge.cli.bench --quick --device cuda --suites preprocess,encoders \
  --no-external --out "$OUT_DIR/bench_suites" >"$OUT_DIR/bench_suites.log" 2>&1

echo "total: $(($(date +%s) - start)) s" | tee -a "$OUT_DIR/status.txt"
exit $overall
