"""Sharded checkpoints (torch.distributed.checkpoint): what a job saves when its model is sharded.

Every rank writes its own shards of the weights and of AdamW's state, with the trainer's state
(the data position is a pure function of it), the plan and rank 0's RNG state. DCP records where
every slice of every tensor lives, so a checkpoint saved at one world size loads at another:
saved by 4 ranks, it resumes on 2, or in one process with no process group at all.

Layout: `<checkpoints>/sharded/step-<N>/` (the files DCP writes, `.metadata` last). A save goes
first into a folder beside the checkpoints folder — SageMaker mirrors that folder to S3, and a
half-written step there would be uploaded — and is renamed in whole once every rank has written,
by one process per node (each node has its own checkpoints folder). Only a renamed step is ever
loaded: a save killed half-way (SIGKILL at the end of the stop grace) is never trusted.

A save may run in the background (`save(..., asynchronous=True)`, DCP's async_save): each rank
copies its shards to host memory, then training goes on while a thread writes them, with its
collectives on a gloo group of its own. `finish` (collective) waits for it, renames it in and
prunes: the newest KEEP steps stay. SageMaker mirrors deletions too ("If a checkpoint is deleted
in the SageMaker container, it will also be deleted in the S3 folder"), so pruning here is
pruning in S3.

How often to save scales with what a save writes (`interval_seconds`), and whether a stop
writes one at all with whether it can finish inside the stop grace (`fits_stop_grace`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

SHARDED = "sharded"
FORMAT = 2
_STEP_PREFIX = "step-"
KEEP = 2  # complete steps kept: the newest, and one before it should the newest be unreadable
# What a checkpoint holds a parameter: its fp32 weight and AdamW's two fp32 moments.
BYTES_PER_PARAMETER = 12
# The rate one node writes a checkpoint at: an assumption (the ML storage volume, gp3 at its
# 1 GB/s ceiling, or instance NVMe, at least that), not a measurement.
WRITE_BYTES_PER_S = 1e9
MIN_INTERVAL_S = 600.0  # no more often than every 10 minutes, however small the model
MAX_INTERVAL_S = 3600.0  # at most an hour of training lost to an interruption
# A save in the background still costs its copy to host memory and contends for the host and
# the disk: at most this share of the time between saves.
SAVE_SHARE = 0.05
# What a save at a stop may take of the stop grace: the step in progress, the wait for a save
# in flight and the exit need the rest.
STOP_SAVE_SHARE = 0.5
# The background writer's collectives wait this long for the slowest rank's write.
WRITER_TIMEOUT = timedelta(minutes=30)


def bytes_per_node(parameters: int, world_size: int = 1, local_world_size: int = 1, sharded: bool = True) -> int:
    """Bytes one node writes for a checkpoint: its ranks' shards when sharded, else the whole
    (rank 0 writes it)."""
    total = parameters * BYTES_PER_PARAMETER
    return -(-total * local_world_size // world_size) if sharded else total


def interval_seconds(bytes_per_node: int) -> float:
    """Seconds between periodic saves: long enough that writing one takes at most SAVE_SHARE of
    the time, within [MIN_INTERVAL_S, MAX_INTERVAL_S]."""
    write = bytes_per_node / WRITE_BYTES_PER_S
    return min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, write / SAVE_SHARE))


def fits_stop_grace(bytes_per_node: int) -> bool:
    """Whether a save started at SIGTERM finishes inside STOP_SAVE_SHARE of the stop grace. A
    larger model does not start one: it resumes from its last periodic save (the one in flight
    is awaited, and trusted only if it finishes)."""
    from training_image.stopping import GRACE_SECONDS

    return bytes_per_node / WRITE_BYTES_PER_S <= GRACE_SECONDS * STOP_SAVE_SHARE


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


@dataclass
class Pending:
    """A save whose files a background thread is still writing into `staging`."""

    step: int
    staging: Path
    target: Path
    written: Future


_writer_group = None


def _writer() -> Any:
    """The process group the background writes' collectives run on: gloo (DCP's async save needs
    a CPU backend), and its own, so that they never interleave with the training's."""
    global _writer_group
    if _writer_group is None:
        _writer_group = dist.new_group(backend="gloo", timeout=WRITER_TIMEOUT)
    return _writer_group


def save(
    checkpoint_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict,
    *, asynchronous: bool = False,
) -> Path | Pending:
    """Write the state of every rank as step `step`; collective (every rank calls it). With
    `asynchronous`, return once this rank's shards are copied to host memory, the writing left
    to a thread: `finish` the Pending before the next save and before the process ends."""
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
        if asynchronous:
            written = dcp.async_save(state, checkpoint_id=str(staging), no_dist=not _distributed(),
                                     process_group=_writer() if _distributed() else None)
            return Pending(step, staging, target, written)
        dcp.save(state, checkpoint_id=str(staging), no_dist=not _distributed())
    _publish(staging, target)
    return target


def finish(pending: Pending) -> Path:
    """Wait for a background save on every rank, then rename it in and prune; collective."""
    with _one_process_is_intended():
        pending.written.result()
    _publish(pending.staging, pending.target)
    return pending.target


def _publish(staging: Path, target: Path) -> None:
    _barrier()  # every rank's files are in staging (.metadata is written after the last of them)
    if _node_leader():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        move_whole(staging, target)
        prune(target.parent)
    _barrier()


def prune(root: Path, keep: int = KEEP) -> None:
    """Remove all but the newest `keep` steps in `root` (the newest by step number)."""
    steps = sorted((p for p in root.iterdir() if p.name.startswith(_STEP_PREFIX)),
                   key=lambda p: int(p.name[len(_STEP_PREFIX):]), reverse=True)
    for older in steps[keep:]:
        shutil.rmtree(older, ignore_errors=True)


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
