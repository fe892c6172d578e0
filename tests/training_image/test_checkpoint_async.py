"""Sharded checkpoints written in the background: what a save holds is the state when it began,
it is loaded only once renamed in whole, the newest KEEP steps stay, how often to save scales
with the model, and a stop that cannot write in the grace awaits the save in flight instead.
One process (DCP without a process group) and fp32 throughout."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from shared.pricing import LLAMA_SHAPES
from shared.shapes import SIZES, grown_config
from training_image import checkpoint
from training_image.model import Decoder
from training_image.train import Trainer, TrainingStopped, TrainPlan

PLAN = TrainPlan(turns=1, cycle_steps=[4, 4], lr=3e-3, seq_len=16, batch_size=4, seed=9)


def _windows() -> torch.Tensor:
    generator = torch.Generator().manual_seed(19)
    return torch.randint(0, SIZES["debug"].vocab_size, (16, PLAN.seq_len + 1), generator=generator)


def _trainer(checkpoint_dir, **kwargs) -> Trainer:
    trainer = Trainer(Decoder(SIZES["debug"]).init_weights(0), _windows(), None, PLAN, job_id="job-a",
                      checkpoint_dir=checkpoint_dir, log=None, autocast=False, **kwargs)
    trainer.sharded_checkpoints = True  # as after resuming a sharded run: DCP, here in one process
    return trainer


def test_a_background_save_holds_the_state_it_began_with_and_appears_only_when_finished(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.run(max_steps=2)
    trainer.save_checkpoint()
    assert checkpoint.latest(tmp_path).name == "step-2"
    trainer.run(max_steps=1)
    before = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    assert trainer.save_checkpoint(background=True)
    pending = trainer._pending_save
    with torch.no_grad():  # training goes on while the thread writes
        for parameter in trainer.model.parameters():
            parameter.add_(1.0)
    pending.written.result()  # the thread has written every file, .metadata included...
    assert (pending.staging / ".metadata").is_file() and not pending.target.exists()
    assert checkpoint.latest(tmp_path).name == "step-2"  # ...but it is not trusted before it is renamed in
    trainer.finish_checkpoint()
    assert checkpoint.latest(tmp_path).name == "step-3" and not pending.staging.exists()
    resumed = _trainer(tmp_path)
    assert resumed.resume() and resumed.state.step == 3
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_the_newest_steps_stay_and_older_ones_go(tmp_path):
    trainer = _trainer(tmp_path, checkpoint_every=1)
    trainer.run()
    assert sorted(p.name for p in (tmp_path / checkpoint.SHARDED).iterdir()) == ["step-7", "step-8"]
    assert checkpoint.KEEP == 2


def test_a_run_ends_with_its_last_save_written(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.run()  # the cycle ends save in the background; run() returns once the last is in
    assert trainer._pending_save is None and checkpoint.latest(tmp_path).name == f"step-{PLAN.total_steps}"


def test_a_stop_that_cannot_write_in_the_grace_awaits_the_save_in_flight(tmp_path, monkeypatch):
    # Writes as slow as 70B's on a node (263 GB at 1 GB/s): no save at SIGTERM.
    monkeypatch.setattr(checkpoint, "WRITE_BYTES_PER_S", 1.0)
    trainer = _trainer(tmp_path, progress_every=1)
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if trainer.state.step == 5:  # the first cycle's end (step 4) left a save in flight
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.log = log
    with pytest.raises(TrainingStopped, match="resumes from the last checkpoint"):
        with trainer.stop_on_sigterm():
            trainer.run()
    assert any("do not fit the stop grace" in line for line in lines)
    assert checkpoint.latest(tmp_path).name == "step-4" and trainer._pending_save is None
    resumed = _trainer(tmp_path)
    assert resumed.resume() and resumed.state.step == 4


def test_the_save_interval_and_the_stop_save_scale_with_the_model():
    small = checkpoint.bytes_per_node(grown_config(SIZES["small"]).parameters())
    llama_8b = checkpoint.bytes_per_node(grown_config(LLAMA_SHAPES["llama-8b"]).parameters(), 8, 8)
    llama_70b = checkpoint.bytes_per_node(grown_config(LLAMA_SHAPES["llama-70b"]).parameters(), 32, 8)
    # 12 bytes a parameter; 70B's 1.05 TB over 4 nodes.
    assert llama_70b == pytest.approx(12 * 87_666_794_496 / 4, rel=1e-9)
    assert checkpoint.interval_seconds(small) == checkpoint.MIN_INTERVAL_S
    assert checkpoint.interval_seconds(llama_8b) == pytest.approx(llama_8b / 1e9 / 0.05)  # 2346 s
    assert checkpoint.interval_seconds(llama_70b) == checkpoint.MAX_INTERVAL_S
    assert checkpoint.fits_stop_grace(small) and not checkpoint.fits_stop_grace(llama_8b)
    assert not checkpoint.fits_stop_grace(llama_70b)
    # Not sharded, rank 0 writes the whole.
    assert checkpoint.bytes_per_node(1000, 8, 8, sharded=False) == 12_000
