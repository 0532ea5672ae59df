#!/usr/bin/env bash
# The main job without ComfyUI: on a GPU the comparison table at model shapes against SDPA (cuDNN) and
# SageAttention; on a CPU a small Triton-interpreter run that says it is one.
# Extra arguments go to bench/bench_kernels.py, e.g.  bash tools/demo.sh --shapes flux,wan
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
exec "$PY" bench/bench_kernels.py "$@"
