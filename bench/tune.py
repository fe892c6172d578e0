"""Does a tuning find a better config, cheaply? Proxy trials against the full runs they stand for.

On the English corpus split by file (bench/corpus.py: Debian's fortunes, held-out perplexity on
files never trained on) and a grown model, it runs what a tuning runs, in this process:

1. N trials of lr (log range, drawn as the local tuner draws them: local.tuner.draws), each a
   proxy of the full run (shared.settings.proxy_settings: proxy_fraction of each turn's steps,
   the same cycles), held-out perplexity at each cycle's end on the same windows;
2. the full run at the default settings (TrainSettings' lr), and the full run of every trial's
   settings (the winner's among them);

and prints each run's held-out perplexity and price (shared.pricing: the tokens billed at the
model's tier; the full runs with their growth fee), the tuning's bill (shared.tunings: what its
trials trained) as a share of one full run (goal <= 25%), whether the winner's full run beats the
default's (or the default was already best), and the Spearman rank correlation between the
proxies' and the full runs' perplexities over the trials.

The trials here run to their end: the tuner's early stopping would only lower the tuning's cost.

    OMP_NUM_THREADS=2 nice .venv/bin/python bench/tune.py            # ~15 CPU minutes at 2 threads
    .venv/bin/python bench/tune.py --size debug --steps-per-cycle 40  # a quick look

Measured on a shared 2-core CPU with `--size debug --trials 4 --proxy-fraction 0.06 --steps-per-cycle 100
--threads 1` (debug grown to 292,800 parameters, 200-step full runs, 12-step trials; 9 minutes): the
winner (lr 4.26e-3) reaches held-out perplexity 74.86 against the default's (lr 1e-4) 330.30, the
trials cost 20.4% of one full run (unrounded; both round up to the USD 0.01 minimum charge at this
size), and the proxies rank the four trials as their full runs do (Spearman 1.00). The tiny size,
the default, was not run here for lack of CPU time.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from decimal import Decimal
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corpus import english_corpus  # noqa: E402

from local.tuner import draws  # noqa: E402
from shared.pricing import bill, estimate_train  # noqa: E402
from shared.settings import TrainSettings, proxy_settings  # noqa: E402
from shared.shapes import SIZES  # noqa: E402
from shared.tunings import IntRange, LogRange, TuningRequest, price, trial_settings  # noqa: E402
from training_image.growth import grow  # noqa: E402
from training_image.model import Decoder  # noqa: E402
from training_image.train import Trainer, TrainPlan  # noqa: E402

GOAL_SHARE = Decimal("0.25")


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (no ties expected among perplexities)."""
    def ranks(values: list[float]) -> list[int]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0] * len(values)
        for r, i in enumerate(order):
            out[i] = r
        return out

    ra, rb, n = ranks(a), ranks(b), len(a)
    if n < 2:
        return float("nan")
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--proxy-fraction", type=float, default=0.06)
    parser.add_argument("--lr", default="1e-4:1e-2", help="the lr range searched, MIN:MAX (log scale)")
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--steps-per-cycle", type=int, default=150)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="sequences a step (the same for every run)")
    parser.add_argument("--heldout", type=int, default=64, help="held-out windows scored at each cycle's end")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = SIZES[args.size]
    tokenizer, train, heldout = english_corpus(config.vocab_size, args.seq_len, args.heldout)
    base = Decoder(config).init_weights(args.seed)
    low, high = (float(x) for x in args.lr.split(":"))
    default = TrainSettings(cycles=args.cycles, steps_per_cycle=args.steps_per_cycle, seq_len=args.seq_len)
    request = TuningRequest(model=f"base-{args.size}", dataset="bench", settings=default,
                            ranges={"lr": LogRange(min=low, max=high)}, max_trials=args.trials,
                            max_parallel_trials=1, proxy_fraction=args.proxy_fraction)
    tuning_price = price(request, config, request.searched())

    def run(settings: TrainSettings) -> tuple[list[float], float]:
        """Held-out perplexity at each cycle's end of a run with these settings, and its seconds."""
        model, _ = grow(base, config)
        plan = TrainPlan(turns=settings.turns, cycle_steps=settings.cycle_steps(), lr=settings.lr,
                         seq_len=settings.seq_len, batch_size=args.batch)
        trainer = Trainer(model.train(), train, heldout, plan, log=None)
        started = time.monotonic()
        state = trainer.run()
        return [c["perplexity"] for c in state.cycles], time.monotonic() - started

    full_cost = estimate_train(default, config).total
    print(f"corpus: {len(train_texts)} train files ({len(train):,} windows), {len(heldout_texts)} held-out files "
          f"({len(heldout)} windows of {args.seq_len} tokens scored at each cycle's end)")
    print(f"model: {args.size} grown to {grow(base, config)[0].parameter_count():,} parameters; full run "
          f"{default.turns} turn x {default.cycles} cycles x {default.steps_per_cycle} steps of {args.batch} x "
          f"{args.seq_len} tokens; trials at {args.proxy_fraction:.0%} "
          f"({proxy_settings(default, args.proxy_fraction).steps_per_turn()} steps); torch threads {torch.get_num_threads()}")
    print(f"tuning: {args.trials} trials of lr in [{low:g}, {high:g}] (log), priced up front at USD {tuning_price.total}\n")

    plan = draws({"ContinuousParameterRanges": [{"Name": "lr", "MinValue": str(low), "MaxValue": str(high),
                                                 "ScalingType": "Logarithmic"}]},
                 args.trials, random.Random(args.seed))
    trials = []
    for tuned in plan:
        full = trial_settings(default, tuned)
        proxy = proxy_settings(full, args.proxy_fraction)
        curve, seconds = run(proxy)
        cost = Decimal(proxy.training_tokens()) / 1_000_000 * tuning_price.usd_per_million_tokens
        trials.append({"settings": full, "proxy": curve[-1], "curve": curve, "tokens": proxy.training_tokens(),
                       "cost": cost, "seconds": seconds})
        print(f"trial lr {full.lr:.2e}: proxy held-out perplexity {curve[-1]:8.2f} "
              f"(curve {' '.join(f'{p:.1f}' for p in curve)}), {seconds:.0f} s", flush=True)
    tuning_bill = bill(tuning_price, sum(t["tokens"] for t in trials))
    trials.sort(key=lambda t: t["proxy"])

    print()
    default_curve, default_s = run(default)
    print(f"full run, default lr {default.lr:.2e}: held-out perplexity {default_curve[-1]:8.2f}, "
          f"USD {full_cost}, {default_s:.0f} s", flush=True)
    for t in trials:
        curve, seconds = run(t["settings"])
        t["full"] = curve[-1]
        t["full_cost"] = estimate_train(t["settings"], config).total
        print(f"full run, trial lr {t['settings'].lr:.2e}: held-out perplexity {t['full']:8.2f}, "
              f"USD {t['full_cost']}, {seconds:.0f} s", flush=True)

    winner = trials[0]
    # The share on exact costs: at a toy size both sides round up to the minimum charge.
    full_exact = estimate_train(default, config)
    share = sum(t["cost"] for t in trials) / (full_exact.training_cost + full_exact.growth_fee)
    rho = spearman([t["proxy"] for t in trials], [t["full"] for t in trials])
    best_full = min(trials, key=lambda t: t["full"])
    print("\nrank  lr        proxy ppl  full ppl  trial USD   full-run USD")
    for i, t in enumerate(trials, 1):
        print(f"{i:>4}  {t['settings'].lr:.2e}  {t['proxy']:9.2f}  {t['full']:8.2f}  {t['cost']:.6f}  {t['full_cost']}")
    print(f"   -  {default.lr:.2e}  {'':>9}  {default_curve[-1]:8.2f}  {'':>8}  {full_cost}  (default)")
    print(f"\ntuning bill USD {tuning_bill} (price USD {tuning_price.total}); one full run USD {full_cost}; unrounded, "
          f"the trials cost USD {sum(t['cost'] for t in trials):.6f} = {share:.1%} of the full run's "
          f"USD {full_exact.training_cost + full_exact.growth_fee:.6f} (tokens and growth fee)")
    print(f"winner lr {winner['settings'].lr:.2e}: full run {winner['full']:.2f} against the default's "
          f"{default_curve[-1]:.2f} ({winner['full'] / default_curve[-1]:.3f}x); best full run among the trials: "
          f"lr {best_full['settings'].lr:.2e} at {best_full['full']:.2f}")
    print(f"Spearman rank correlation, proxy vs full, over {len(trials)} trials: {rho:.2f}")
    verdicts = [
        (f"the tuning costs {share:.1%} of one full run, at most {GOAL_SHARE:.0%}", share <= GOAL_SHARE),
        ("the winner's full run beats the default's, or the default was already best",
         winner["full"] < default_curve[-1] or default_curve[-1] <= best_full["full"]),
        (f"the proxies rank the trials as their full runs do (rho {rho:.2f} > 0)", rho > 0),
    ]
    print()
    for text, ok in verdicts:
        print(f"{'PASS' if ok else 'MISS'}  {text}")
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
