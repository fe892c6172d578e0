"""Failing loudly under DDP: whichever rank fails, its error is the job's failure text and every
rank ends soon after, instead of waiting in a collective for a peer that is gone; a rank that dies
without a word (SIGKILL) still leaves a failure text, written by the entry point above torchrun."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from training_image import entry, jobs, runtime, stopping
from training_image.train import Trainer

from .conftest import free_port, write_hyperparameters

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


def _rank(rank: int, port: int, root: str, failing: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", FUSION_ML_ROOT=root,
    )
    torch.set_num_threads(1)
    runtime.COLLECTIVE_TIMEOUT = timedelta(seconds=30)  # a bound on the wait, should the peer's exit go unseen
    if rank == failing:
        step = Trainer._step

        def out_of_memory(self, cycle_len):
            if self.state.step == 2:
                raise torch.OutOfMemoryError(OOM)
            return step(self, cycle_len)

        Trainer._step = out_of_memory
    stopping.install()
    started = time.monotonic()
    code = jobs.run(Path(root))
    Path(root, f"rank-{rank}.json").write_text(json.dumps({"code": code, "seconds": time.monotonic() - started}))


@pytest.mark.slow
def test_an_error_in_rank_1_is_the_failure_reason_and_both_ranks_end(ml_root):
    write_hyperparameters(ml_root, job_type="train", job_id="job-f", turns="1", cycles="1", steps_per_cycle="6",
                          seq_len="32", lr="0.003")
    mp.spawn(_rank, args=(free_port(), str(ml_root), 1), nprocs=2, join=True)
    assert (ml_root / "output/failure").read_text() == f"rank 1: OutOfMemoryError: {OOM}"
    for rank in (0, 1):
        result = json.loads((ml_root / f"rank-{rank}.json").read_text())
        assert result["code"] == 1 and result["seconds"] < 30, (rank, result)
    assert not (ml_root / "model/config.json").exists()


# ---- the entry point as torchrun's parent -------------------------------------------------------


@pytest.fixture
def _keep_sigterm():
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_rank_killed_without_a_word_still_leaves_a_failure_reason(tmp_path, _keep_sigterm):
    code = entry.supervise(_python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"), tmp_path)
    assert code == -signal.SIGKILL
    failure = (tmp_path / "output/failure").read_text()
    assert failure.startswith("RankDied: a training process ended without reporting an error") and "signal 9" in failure


def test_a_failure_a_rank_reported_is_kept(tmp_path, _keep_sigterm):
    (tmp_path / "output").mkdir()
    (tmp_path / "output/failure").write_text("rank 3: OutOfMemoryError: ...")
    assert entry.supervise(_python("raise SystemExit(1)"), tmp_path) == 1
    assert (tmp_path / "output/failure").read_text() == "rank 3: OutOfMemoryError: ..."


def test_sigterm_is_passed_on_to_torchrun_and_is_no_failure(tmp_path, _keep_sigterm):
    # The child asks its parent to stop, then exits only when the parent passes SIGTERM back.
    child = _python(
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
        "os.kill(os.getppid(), signal.SIGTERM)\n"
        "time.sleep(60)\n"
        "sys.exit(1)"
    )
    started = time.monotonic()
    assert entry.supervise(child, tmp_path) == entry.EXIT_STOPPED
    assert time.monotonic() - started < 30 and not (tmp_path / "output/failure").exists()
