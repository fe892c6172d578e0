"""Training benchmark, in one process on the same shapes and data.

Throughput: tokens/s of Fusion's trainer against a plain Hugging Face LlamaForCausalLM + AdamW
loop of the same shape, batch and data, measured in alternating rounds so that whatever else
the machine is doing weighs on both alike. Quality: held-out perplexity after 1 turn and after
2 turns from the same grown base.

    .venv/bin/python bench/train.py [--size tiny] [--seq-len 128] [--rounds 6] [--steps 4]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shared.shapes import SIZES, ModelConfig
from training_image.data import stdlib_corpus, token_windows
from training_image.evaluate import perplexity
from training_image.growth import grow
from training_image.model import Decoder
from training_image.tokenizer import train_tokenizer
from training_image.train import Trainer, TrainPlan, batch_size_for


def hf_llama(config: ModelConfig) -> LlamaForCausalLM:
    layer = config.layers[0]
    hf = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=layer.mlp_hidden,
        num_hidden_layers=config.n_layers, num_attention_heads=layer.n_heads, num_key_value_heads=layer.n_kv_heads,
        head_dim=config.head_dim, max_position_embeddings=config.context_length, rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
    )
    return LlamaForCausalLM(hf)


def ours_round(model: Decoder, windows: torch.Tensor, plan: TrainPlan) -> None:
    Trainer(model, windows, None, plan, log=None).run()


def hf_round(model: LlamaForCausalLM, optimizer, windows: torch.Tensor, plan: TrainPlan) -> None:
    batch = plan.batch_size
    for step in range(plan.steps_per_turn):
        rows = windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(step))[:batch]]
        loss = model(input_ids=rows[:, :-1], labels=rows[:, :-1]).loss  # HF shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _timed(run) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). CPU time is what contention from other
    processes on a shared machine disturbs least; wall time is what a user waits."""
    wall, cpu = time.monotonic(), time.process_time()
    run()
    return time.monotonic() - wall, time.process_time() - cpu


def throughput(config: ModelConfig, windows: torch.Tensor, seq_len: int, rounds: int, steps: int) -> None:
    batch = batch_size_for(config.parameters())
    ours = Decoder(config).init_weights(0).train()
    hf = hf_llama(config).train()
    hf_optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    times: dict[str, list[tuple[float, float]]] = {"fusion": [], "hf": []}
    for r in range(rounds + 1):  # round 0 warms both up and is not counted
        plan = TrainPlan(turns=1, cycle_steps=[steps], lr=1e-4, seq_len=seq_len, batch_size=batch, seed=r)
        runs = [("fusion", lambda: ours_round(ours, windows, plan)), ("hf", lambda: hf_round(hf, hf_optimizer, windows, plan))]
        for name, run in runs if r % 2 else runs[::-1]:
            measured = _timed(run)
            if r:
                times[name].append(measured)
    tokens = steps * batch * seq_len
    rate = {name: [(tokens / w, tokens / c) for w, c in t] for name, t in times.items()}
    wall = {name: statistics.median(x[0] for x in r) for name, r in rate.items()}
    cpu = {name: statistics.median(x[1] for x in r) for name, r in rate.items()}
    print(f"throughput: {config.parameters():,} parameters, batch {batch} x seq_len {seq_len}, "
          f"{rounds} alternating rounds of {steps} steps, torch threads {torch.get_num_threads()}")
    print(f"{'':22s}{'wall tokens/s':>15s}{'CPU-time tokens/s':>20s}")
    print(f"  fusion trainer    {wall['fusion']:15.0f}{cpu['fusion']:20.0f}")
    print(f"  HF Llama + AdamW  {wall['hf']:15.0f}{cpu['hf']:20.0f}")
    print(f"  ratio fusion / HF {wall['fusion'] / wall['hf']:15.2f}{cpu['fusion'] / cpu['hf']:20.2f}   (must be >= 1.0, goal 1.5)")


def quality(config: ModelConfig, train: torch.Tensor, heldout: torch.Tensor, seq_len: int, cycles: int, steps: int, lr: float) -> None:
    base = Decoder(config).init_weights(0)
    results = {}
    for turns in (1, 2):
        model, _ = grow(base, config)
        plan = TrainPlan(turns=turns, cycle_steps=[steps] * cycles, lr=lr, seq_len=seq_len,
                         batch_size=batch_size_for(model.config.parameters()))
        started = time.monotonic()
        Trainer(model, train, None, plan, log=None).run()
        results[turns] = (perplexity(model, heldout), time.monotonic() - started)
    before = perplexity(grow(base, config)[0], heldout)
    print(f"quality: grown {config.n_layers}-block base, {cycles} cycles x {steps} steps per turn, lr {lr}, "
          f"{len(heldout)} held-out windows of {seq_len} tokens")
    print(f"  perplexity before training {before:10.2f}")
    for turns, (ppl, seconds) in results.items():
        print(f"  after {turns} turn{'s' if turns > 1 else ' '}            {ppl:10.2f}   ({seconds:.0f} s)")
    print(f"  ratio 2 turns / 1 turn     {results[2][0] / results[1][0]:10.3f}   (must be < 1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--quality-size", default="debug", choices=sorted(SIZES))
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--steps-per-cycle", type=int, default=150)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    corpus = stdlib_corpus(3_000_000)
    for size, run in ((args.size, "throughput"), (args.quality_size, "quality")):
        config = SIZES[size]
        tokenizer = train_tokenizer(corpus, config.vocab_size)
        train, heldout = token_windows(tokenizer, corpus, args.seq_len)
        if run == "throughput":
            throughput(config, train, args.seq_len, args.rounds, args.steps)
        else:
            quality(config, train, heldout, args.seq_len, args.cycles, args.steps_per_cycle, args.lr)


if __name__ == "__main__":
    main()
