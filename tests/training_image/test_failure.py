"""Failing loudly under DDP: whichever rank fails, its error is the job's failure text and every
rank ends soon after, instead of waiting in a collective for a peer that is gone."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

from training_image import entry, runtime, stopping
from training_image.train import Trainer

from .conftest import write_hyperparameters

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
    code = entry._run(Path(root))
    Path(root, f"rank-{rank}.json").write_text(json.dumps({"code": code, "seconds": time.monotonic() - started}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_an_error_in_rank_1_is_the_failure_reason_and_both_ranks_end(ml_root):
    write_hyperparameters(ml_root, job_type="train", job_id="job-f", turns="1", cycles="1", steps_per_cycle="6",
                          seq_len="32", lr="0.003")
    mp.spawn(_rank, args=(_free_port(), str(ml_root), 1), nprocs=2, join=True)
    assert (ml_root / "output/failure").read_text() == f"rank 1: OutOfMemoryError: {OOM}"
    for rank in (0, 1):
        result = json.loads((ml_root / f"rank-{rank}.json").read_text())
        assert result["code"] == 1 and result["seconds"] < 30, (rank, result)
    assert not (ml_root / "model/config.json").exists()
