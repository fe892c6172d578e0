"""DDP: two gloo processes compute the same training as one process with the same global batch,
and accumulating micro-batches the same as one batch: in fp32 to float noise, in bf16 autocast
(forced on, whatever the CPU) to the tolerance bf16 keeps."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from shared.shapes import SIZES
from training_image.model import Decoder
from training_image.train import Trainer, TrainPlan

from .conftest import assert_bf16_close, free_port, gloo_group

PLAN = TrainPlan(turns=2, cycle_steps=[3], lr=3e-3, seq_len=32, batch_size=4, seed=1)


def _train(windows: torch.Tensor, micro_batch: int | None = None, bf16: bool = False) -> tuple[dict, list[float]]:
    model = Decoder(SIZES["debug"]).init_weights(0)
    trainer = Trainer(model, windows, None, PLAN, micro_batch=micro_batch, log=None, autocast=bf16)
    trainer.run()
    return model.state_dict(), trainer.losses


def _worker(rank: int, world_size: int, port: int, windows: torch.Tensor, out: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, world_size, port):
        runs = {bf16: _train(windows, bf16=bf16) for bf16 in (False, True)}
        if rank == 0:
            torch.save(runs, out)


@pytest.fixture(scope="module")
def two_ranks(windows, tmp_path_factory) -> dict[bool, tuple[dict, list[float]]]:
    """The training at two ranks, in fp32 (False) and bf16 (True): one spawn for both."""
    out = str(tmp_path_factory.mktemp("ddp") / "ddp.pt")
    mp.spawn(_worker, args=(2, free_port(), windows[0][:32], out), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_with_the_same_global_batch(windows, two_ranks):
    """fp32, whatever the CPU: equal to float noise."""
    train = windows[0][:32]
    single_state, single_losses = _train(train)
    state, losses = two_ranks[False]
    assert losses == pytest.approx(single_losses, rel=1e-5)
    for name, value in single_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5)  # Adam magnifies float noise where a gradient is ~0
    assert not torch.equal(single_state["embed.weight"], Decoder(SIZES["debug"]).init_weights(0).embed.weight)


@pytest.mark.slow
def test_two_gloo_ranks_in_bf16_keep_to_the_single_process_within_bf16_tolerance(windows, two_ranks):
    train = windows[0][:32]
    single_state, single_losses = _train(train, bf16=True)
    state, losses = two_ranks[True]
    assert_bf16_close(losses, state, single_losses, single_state, Decoder(SIZES["debug"]).init_weights(0).state_dict())


def test_gradient_accumulation_over_micro_batches_equals_one_batch(windows):
    """fp32, whatever the CPU: equal to float noise."""
    train = windows[0][:32]
    whole, whole_losses = _train(train)
    accumulated, accumulated_losses = _train(train, micro_batch=1)
    assert accumulated_losses == pytest.approx(whole_losses, rel=1e-5)
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-4, atol=1e-5)  # Adam magnifies float noise where a gradient is ~0


def test_gradient_accumulation_in_bf16_keeps_to_one_batch_within_bf16_tolerance(windows):
    train = windows[0][:32]
    whole, whole_losses = _train(train, bf16=True)
    accumulated, accumulated_losses = _train(train, micro_batch=1, bf16=True)
    assert_bf16_close(accumulated_losses, accumulated, whole_losses, whole, Decoder(SIZES["debug"]).init_weights(0).state_dict())
