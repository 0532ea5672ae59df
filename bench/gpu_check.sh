#!/usr/bin/env bash
# The full check on a GPU machine: environment, kernel tests at real sizes, the benchmark table.
#   bash bench/gpu_check.sh [OUTDIR]
# SageAttention 1.0.6 (pure Triton) is installed from .carry/*.whl when present (machines without a
# package registry); pytest must be installed. Logs and the table go to OUTDIR (default bench/out).
# Phases have time limits so that a slow phase still leaves the others' results.
set -u
out=${1:-${OUT:-bench/out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'
} 2>&1 | tee "$out/env.txt"
ls .carry/*.whl >/dev/null 2>&1 && $py -m pip install -q --no-deps --no-index .carry/*.whl 2>&1 | tail -2
# pytest-xdist (+ execnet) from .carry/xdist: the sweep compiles a kernel variant per case, so it runs in
# 8 processes when xdist is there (220 cases in ~3 minutes on the H100 machine's 16 cores)
ls .carry/xdist/*.whl >/dev/null 2>&1 && $py -m pip install -q --no-deps --no-index .carry/xdist/*.whl 2>&1 | tail -2
par=""; par4=""; $py -c "import xdist" 2>/dev/null && par="-n 8" && par4="-n 4"
t_tests=${T_TESTS:-240}; t_bench=${T_BENCH:-220}; t_sweep=${T_SWEEP:-200}
timeout "$t_tests" $py -m pytest tests/test_kernels.py tests/test_launch_plans.py tests/test_op.py tests/test_rope.py -q -k "not sweep" \
  $par4 --maxfail=20 -W ignore -p no:cacheprovider --durations=10 2>&1 | tee "$out/tests.log" | tail -40
timeout "$t_bench" $py bench/bench_kernels.py --out "$out/bench.md" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log" | tail -45
timeout "$t_sweep" $py -m pytest tests/test_kernels.py -q -k sweep $par --maxfail=5 -W ignore -p no:cacheprovider \
  2>&1 | tee "$out/sweep.log" | tail -15
