"""DDP: two gloo processes compute the same training as one process with the same global batch."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shared.shapes import SIZES
from training_image.model import Decoder
from training_image.train import Trainer, TrainPlan

from .conftest import free_port

PLAN = TrainPlan(turns=2, cycle_steps=[3], lr=3e-3, seq_len=32, batch_size=4, seed=1)


def _train(windows: torch.Tensor, micro_batch: int | None = None) -> tuple[dict, list[float]]:
    model = Decoder(SIZES["debug"]).init_weights(0)
    trainer = Trainer(model, windows, None, PLAN, micro_batch=micro_batch, log=None)
    trainer.run()
    return model.state_dict(), trainer.losses


def _worker(rank: int, world_size: int, port: int, windows: torch.Tensor, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        state, losses = _train(windows)
        if rank == 0:
            torch.save({"state": state, "losses": losses}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_with_the_same_global_batch(windows, tmp_path):
    train = windows[0][:32]
    single_state, single_losses = _train(train)
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, free_port(), train, out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=False)
    assert ddp["losses"] == pytest.approx(single_losses, rel=1e-5)
    for name, value in single_state.items():
        torch.testing.assert_close(ddp["state"][name], value, rtol=1e-4, atol=1e-5)  # Adam magnifies float noise where a gradient is ~0
    assert not torch.equal(single_state["embed.weight"], Decoder(SIZES["debug"]).init_weights(0).embed.weight)


def test_gradient_accumulation_over_micro_batches_equals_one_batch(windows):
    train = windows[0][:32]
    whole, whole_losses = _train(train)
    accumulated, accumulated_losses = _train(train, micro_batch=1)
    assert accumulated_losses == pytest.approx(whole_losses, rel=1e-5)
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-4, atol=1e-5)  # Adam magnifies float noise where a gradient is ~0
