"""FSDP on CPU (gloo): sharded training computes what one process computes (fp32: to float
noise; bf16, forced on whatever the CPU: to the tolerance bf16 keeps), and its sharded
checkpoints resume at another world size and after a SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch
import torch.multiprocessing as mp

from shared.shapes import SIZES
from training_image import parallel
from training_image.checkpoint import latest
from training_image.model import Decoder
from training_image.train import Trainer, TrainingStopped, TrainPlan

from .conftest import assert_bf16_close, free_port, gloo_group

# 10 steps in two cycles (the first cycle's end writes a checkpoint); 8 sequences a step split
# over 1, 2 or 4 ranks.
PLAN = TrainPlan(turns=1, cycle_steps=[6, 4], lr=3e-3, seq_len=16, batch_size=8, seed=3)
REL = 1e-5


def _windows() -> torch.Tensor:
    generator = torch.Generator().manual_seed(11)
    return torch.randint(0, SIZES["debug"].vocab_size, (48, PLAN.seq_len + 1), generator=generator)


def _trainer(checkpoint_dir, strategy: str = "fsdp", checkpointing: bool = False, bf16: bool = False) -> Trainer:
    model = Decoder(SIZES["debug"]).init_weights(0)
    return Trainer(
        model, _windows(), None, PLAN, job_id="job-1", checkpoint_dir=checkpoint_dir, progress_every=1,
        strategy=strategy, activation_checkpointing=checkpointing, log=None, autocast=bf16,
    )


def _run(checkpoint_dir, *, max_steps=None, stop_at=None, resume=False, checkpointing=False, bf16=False) -> dict:
    """Train (resuming first when asked); the losses of this run, the final full weights (rank 0)
    and whether a SIGTERM stopped it. fp32 unless bf16."""
    trainer = _trainer(checkpoint_dir, checkpointing=checkpointing, bf16=bf16)
    if resume:
        assert trainer.resume()
    if stop_at is not None:
        def log(line: str) -> None:  # a real SIGTERM to every rank (as torchrun passes it on), mid-cycle
            if trainer.state.step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)

        trainer.log = log
    stopped = False
    try:
        with trainer.stop_on_sigterm():
            trainer.run(max_steps)
            if max_steps is not None:
                trainer.save_checkpoint()
    except TrainingStopped:
        stopped = True
    whole = parallel.full_model(trainer.model)
    return {
        "losses": trainer.losses, "step": trainer.state.step, "stopped": stopped, "sharded": trainer.sharded,
        "state": whole.state_dict() if whole is not None else None,
    }


def _worker(rank: int, world_size: int, port: int, out: str, kwargs: dict) -> None:
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)
    with gloo_group(rank, world_size, port):
        result = _run(**kwargs)
        if rank == 0:
            torch.save(result, out)


def _spawn(world_size: int, tmp_path, name: str, **kwargs) -> dict:
    out = str(tmp_path / f"{name}.pt")
    mp.spawn(_worker, args=(world_size, free_port(), out, kwargs), nprocs=world_size, join=True)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    torch.set_num_threads(1)
    return _run(tmp_path_factory.mktemp("single") / "checkpoints")


@pytest.mark.slow
def test_two_and_four_sharded_ranks_give_the_single_process_losses(single, tmp_path):
    two = _spawn(2, tmp_path, "two", checkpoint_dir=tmp_path / "two")
    assert two["sharded"] and two["losses"] == pytest.approx(single["losses"], rel=REL)
    # The weights: AdamW divides each gradient by its own running scale, so an element whose
    # gradient is near eps (an embedding row of a token seen once) turns the reduction order's
    # rounding into a visible difference. All are within 1e-4 (a thirtieth of one step's largest
    # move at this lr), and at most one in 10,000 is past 1e-5.
    for name, value in single["state"].items():
        torch.testing.assert_close(two["state"][name], value, rtol=1e-4, atol=1e-4)
        assert ((two["state"][name] - value).abs() > 1e-5 + 1e-4 * value.abs()).sum() <= value.numel() // 10_000, name
    # Saved at 4 ranks after 5 steps (sharded, mid-cycle), resumed at 2, then at 1 from a copy.
    four = _spawn(4, tmp_path, "four", checkpoint_dir=tmp_path / "four", max_steps=5)
    assert four["losses"] == pytest.approx(single["losses"][:5], rel=REL)
    assert latest(tmp_path / "four").name == "step-5"
    shutil.copytree(tmp_path / "four", tmp_path / "four-copy")
    resumed = _spawn(2, tmp_path, "resumed", checkpoint_dir=tmp_path / "four", resume=True)
    assert resumed["step"] == 10 and resumed["losses"] == pytest.approx(single["losses"][5:], rel=REL)
    alone = _run(tmp_path / "four-copy", resume=True)
    assert not alone["sharded"] and alone["losses"] == pytest.approx(single["losses"][5:], rel=REL)
    assert latest(tmp_path / "four-copy").name == "step-10"  # it goes on saving sharded checkpoints


@pytest.mark.slow
def test_two_sharded_ranks_in_bf16_keep_to_the_single_process_within_bf16_tolerance(tmp_path):
    single = _run(tmp_path / "single", bf16=True)
    two = _spawn(2, tmp_path, "two", checkpoint_dir=tmp_path / "two", bf16=True)
    # One process autocasts its matmuls; the sharded ranks gather bf16 weights (the policy GPUs run).
    assert two["sharded"] and not single["sharded"]
    assert_bf16_close(two["losses"], two["state"], single["losses"], single["state"],
                      Decoder(SIZES["debug"]).init_weights(0).state_dict())


@pytest.mark.slow
def test_sigterm_mid_cycle_then_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    whole = _spawn(2, tmp_path, "whole", checkpoint_dir=tmp_path / "whole", checkpointing=True)
    stopped = _spawn(2, tmp_path, "stopped", checkpoint_dir=tmp_path / "run", stop_at=3, checkpointing=True)
    # Each rank's flag is set after that step's exchange: the ranks stop together after it or after
    # the next, where the flags meet — in the first cycle either way, not at its end.
    assert stopped["stopped"] and stopped["step"] in (3, 4)
    assert latest(tmp_path / "run").name == f"step-{stopped['step']}"
    resumed = _spawn(2, tmp_path, "resumed", checkpoint_dir=tmp_path / "run", resume=True, checkpointing=True)
    assert not resumed["stopped"] and resumed["step"] == 10
    assert stopped["losses"] + resumed["losses"] == whole["losses"]
    for name, value in whole["state"].items():
        assert torch.equal(resumed["state"][name], value), name


def test_recomputed_blocks_give_the_same_loss_and_gradients_under_the_same_names():
    windows = _windows()[:4]
    plain, recomputed = Decoder(SIZES["debug"]).init_weights(0), Decoder(SIZES["debug"]).init_weights(0)
    parallel.checkpoint_blocks(recomputed)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = recomputed(windows[:, :-1], windows[:, 1:])
    kept = sum(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        reference = plain(windows[:, :-1], windows[:, 1:])
    assert kept < sum(saved) / 2  # the blocks keep their inputs, not their activations
    loss.backward()
    reference.backward()
    assert torch.equal(loss, reference)
    assert list(recomputed.state_dict()) == list(plain.state_dict())
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
