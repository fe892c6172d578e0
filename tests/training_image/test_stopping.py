"""SIGTERM at every phase of a step, in one process and in two gloo ranks: the run stops after at
most one more step with a complete checkpoint, and resuming from it ends with the weights of an
uninterrupted run. Outside the training loop (model load, growth, the final write) SIGTERM ends
the job at once. Each signal is landed by a hook at a known point, not by timing."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shared.shapes import SIZES
from training_image import entry, jobs, runtime, stopping, tokens
from training_image.evaluate import heldout_loss
from training_image.model import Decoder
from training_image.train import CHECKPOINT, METRICS_LOG, Trainer, TrainingStopped, TrainPlan

from .conftest import free_port, gloo_group, write_hyperparameters

PLAN = TrainPlan(turns=1, cycle_steps=[3, 2], lr=3e-3, seq_len=32, batch_size=4, seed=2)
SIGNAL_STEP = 2  # SIGTERM lands during this step (1-based)
# The step a run stops after, by where in step SIGNAL_STEP the signal lands. In one process the
# flag is read after the step. Ranks stop on the flag they exchanged, which is sampled just
# before the exchange: a signal after that point is carried by the next step's exchange.
PHASES = {
    "data": (SIGNAL_STEP, SIGNAL_STEP + 1),  # the next step's batch, read ahead after the exchange
    "forward": (SIGNAL_STEP, SIGNAL_STEP),
    "backward": (SIGNAL_STEP, SIGNAL_STEP),
    "all-reduce": (SIGNAL_STEP, SIGNAL_STEP + 1),
    "optimizer": (SIGNAL_STEP, SIGNAL_STEP + 1),
    "between steps": (SIGNAL_STEP, SIGNAL_STEP + 1),
}


@pytest.fixture(autouse=True)
def _keep_sigterm():
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def _terminate_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _arm(trainer: Trainer, phase: str, at_step: int) -> None:
    """Send this process SIGTERM once, at `phase` of step at_step (1-based)."""
    sent = []

    def fire() -> None:
        # The progress line comes after the step is counted; every other phase, before.
        if trainer.state.step == at_step - (phase != "between steps") and not sent:
            sent.append(True)
            _terminate_self()

    model = trainer.model
    if phase == "data":
        batch_indices = trainer.batch_indices
        trainer.batch_indices = lambda *args: (fire(), batch_indices(*args))[1]
    elif phase == "forward":
        model.blocks["1"].register_forward_pre_hook(lambda module, args: fire())
    elif phase == "backward":
        model.blocks["1"].mlp.up_proj.weight.register_hook(lambda grad: fire())
    elif phase == "all-reduce":
        exchange = trainer._exchange

        def exchange_then_fire(shared):
            exchange(shared)  # the flag is in the reduced tensor already: the signal comes after
            fire()

        trainer._exchange = exchange_then_fire
    elif phase == "optimizer":
        trainer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: fire())
    elif phase == "between steps":
        trainer.log = lambda line: fire()  # the step's last act: its progress line
    else:
        raise ValueError(phase)


def _trainer(windows: torch.Tensor, checkpoint_dir=None) -> Trainer:
    model = Decoder(SIZES["debug"]).init_weights(0)
    return Trainer(model, windows, None, PLAN, job_id="job-s", checkpoint_dir=checkpoint_dir, progress_every=1, log=None)


def _stop_then_resume(windows: torch.Tensor, phase: str, checkpoint_dir) -> tuple[int, Trainer]:
    """(the step of the stop's checkpoint, the trainer resumed from it and run to the end)."""
    stopped = _trainer(windows, checkpoint_dir)
    _arm(stopped, phase, SIGNAL_STEP)
    with pytest.raises(TrainingStopped):
        with stopped.stop_on_sigterm():
            stopped.run()
    step = torch.load(checkpoint_dir / CHECKPOINT, weights_only=False)["state"]["step"]
    resumed = _trainer(windows, checkpoint_dir)
    assert resumed.resume()
    resumed.run()
    return step, resumed


@pytest.fixture(scope="module")
def reference(windows) -> dict:
    trainer = _trainer(windows[0][:32])
    trainer.run()
    return trainer.model.state_dict()


@pytest.mark.parametrize("phase", PHASES)
def test_sigterm_in_one_process_stops_after_that_step_and_resumes_exactly(phase, windows, reference, tmp_path):
    step, resumed = _stop_then_resume(windows[0][:32], phase, tmp_path)
    assert step == PHASES[phase][0]
    for name, value in reference.items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    # The partial file is written beside the mirrored folder, never inside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT, METRICS_LOG, "progress.json"])


def test_checkpoints_are_written_beside_the_mirrored_folder(windows, tmp_path, monkeypatch):
    written = []
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, file: (written.append(file.name), save(obj, file)))
    folder = tmp_path / "checkpoints"
    _trainer(windows[0][:32], folder).save_checkpoint()
    [path] = written
    assert not path.startswith(str(folder) + os.sep) and os.path.dirname(path).startswith(str(tmp_path))
    assert torch.load(folder / CHECKPOINT, weights_only=False)["job_id"] == "job-s"


