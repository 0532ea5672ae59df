# Source this: puts a Python with torch, triton and the test tools on PATH as "$PY".
# Uses the machine's python3 when it already has torch, triton and pytest (a GPU machine: its CUDA
# torch stays untouched); otherwise makes .venv with the CPU torch 2.13.0 wheel and triton 3.6.0.
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if python3 -c 'import torch, triton, pytest, xdist' >/dev/null 2>&1; then
  PY=python3
else
  if [ ! -x "$_root/.venv/bin/python" ]; then
    python3 -m venv "$_root/.venv"
    "$_root/.venv/bin/pip" install -q --disable-pip-version-check "torch==2.13.0"
    # numpy < 2.4: triton 3.6's interpreter converts 1-element arrays with int(), an error in numpy 2.4
    "$_root/.venv/bin/pip" install -q --disable-pip-version-check "triton==3.6.0" "numpy<2.4" \
      "pytest>=8" "pytest-xdist>=3" "safetensors>=0.4" "pillow>=10"
  fi
  PY="$_root/.venv/bin/python"
fi
export PY
