#!/usr/bin/env bash
# Training throughput on one GPU in one call (docs/gpu.md): bench/gpu.py within BUDGET_S seconds
# (default 420; a run starts only with 40 s left, one running is stopped at the budget). In order
# of value: the 1B Llama shape eager, compiled, then medium and large. Figures (card, torch,
# tokens/s, MFU, the ETA's utilization, peak memory, the transformers baseline under the same
# AdamW) to stdout and to $OUT/gpu.json and .txt ($OUT: the folder a lent machine sends back;
# default runs/).
#
#   bench/gpu.sh          # a Python with CUDA torch and transformers (PYTHON=..., default .venv's or python3)
#   DRY=1 bench/gpu.sh    # every path on the CPU with tiny shapes (the test suite runs this)
#
# It needs only the working tree: the repository root goes on PYTHONPATH, and where pydantic is
# missing the wheels in bench/wheels (`python bench/deps.py fetch`, git-ignored) are unpacked
# into .gpu-deps and go there too.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import pydantic" 2>/dev/null; then
  "$PYTHON" bench/deps.py unpack .gpu-deps || exit 1
  export PYTHONPATH="$PYTHONPATH:$PWD/.gpu-deps"
fi
args=(--out "${OUT:-runs}/gpu" --budget-s "${BUDGET_S:-420}")
if [ "${DRY:-0}" = 1 ]; then
  args+=(--dry)
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}  # the CPU side of initializing a 1B model
fi
exec "$PYTHON" bench/gpu.py "${args[@]}" "$@"