def _ddp_worker(rank: int, port: int, windows: torch.Tensor, root: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, 2, port):
        reference = _trainer(windows)
        reference.run()
        # The held-out loss shared out over the ranks (7 windows: 4 and 3) is that of the whole set.
        heldout = {"shared": heldout_loss(reference.model, windows[:7], across_ranks=True),
                   "whole": heldout_loss(reference.model, windows[:7])}
        results = {}
        for number, phase in enumerate(PHASES):
            signalled = number % 2  # either rank: the other learns of the stop through the exchange
            step, resumed = _stop_then_resume_ddp(windows, phase, Path(root) / str(number), rank == signalled)
            same = all(torch.equal(resumed.model.state_dict()[n], v) for n, v in reference.model.state_dict().items())
            results[phase] = (step, same)
            dist.barrier()
        if rank == 0:
            torch.save({"phases": results, "heldout": heldout}, os.path.join(root, "results.pt"))


def _stop_then_resume_ddp(windows, phase, directory, signalled: bool) -> tuple[int, Trainer]:
    stopped = _trainer(windows, directory)
    if signalled:
        _arm(stopped, phase, SIGNAL_STEP)
    try:
        with stopped.stop_on_sigterm():
            stopped.run()
    except TrainingStopped:
        pass
    else:
        raise AssertionError(f"{phase}: rank {dist.get_rank()} ran to the end")
    dist.barrier()  # rank 0 has written the checkpoint
    step = torch.load(directory / CHECKPOINT, weights_only=False)["state"]["step"]
    assert stopped.state.step == step, phase  # every rank stopped after the step rank 0 saved
    resumed = _trainer(windows, directory)
    assert resumed.resume()
    resumed.run()
    return step, resumed


@pytest.mark.slow
def test_sigterm_in_either_of_two_ranks_stops_both_after_the_same_step_and_resumes_exactly(windows, tmp_path):
    mp.spawn(_ddp_worker, args=(free_port(), windows[0][:32], str(tmp_path)), nprocs=2, join=True)
    saved = torch.load(tmp_path / "results.pt", weights_only=False)
    results = saved["phases"]
    assert {phase: step for phase, (step, _) in results.items()} == {p: ranks for p, (_, ranks) in PHASES.items()}
    assert all(same for _, same in results.values()), results
    assert saved["heldout"]["shared"] == pytest.approx(saved["heldout"]["whole"], rel=1e-6)


# ---- outside the training loop: the entry point ----------------------------------------------

TRAIN = dict(job_type="train", job_id="job-t", turns="1", cycles="2", steps_per_cycle="2", seq_len="32", lr="0.003")


def _signal_after(function):
    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        _terminate_self()
        return result

    return wrapped


@pytest.mark.parametrize("where", ["load_model_dir", "tokenize", "grow", "write_outputs"])
def test_sigterm_outside_the_loop_ends_the_job_at_once_and_a_rerun_completes(where, ml_root, monkeypatch):
    write_hyperparameters(ml_root, **TRAIN)
    monkeypatch.setenv("FUSION_ML_ROOT", str(ml_root))
    # Each lands after a piece of the work: the model loaded, the first tokenizing task written,
    # the model grown, the weights of the final model written (in its export, hf/; the model
    # directory beside it not yet).
    module, name = {
        "load_model_dir": (jobs, "load_model_dir"),
        "tokenize": (tokens, "tokenize_task"),
        "grow": (jobs, "grow"),
        "write_outputs": (runtime, "export_hf"),
    }[where]
    with monkeypatch.context() as patch:
        patch.setattr(module, name, _signal_after(getattr(module, name)))
        assert entry.main() == entry.EXIT_STOPPED
    assert not (ml_root / "output/failure").exists() and not (ml_root / "model/config.json").exists()
    trained = (ml_root / "checkpoints" / CHECKPOINT).exists()
    assert trained == (where == "write_outputs")  # before training nothing ran on to a checkpoint
    if trained:
        assert torch.load(ml_root / "checkpoints" / CHECKPOINT, weights_only=False)["state"]["step"] == 4
    assert entry.main() == 0
    assert (ml_root / "model/config.json").exists()


def test_sigterm_received_is_forgotten_by_the_next_install():
    stopping.install()
    with pytest.raises(TrainingStopped):
        _terminate_self()
    assert stopping.requested()
    stopping.install()
    assert not stopping.requested()
