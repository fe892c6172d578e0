"""Per-step costs of the trainer, on the CPU as a proxy for a GPU, each against its alternative in
the same run (alternating rounds, medians of CPU time, so that the machine's other load weighs on
both alike).

    .venv/bin/python bench/step_costs.py [--size tiny] [--seq-len 256] [--rounds 8]

1. Host syncs: how many times a training step reads a value back from the device (Tensor.item,
   Tensor.tolist), counted over a few steps.
2. QKV: the attention's one matmul over the concatenated q, k, v weights (a copy of those weights
   every forward) against three matmuls, forward and backward.
3. Two gloo ranks: a step under DDP's defaults against gradient_as_bucket_view=True and
   broadcast_buffers=False (the trainer's); the held-out loss evaluated whole by every rank
   against each rank evaluating its share (the trainer's).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from shared.shapes import SIZES
from training_image.evaluate import heldout_loss
from training_image.model import Decoder
from training_image.train import Trainer, TrainPlan


def _cpu_seconds(run: Callable[[], object]) -> float:
    started = time.process_time()
    run()
    return time.process_time() - started


def alternate(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median CPU seconds of each run over rounds, in alternating order after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds + 1):
        for name in names if r % 2 else names[::-1]:
            seconds = _cpu_seconds(runs[name])
            if r:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def host_syncs(size: str, seq_len: int, steps: int = 4) -> None:
    config = SIZES[size]
    plan = TrainPlan(turns=1, cycle_steps=[steps + 1], lr=1e-3, seq_len=seq_len, batch_size=4)
    windows = torch.randint(0, config.vocab_size, (16, seq_len + 1))
    trainer = Trainer(Decoder(config).init_weights(0), windows, None, plan, log=None)
    trainer.run(max_steps=1)
    counts = {"item": 0, "tolist": 0}
    originals = {name: getattr(torch.Tensor, name) for name in counts}

    def counting(name):
        def read(self, *args, **kwargs):
            counts[name] += 1
            return originals[name](self, *args, **kwargs)

        return read

    try:
        for name in counts:
            setattr(torch.Tensor, name, counting(name))
        trainer.run(max_steps=steps)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    reads = sum(counts.values()) / steps
    print(f"host syncs: {reads:g} device reads a step ({counts} over {steps} steps); "
          "loss, stop flag and gradient norm come back in one")


class _Projection(nn.Module):
    def __init__(self, dim: int, q: int, kv: int):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(dim, n, bias=False) for n in (q, kv, kv))

    def concatenated(self, x):
        return F.linear(x, torch.cat((self.q.weight, self.k.weight, self.v.weight)))

    def separate(self, x):
        return self.q(x), self.k(x), self.v(x)


def qkv(size: str, seq_len: int, rounds: int) -> None:
    config = SIZES[size]
    layer = config.layers[0]
    projection = _Projection(config.dim, layer.n_heads * config.head_dim, layer.n_kv_heads * config.head_dim)
    x = torch.randn(4, seq_len, config.dim, requires_grad=True)

    def step(forward):
        def run():
            for _ in range(5):
                out = forward(x)
                out = torch.cat(out, dim=-1) if isinstance(out, tuple) else out
                out.sum().backward()

        return run

    times = alternate({"concatenated": step(projection.concatenated), "separate": step(projection.separate)}, rounds)
    weight_mb = sum(p.numel() for p in projection.parameters()) * 4 / 2**20
    print(
        f"QKV on {size} (dim {config.dim}, {layer.n_heads}/{layer.n_kv_heads} heads, batch 4 x {seq_len}): "
        f"concatenated weights {times['concatenated'] * 200:.2f} ms, three matmuls {times['separate'] * 200:.2f} ms "
        f"a forward+backward; ratio {times['concatenated'] / times['separate']:.2f} "
        f"(the concatenation copies {weight_mb:.1f} MB of weights a forward)"
    )


def _rank(rank: int, port: int, size: str, seq_len: int, rounds: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        config = SIZES[size]
        windows = torch.randint(0, config.vocab_size, (64, seq_len + 1), generator=torch.Generator().manual_seed(0))
        plan = TrainPlan(turns=1, cycle_steps=[10 * (rounds + 1)], lr=1e-3, seq_len=seq_len, batch_size=4)
        ours = Trainer(Decoder(config).init_weights(0), windows, None, plan, log=None)
        defaults = Trainer(Decoder(config).init_weights(0), windows, None, plan, log=None)
        defaults.network = nn.parallel.DistributedDataParallel(defaults.model)

        def steps(trainer):
            def run():
                dist.barrier()
                trainer.run(max_steps=2)
                dist.barrier()

            return run

        step_times = alternate({"defaults": steps(defaults), "ours": steps(ours)}, rounds)
        model = ours.model
        heldout = windows[:32]

        def evaluate(across_ranks: bool):
            def run():
                dist.barrier()
                heldout_loss(model, heldout, across_ranks=across_ranks)
                dist.barrier()

            return run

        eval_times = alternate({"whole": evaluate(False), "shared": evaluate(True)}, rounds)
        if rank == 0:
            torch.save({"steps": step_times, "eval": eval_times}, out)
    finally:
        dist.destroy_process_group()


def two_ranks(size: str, seq_len: int, rounds: int) -> None:
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = f"{folder}/result.pt"
        mp.spawn(_rank, args=(port, size, seq_len, rounds, out), nprocs=2, join=True)
        result = torch.load(out)
    steps, evals = result["steps"], result["eval"]
    print(
        f"two gloo ranks, {size}, batch 4 x {seq_len}: 2 steps under DDP's defaults {steps['defaults'] * 1e3:.0f} ms, "
        f"with gradient_as_bucket_view and no buffer broadcast {steps['ours'] * 1e3:.0f} ms "
        f"(ratio {steps['defaults'] / steps['ours']:.2f}; rank 0's CPU time)"
    )
    print(
        f"held-out loss of 32 windows: every rank the whole set {evals['whole'] * 1e3:.0f} ms, each rank its share "
        f"{evals['shared'] * 1e3:.0f} ms (ratio {evals['whole'] / evals['shared']:.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    host_syncs(args.size, args.seq_len)
    qkv("small", args.seq_len, args.rounds)
    two_ranks(args.size, args.seq_len, args.rounds)


if __name__ == "__main__":
    main()
