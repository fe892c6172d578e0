"""A step's one exchange: a checkpoint that falls due on one rank is written by every rank after
the same step (a sharded save is collective); the next step's batch is read ahead, and is the
batch that step trains on."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shared.shapes import SIZES
from training_image.model import Decoder
from training_image.train import Trainer, TrainPlan

from .conftest import free_port, gloo_group

PLAN = TrainPlan(turns=2, cycle_steps=[3, 3], lr=3e-3, seq_len=16, batch_size=4, seed=7)
DUE_AFTER = 4  # rank 1 alone finds its interval passed after this step


def _windows() -> torch.Tensor:
    generator = torch.Generator().manual_seed(17)
    return torch.randint(0, SIZES["debug"].vocab_size, (12, PLAN.seq_len + 1), generator=generator)


def _trainer(checkpoint_dir=None, strategy: str = "ddp") -> Trainer:
    model = Decoder(SIZES["debug"]).init_weights(0)
    return Trainer(model, _windows(), None, PLAN, job_id="job-1", checkpoint_dir=checkpoint_dir, progress_every=1,
                   strategy=strategy, checkpoint_interval_s=1e9, log=None, autocast=False)


def _worker(rank: int, world_size: int, port: int, checkpoint_dir, out: str) -> None:
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)
    with gloo_group(rank, world_size, port):
        trainer = _trainer(checkpoint_dir, "fsdp")
        saved: list[int] = []
        save = trainer.save_checkpoint

        def recording(**kwargs) -> bool:
            saved.append(trainer.state.step)
            trainer.checkpoint_interval_s = 1e9
            return save(**kwargs)

        def log(line: str) -> None:
            if rank == 1 and trainer.state.step == DUE_AFTER:
                trainer.checkpoint_interval_s = 0.0  # due at the next step's exchange, on this rank only

        trainer.save_checkpoint, trainer.log = recording, log
        trainer.run(max_steps=5)
        everyone: list = [None] * world_size
        dist.all_gather_object(everyone, saved)
        if rank == 0:
            torch.save(everyone, out)


@pytest.mark.slow
def test_a_checkpoint_due_on_one_rank_is_written_by_all_after_the_same_step(tmp_path):
    out = str(tmp_path / "saved.pt")
    mp.spawn(_worker, args=(2, free_port(), tmp_path / "checkpoints", out), nprocs=2, join=True)
    first, second = torch.load(out, weights_only=False)
    # Step 3 ends the first cycle (a save of its own); rank 1's flag, raised after step 4 and
    # sampled at step 5's exchange, makes both save after step 5.
    assert first == second == [3, DUE_AFTER + 1]
    assert (tmp_path / f"checkpoints/sharded/step-{DUE_AFTER + 1}/.metadata").is_file()


def test_the_next_steps_batch_is_read_ahead_and_is_the_one_it_trains_on():
    trainer = _trainer()
    for step in range(PLAN.total_steps):
        key = (step // PLAN.steps_per_turn, step % PLAN.steps_per_turn)
        expected = trainer._load_batch(*key)
        if step:
            assert list(trainer._prefetched) == [key]  # across the cycle and the turn boundary too
            for ahead, now in zip(trainer._prefetched[key], expected):
                assert (ahead is None and now is None) or torch.equal(ahead, now)
        trainer.run(max_steps=1)
    assert trainer.state.turn == PLAN.turns and not trainer._prefetched  # nothing read past the end
