"""Gradient sync once a step: over 2 gloo ranks, micro-batches whose gradient sync is deferred to
the last one give the update of the whole batch in one pass (fp32, to float noise), under FSDP
(its reduce-scatter skipped, counted) and under DDP (no_sync)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shared.shapes import SIZES
from training_image import parallel
from training_image.model import Decoder
from training_image.train import Trainer, TrainPlan

from .conftest import free_port, gloo_group

# 2 steps of 8 sequences: 4 a rank, in micro-batches of 1.
PLAN = TrainPlan(turns=1, cycle_steps=[2], lr=3e-3, seq_len=16, batch_size=8, seed=5)
MICRO_BATCHES = PLAN.batch_size // 2


def _windows() -> torch.Tensor:
    generator = torch.Generator().manual_seed(13)
    return torch.randint(0, SIZES["debug"].vocab_size, (16, PLAN.seq_len + 1), generator=generator)


def _train(strategy: str, micro_batch: int | None, defer: bool) -> dict:
    model = Decoder(SIZES["debug"]).init_weights(0)
    trainer = Trainer(model, _windows(), None, PLAN, strategy=strategy, micro_batch=micro_batch,
                      defer_gradient_sync=defer, log=None, autocast=False)
    trainer.run()
    whole = parallel.full_model(trainer.model)
    return {"losses": trainer.losses, "state": whole.state_dict() if whole is not None else None}


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)
    counted = {"n": 0}
    reduce_scatter = dist.reduce_scatter_single

    def counting(*args, **kwargs):
        counted["n"] += 1
        return reduce_scatter(*args, **kwargs)

    dist.reduce_scatter_single = counting  # FSDP2's reduce-scatter of gradients (DefaultReduceScatter)
    try:
        with gloo_group(rank, world_size, port):
            results = {}
            for name, strategy, defer in (("fsdp-deferred", "fsdp", True), ("fsdp-each", "fsdp", False),
                                          ("ddp", "ddp", False)):
                counted["n"] = 0
                results[name] = {**_train(strategy, 1, defer), "reduce_scatters": counted["n"]}
            if rank == 0:
                torch.save(results, out)
    finally:
        dist.reduce_scatter_single = reduce_scatter


@pytest.mark.slow
def test_a_sync_deferred_to_the_last_micro_batch_gives_the_one_batch_update(tmp_path):
    """fp32, whatever the CPU."""
    one_batch = _train("ddp", None, False)  # one process, the whole batch in one pass
    out = str(tmp_path / "runs.pt")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    runs = torch.load(out, weights_only=False)
    units = len(SIZES["debug"].layers) + 3  # each block, the embeddings, norm and head, the root's rest
    deferred, each = runs["fsdp-deferred"]["reduce_scatters"], runs["fsdp-each"]["reduce_scatters"]
    # Reduce-scattered once a step, against once a micro-batch: a quarter as many.
    assert 0 < deferred <= PLAN.total_steps * units and each == MICRO_BATCHES * deferred
    for name in ("fsdp-deferred", "fsdp-each", "ddp"):
        assert runs[name]["losses"] == pytest.approx(one_batch["losses"], rel=1e-5), name
        for key, value in one_batch["state"].items():
            torch.testing.assert_close(runs[name]["state"][key], value, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
    assert not torch.equal(one_batch["state"]["embed.weight"], Decoder(SIZES["debug"]).init_weights(0).embed.weight)
