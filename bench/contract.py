"""Contraction quality: ours against weight magnitude and random choice, all with the same refit.

Trains a `tiny` source (12 blocks) with the product's Trainer on the English corpus split by file
(bench/corpus.py), then contracts 8 of its blocks at ratios 0.25, 0.5 and 0.75 with the product's
own code (training_image.contract). Every method removes the same number of parameters from
the same blocks (chosen by Block Influence) and gets the same least-squares refit of the kept
output-projection columns; each is also shown without the refit. The baselines remove ratio of
every block's MLP units and query heads; ours allots the same parameters across the blocks and
between attention and MLP by measured damage (shown too with its own choice of what goes but
the baselines' counts, to tell the allotment's part from the selection's). Prints held-out
perplexity (files never trained on) before and after healing with 1% of the source's training
tokens, healing by distillation from the source (the product's default) and, for ours, by the
language-model loss alone and by both.

Goals: ours' rise before healing <= 0.7 x that of magnitude + refit at every ratio; after
healing at most +1% at the default ratio.

    .venv/bin/python bench/contract.py            # trains the source (~10 CPU minutes at 1 thread)
    .venv/bin/python bench/contract.py --source /tmp/fusion-bench-contract/source   # reuse it
    .venv/bin/python bench/contract.py --size debug --layers 2 --steps 300 --batch 16 --heldout 64   # ~5 CPU minutes
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from corpus import english_texts, english_windows
from shared.settings import CONTRACT_CALIBRATION_WINDOWS, CONTRACT_SEQ_LEN, ContractSettings
from shared.shapes import SIZES
from training_image.contract import (
    HEAL_LR,
    block_influence,
    choose_blocks,
    contract_blocks,
    heal,
    layer_stats,
)
from training_image.evaluate import perplexity
from training_image.model import Decoder
from training_image.modeldir import load_model_dir, save_model_dir
from training_image.tokenizer import train_tokenizer
from training_image.train import Trainer, TrainPlan, batch_size_for

RATIOS = (0.25, 0.5, 0.75)
RANDOM_SEEDS = (0, 1, 2)
GOAL_VS_MAGNITUDE, GOAL_HEALED = 0.7, 0.01
DEFAULT_RATIO = ContractSettings.model_fields["contraction_ratio"].default


def train_source(args) -> tuple[Decoder, torch.Tensor, torch.Tensor, int]:
    """The source model, its training windows, held-out windows, and the tokens it trained on."""
    train_texts, heldout_texts = english_texts()
    cached = args.source is not None and (Path(args.source) / "config.json").is_file()
    if cached:
        model, tokenizer = load_model_dir(args.source)
    else:
        tokenizer = train_tokenizer(train_texts, SIZES[args.size].vocab_size)
        model = Decoder(SIZES[args.size]).init_weights(0)
    train, heldout = english_windows(tokenizer, CONTRACT_SEQ_LEN, train_texts, heldout_texts)
    heldout = heldout[torch.randperm(len(heldout), generator=torch.Generator().manual_seed(0))[: args.heldout]]
    plan = TrainPlan(turns=args.turns, cycle_steps=[args.steps], lr=args.lr, seq_len=CONTRACT_SEQ_LEN, batch_size=args.batch)
    tokens = plan.total_steps * plan.batch_size * plan.seq_len
    if cached:
        tokens = int((Path(args.source) / "source_tokens").read_text())
        print(f"source: {args.source} (trained on {tokens:,} tokens)")
    else:
        started = time.monotonic()
        Trainer(model.train(), train, None, plan, log=None).run()
        print(f"trained the source with the product's Trainer: {args.turns} turn(s) of {args.steps} steps of "
              f"{args.batch} x {CONTRACT_SEQ_LEN} at lr {args.lr:g} ({tokens:,} tokens) in {time.monotonic() - started:.0f} s")
        if args.source:
            save_model_dir(args.source, model, tokenizer)
            (Path(args.source) / "source_tokens").write_text(str(tokens))
    return model.eval(), train, heldout, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--steps", type=int, default=150, help="source training steps per turn (one cycle)")
    parser.add_argument("--turns", type=int, default=1, help="source training turns")
    parser.add_argument("--batch", type=int, default=16, help="source training sequences per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="source training learning rate")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heldout", type=int, default=128, help="held-out windows of 256 tokens")
    parser.add_argument("--source", default=None, help="model dir to reuse, or to save the trained source in")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy 2-core machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, train, heldout, source_tokens = train_source(args)
    calibration = train[:CONTRACT_CALIBRATION_WINDOWS]
    heal_batch = batch_size_for(model.config.parameters())  # as the contract job heals
    heal_steps = max(1, math.ceil(0.01 * source_tokens / (heal_batch * CONTRACT_SEQ_LEN)))  # 1% of the source's tokens
    base = perplexity(model, heldout)
    influence = block_influence(model, calibration)
    chosen = choose_blocks(influence, args.layers, model.config.ids())
    stats = layer_stats(model, calibration, chosen)  # the same calibration statistics for every method
    print(f"source: {model.config.parameters():,} parameters, held-out perplexity {base:.3f} "
          f"({len(heldout)} windows of {CONTRACT_SEQ_LEN} tokens from held-out files)")
    print("block influence: " + " ".join(f"{b}={v:.4f}" for b, v in influence.items()))
    print(f"contracting blocks {chosen}; healing {heal_steps} steps of {heal_batch} x {CONTRACT_SEQ_LEN} "
          f"({heal_steps * heal_batch * CONTRACT_SEQ_LEN:,} tokens) at lr {HEAL_LR:g}\n")

    def rise(p: float) -> float:
        return 100 * (p / base - 1)

    def healed(new: Decoder, loss: str) -> float:
        student = copy.deepcopy(new)
        heal(student, model, train, heal_steps, batch_size=heal_batch, loss=loss, seed=1)
        return perplexity(student, heldout)

    verdicts = []
    header = (f"{'ratio':>5} {'params after':>13} {'method':<26} {'ppl pruned':>10} {'rise':>8} "
              f"{'healed (KL)':>11} {'rise':>8}")
    print(header)
    print("-" * len(header))
    full = next(l for bid, l in zip(model.config.ids(), model.config.layers) if bid == chosen[0])
    print(f"{'':>5} {model.config.parameters():>13,} source (block: query heads/kv heads/MLP units {full.n_heads}/{full.n_kv_heads}/{full.mlp_hidden})")
    # (name, method, refit, seeds, even counts, healed too)
    variants = [("ours + refit", "activation", True, [0], False, True), ("magnitude + refit", "magnitude", True, [0], False, True),
                ("random + refit (3 seeds)", "random", True, list(RANDOM_SEEDS), False, True),
                ("ours, no refit", "activation", False, [0], False, True), ("magnitude, no refit", "magnitude", False, [0], False, True),
                ("ours in even counts + refit", "activation", True, [0], True, False)]
    for ratio in args.ratios:
        results, ours_model = {}, None
        for name, method, refit, seeds, even, heals in variants:
            pruned, after, sizes = [], [], set()
            for seed in seeds:
                new, config = contract_blocks(model, model.config, calibration, ratio, chosen, method=method, refit=refit,
                                              seed=seed, stats=stats, even=even)
                sizes.add(config.parameters())
                pruned.append(perplexity(new, heldout))
                if heals:
                    after.append(healed(new, "kl"))
                if name == "ours + refit":
                    ours_model = new
            results[name] = (statistics.mean(pruned), statistics.mean(after) if after else math.nan)
            healed_text = f"{results[name][1]:>11.3f} {rise(results[name][1]):>+7.2f}%" if after else f"{'':>11} {'':>8}"
            print(f"{ratio:>5} {'/'.join(f'{s:,}' for s in sorted(sizes)):>13} {name:<26} {results[name][0]:>10.3f} "
                  f"{rise(results[name][0]):>+7.2f}% {healed_text}", flush=True)
        kept = [(bid, layer) for bid, layer in zip(ours_model.config.ids(), ours_model.config.layers) if bid in chosen]
        print(f"{'':>5} {'':>13} ours keeps (block: query heads/kv heads/MLP units) "
              + " ".join(f"{bid}:{l.n_heads}/{l.n_kv_heads}/{l.mlp_hidden}" for bid, l in kept))
        for loss in ("lm", "kl+lm"):
            ppl = healed(ours_model, loss)
            print(f"{'':>5} {'':>13} {'ours + refit, heal ' + loss:<26} {'':>10} {'':>8} {ppl:>11.3f} {rise(ppl):>+7.2f}%", flush=True)
        ours, magnitude = results["ours + refit"], results["magnitude + refit"]
        versus = (ours[0] - base) / max(magnitude[0] - base, 1e-9)
        print(f"      ours / magnitude + refit, rise before healing: {versus:.3f}\n")
        verdicts.append((f"ratio {ratio}: rise before healing ours / magnitude + refit {versus:.3f} <= {GOAL_VS_MAGNITUDE}",
                         versus <= GOAL_VS_MAGNITUDE))
        if ratio == DEFAULT_RATIO:
            verdicts.append((f"ratio {ratio} after healing: {rise(ours[1]):+.2f}% <= +{100 * GOAL_HEALED:.0f}%",
                             ours[1] <= base * (1 + GOAL_HEALED)))
    for text, ok in verdicts:
        print(f"{'PASS' if ok else 'MISS'}  {text}")
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
