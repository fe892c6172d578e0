"""Sharded checkpoints (torch.distributed.checkpoint): what a job saves when its model is sharded.

Every rank writes its own shards of the weights and of AdamW's state, with the trainer's state
(the data position is a pure function of it), the plan and rank 0's RNG state. DCP records where
every slice of every tensor lives, so a checkpoint saved at one world size loads at another:
saved by 4 ranks, it resumes on 2, or in one process with no process group at all.

Layout: `<checkpoints>/sharded/step-<N>/` (the files DCP writes, `.metadata` last). A save goes
first into a folder beside the checkpoints folder — SageMaker mirrors that folder to S3, and a
half-written step there would be uploaded — and is renamed in whole once every rank has written,
by one process per node (each node has its own checkpoints folder); older steps are then removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

SHARDED = "sharded"
FORMAT = 2
_STEP_PREFIX = "step-"


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _node_leader() -> bool:
    """One process per node: the one that renames and prunes that node's checkpoint folders."""
    return int(os.environ.get("LOCAL_RANK", dist.get_rank() if dist.is_initialized() else 0)) == 0


@contextlib.contextmanager
def _one_process_is_intended():
    """DCP warns each time it runs without a process group; here that is on purpose."""
    with warnings.catch_warnings():
        if not _distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def latest(checkpoint_dir: Path) -> Path | None:
    """The newest complete sharded checkpoint in checkpoint_dir, or None."""
    root = checkpoint_dir / SHARDED
    if not root.is_dir():
        return None
    complete = [p for p in root.iterdir() if p.name.startswith(_STEP_PREFIX) and (p / ".metadata").is_file()]
    return max(complete, key=lambda p: int(p.name[len(_STEP_PREFIX):]), default=None)


def move_whole(source: Path, target: Path) -> None:
    """Move the folder `source` to `target` so that `target` appears complete or not at all:
    a rename, or where the two lie on different file systems (EXDEV: /opt/ml/checkpoints is a
    mount of its own) a copy beside `target` under a hidden name, then a rename there."""
    try:
        os.rename(source, target)
        return
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
    hidden = target.parent / f".{target.name}.copying"
    shutil.rmtree(hidden, ignore_errors=True)
    shutil.copytree(source, hidden)
    os.rename(hidden, target)
    shutil.rmtree(source, ignore_errors=True)


def save(checkpoint_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> Path:
    """Write the state of every rank as step `step`; collective (every rank calls it)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {
        "meta": json.dumps({**meta, "format": FORMAT}),
        "model": model_state,
        "optimizer": optimizer_state,
        "rng": torch.get_rng_state(),
    }
    name = f"{_STEP_PREFIX}{step}"
    staging = checkpoint_dir.parent / f".{checkpoint_dir.name}.{SHARDED}.partial" / name
    target = checkpoint_dir / SHARDED / name
    if _node_leader():
        shutil.rmtree(staging, ignore_errors=True)  # a save that died half-way
    _barrier()
    with _one_process_is_intended():
        dcp.save(state, checkpoint_id=str(staging), no_dist=not _distributed())
    _barrier()  # every rank's files are in staging (.metadata is written after the last of them)
    if _node_leader():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        move_whole(staging, target)
        for older in target.parent.iterdir():
            if older != target and older.name.startswith(_STEP_PREFIX):
                shutil.rmtree(older, ignore_errors=True)
    _barrier()
    return target


def read_meta(path: Path) -> dict[str, Any]:
    """The trainer's part of a checkpoint (job, plan, state), without loading any tensor."""
    state: dict[str, Any] = {"meta": ""}
    with _one_process_is_intended():
        dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())
    return json.loads(state["meta"])


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Weights, optimizer state and RNG from `path` into this rank's model and optimizer, each
    resharded to how they are laid out now."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, "rng": torch.get_rng_state()}
    with _one_process_is_intended():
        dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    torch.set_rng_state(state["rng"])
