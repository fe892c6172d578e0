"""Training quality: the product's Trainer against a plain AdamW loop at equal tokens.

Both start from the same grown `tiny` model and read the same batches in the same order from
the English corpus split by file (bench/corpus.py; held-out perplexity is on files never trained
on). The reference is the loop one writes by hand: AdamW (betas 0.9/0.95, weight decay 0.1), one
linear warm-up over a fifth of the run times a cosine decay to a tenth of the peak over the whole
run, gradient clipping at 1. The product runs its own schedule: the run cut into the cycles the
setting asks for, each with its warm-up and decay.

Prints the held-out perplexity of both and the ratio product / reference (goal <= 1.02) at each
setting. With --bf16 it then trains the product under bf16 autocast against the product in fp32
at equal tokens (goal: within 1%). The product uses bf16 only where the hardware has it (CUDA,
CPUs with AVX512-BF16 or AMX); on a CPU without it the comparison still runs, with bf16
emulated (several times slower), and the output says so.

    .venv/bin/python bench/quality.py      # ~10 CPU minutes a run at 1 thread, 8 runs
    .venv/bin/python bench/quality.py --only 0 --bf16    # one setting, then bf16 against fp32 there
    .venv/bin/python bench/quality.py --batch 8 --seq-len 128 --steps 120 --only 0 2   # ~2 min a run
    .venv/bin/python bench/quality.py --size debug --batch 8 --seq-len 128 --steps 120 --only --bf16
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from corpus import english_corpus
from shared.shapes import SIZES
from training_image.evaluate import perplexity
from training_image.growth import grow
from training_image.model import Decoder
from training_image.train import ADAM_BETAS, GRAD_CLIP, MIN_LR_RATIO, Trainer, TrainPlan, autocast_dtype

GOAL_RATIO, GOAL_PRECISION = 1.02, 0.01
# (label, cycles in the run, peak lr): one short cycle, and the default 6 cycles scaled down,
# each at the default lr and at a high one.
SETTINGS = (
    ("1 cycle, lr 3e-3", 1, 3e-3),
    ("1 cycle, lr 1e-4", 1, 1e-4),
    ("6 cycles, lr 3e-3", 6, 3e-3),
    ("6 cycles, lr 1e-4", 6, 1e-4),
)


def reference_fit(model: Decoder, windows: torch.Tensor, steps: int, lr: float, batch_indices) -> None:
    """The hand-written loop, on the batches batch_indices(0, step) the product reads."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=ADAM_BETAS, weight_decay=0.1)
    warmup = max(1, steps // 5)
    model.train()
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        rows = windows[batch_indices(0, step)]
        loss = model(rows[:, :-1], rows[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
    model.eval()


def product_plan(steps: int, cycles: int, lr: float, seq_len: int, batch: int) -> TrainPlan:
    base, extra = divmod(steps, cycles)
    return TrainPlan(turns=1, cycle_steps=[base + (i < extra) for i in range(cycles)], lr=lr, seq_len=seq_len, batch_size=batch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of every run")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=128, help="held-out windows")
    parser.add_argument("--only", type=int, nargs="*", help="indices of SETTINGS to run (default all)")
    parser.add_argument("--bf16", action="store_true", help="also compare bf16 autocast with fp32 (the product's two precisions)")
    parser.add_argument("--precision-setting", type=int, default=0, help="the SETTINGS index bf16 is compared at (-1: none)")
    parser.add_argument("--precision-steps", type=int, default=None,
                        help="steps of the bf16 / fp32 pair (default --steps; bf16 is slow on a CPU without bf16 hardware)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = SIZES[args.size]
    tokenizer, train, heldout = english_corpus(config.vocab_size, args.seq_len, args.heldout)
    base = Decoder(config).init_weights(0)
    grown, _ = grow(base, config)
    print(f"corpus: {len(train_texts)} train files ({len(train):,} windows), {len(heldout_texts)} held-out files "
          f"({len(heldout)} windows of {args.seq_len} tokens scored)")
    print(f"model: grown {args.size}, {grown.parameter_count():,} parameters; every run {args.steps} steps of "
          f"{args.batch} x {args.seq_len} tokens ({args.steps * args.batch * args.seq_len:,} tokens), "
          f"torch threads {torch.get_num_threads()}\n")

    def product(setting: tuple, autocast: bool, steps: int = args.steps) -> tuple[float, float]:
        _, cycles, lr = setting
        model, _ = grow(base, config)
        plan = product_plan(steps, cycles, lr, args.seq_len, args.batch)
        trainer = Trainer(model.train(), train, None, plan, log=None, autocast=autocast)
        started = time.monotonic()
        trainer.run()
        return perplexity(model, heldout), time.monotonic() - started

    # The reference loop has no cycles: settings with the same lr and batch order share one run.
    references: dict[tuple, tuple[float, float]] = {}
    verdicts = []
    print(f"{'setting':<20} {'product':>9} {'reference':>10} {'ratio':>7}   (held-out perplexity; seconds)")
    chosen = range(len(SETTINGS)) if args.only is None else args.only
    for index in chosen:
        setting = SETTINGS[index]
        label, cycles, lr = setting
        ours, ours_s = product(setting, autocast=False)
        model, _ = grow(base, config)
        order = Trainer(model, train, None, product_plan(args.steps, cycles, lr, args.seq_len, args.batch), log=None)
        key = (lr, tuple(tuple(order.batch_indices(0, step).tolist()) for step in range(args.steps)))
        if key not in references:
            started = time.monotonic()
            reference_fit(model, train, args.steps, lr, order.batch_indices)
            references[key] = perplexity(model, heldout), time.monotonic() - started
        theirs, theirs_s = references[key]
        ratio = ours / theirs
        print(f"{label:<20} {ours:>9.2f} {theirs:>10.2f} {ratio:>7.3f}   ({ours_s:.0f} s, {theirs_s:.0f} s)", flush=True)
        verdicts.append((f"{label}: product / reference {ratio:.3f} <= {GOAL_RATIO}", ratio <= GOAL_RATIO))
    native = autocast_dtype(torch.device("cpu")) is not None
    if not args.bf16:
        print(f"\nbf16 autocast against fp32: not run (--bf16 runs it; this CPU "
              f"{'has bf16 hardware, where the product trains in bf16' if native else 'has no AVX512-BF16 or AMX: the product trains in fp32 here'})")
    elif 0 <= args.precision_setting < len(SETTINGS):
        setting, steps = SETTINGS[args.precision_setting], args.precision_steps or args.steps
        label = f"{setting[0]}, {steps} steps{'' if native else ', bf16 emulated: this CPU has no AVX512-BF16 or AMX'}"
        fp32, fp32_s = product(setting, autocast=False, steps=steps)
        bf16, bf16_s = product(setting, autocast=True, steps=steps)
        change = bf16 / fp32 - 1
        print(f"\nproduct, {label}: fp32 {fp32:.2f} ({fp32_s:.0f} s), bf16 autocast {bf16:.2f} ({bf16_s:.0f} s): "
              f"{100 * change:+.2f}%", flush=True)
        verdicts.append((f"{label}: bf16 autocast {100 * change:+.2f}% vs fp32, within {100 * GOAL_PRECISION:.0f}%",
                         abs(change) <= GOAL_PRECISION))
    print()
    for text, ok in verdicts:
        print(f"{'PASS' if ok else 'MISS'}  {text}")
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
