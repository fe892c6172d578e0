#!/usr/bin/env bash
# Training throughput on one GPU: bench/train.py on the medium and large sizes and a 1B Llama
# shape, DDP against FSDP (over a one-rank mesh), eager and with torch.compile, each against
# transformers' LlamaForCausalLM with the same AdamW in the same process, bf16 for both. It prints
# the card's name, tokens/s, the ratio to HF, MFU (6 x parameters x tokens/s over the card's
# bf16 dense peak) and peak memory. About 8 minutes on an H100/H200; BUDGET_S caps the total, and
# what would start after it is skipped and said so.
#
#   bench/gpu.sh              # needs a Python with CUDA torch and transformers (PYTHON=..., default .venv)
#   DRY=1 bench/gpu.sh        # the same runs on the CPU with tiny shapes: checks every path, no GPU
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
BUDGET_S=${BUDGET_S:-480}
if [ "${DRY:-0}" = 1 ]; then
  DEVICE=cpu; ONE_B=debug; SIZES=debug,tiny
  COMMON=(--seq-len 32 --batch 2 --rounds 1 --steps 1 --corpus-chars 100000 --threads 1)
else
  DEVICE=cuda; ONE_B=llama-1b; SIZES=medium,large
  # 4 x 2048 tokens a step: a 1B model and its AdamW state twice over (ours and HF's) fit beside one step's activations.
  COMMON=(--seq-len 2048 --batch 4 --rounds 3 --steps 2 --threads 8)
  export OMP_NUM_THREADS=8  # torchrun would set 1: the CPU-side init of a 1B model takes minutes then
fi
started=$SECONDS
failures=0

run() {  # a label, then bench/train.py's arguments
  local label=$1 left=$((BUDGET_S - (SECONDS - started)))
  shift
  if [ "$left" -lt 30 ]; then
    echo "== $label: skipped, the ${BUDGET_S} s budget is spent"
    return
  fi
  echo "== $label"
  timeout --signal=TERM "$left" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 \
    bench/train.py --part throughput --device "$DEVICE" --precision bf16 "${COMMON[@]}" "$@"
  local code=$?
  if [ "$code" -ne 0 ]; then
    echo "== $label: FAILED (exit $code$([ "$code" -eq 124 ] && echo ', out of time'))"
    failures=$((failures + 1))
  fi
}

"$PYTHON" -c "import torch, transformers; print('card:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU', '| torch', torch.__version__, '| transformers', transformers.__version__)"
run "1B Llama shape ($ONE_B): ddp and fsdp, eager then compiled" --size "$ONE_B" --strategy ddp,fsdp --compile both
run "$SIZES: ddp and fsdp, eager" --size "$SIZES" --strategy ddp,fsdp
run "$SIZES: ddp and fsdp, compiled" --size "$SIZES" --strategy ddp,fsdp --compile on
echo "total $((SECONDS - started)) s, $failures failed"
[ "$failures" -eq 0 ]
