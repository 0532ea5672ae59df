#!/usr/bin/env bash
# The test command (README, .ci/run): CPU tests through the Triton interpreter, or real sizes on a GPU.
# Extra arguments go to pytest, e.g.  bash tools/test.sh -k mask
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
workers=$("$PY" -c 'import os; print(min(4, os.cpu_count() or 1))')
exec "$PY" -m pytest -q -n "$workers" -p no:cacheprovider -W ignore::DeprecationWarning tests "$@"
