"""What a job needs from the machine it runs on: the /opt/ml root, the device, its rank, and
where its outputs go. Both job types (train and contract) use these, so they behave alike."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from shared.contracts import Metrics
from shared.shapes import batch_size_for, healing_batch_size
from training_image import tokens
from training_image.export import EXPORT_DIR, export_hf
from training_image.modeldir import METRICS, save_model_dir, shares_export_weights
from training_image.shards import SHARD_BYTES

FAILURE_LIMIT = 1024  # SageMaker keeps about this much of output/failure as FailureReason
# How long a rank waits in a collective for the others before failing the job (NCCL's default is
# 10 minutes). The longest legitimate wait is the other ranks' for rank 0 writing a checkpoint
# (about 12 bytes a parameter: 16 GB for the largest grown model, about 2 minutes on a gp3 volume).
COLLECTIVE_TIMEOUT = timedelta(minutes=5)
PREPARE_TIMEOUT = timedelta(hours=2)  # the ranks' wait for each other while tokenizing the dataset


def ml_root() -> Path:
    return Path(os.environ.get("FUSION_ML_ROOT", "/opt/ml"))


def init_distributed() -> int:
    if "LOCAL_RANK" not in os.environ or dist.is_initialized():
        return rank()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return dist.get_rank()


def local_share() -> tuple[int, int]:
    """(this process's index among the ranks of its host, their number)."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


_slow_group = None


def wait_for_all() -> None:
    """A barrier for work that takes long but evenly on every rank (tokenizing the dataset): on a
    gloo group of its own with PREPARE_TIMEOUT, not the collectives' COLLECTIVE_TIMEOUT."""
    global _slow_group
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    if _slow_group is None:
        _slow_group = dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)
    dist.barrier(group=_slow_group)


def prepare_tokens(root: Path, tokenizer, seq_len: int, channel: str = "training", *, hold_out: bool = True) -> tokens.TokenData:
    """A data channel as token shards in /opt/ml/tokens (the training channel) or
    /opt/ml/tokens-<channel>, tokenized there by this host's ranks together unless a run before
    did so already. hold_out: keep the automatic held-out split out of the training windows."""
    folder = root / ("tokens" if channel == "training" else f"tokens-{channel}")
    return tokens.prepare(
        tokenizer, root / "input/data" / channel, folder, seq_len, share=local_share(), wait=wait_for_all, hold_out=hold_out
    )


def has_channel(root: Path, channel: str) -> bool:
    return (root / "input/data" / channel).exists()


def device() -> torch.device:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if "OMP_NUM_THREADS" not in os.environ:
        # A CPU run shares its machine (the local stack, other jobs). Oversubscribed OpenMP threads
        # spin-wait on each other: measured here, two threads on two busy cores ran 10-20x slower
        # than one. Half the cores leaves room for the rest.
        torch.set_num_threads(max(1, torch.get_num_threads() // 2))
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def batch_size(parameters: int, seq_len: int, healing_windows: int | None = None) -> int:
    """Sequences of seq_len per optimizer step over all ranks: shapes.batch_size_for (for a
    contract job's healing on `healing_windows` windows, shapes.healing_batch_size), rounded up
    so that every rank takes an equal share."""
    if healing_windows is None:
        batch = batch_size_for(parameters, seq_len)
    else:
        batch = healing_batch_size(parameters, seq_len, healing_windows)
    world = dist.get_world_size() if dist.is_initialized() else 1
    return batch + (-batch) % world


def log(line: str) -> None:
    print(line, flush=True)


def write_outputs(root: Path, model, tokenizer, metrics: Metrics, shard_bytes: int = SHARD_BYTES) -> None:
    """The model directory in model/ with its transformers export in model/hf/, and metrics.json
    again in output/data/ (the events function reads it from model/, as SageMaker uploads it). The weights are safetensors shards of shard_bytes at most, written once:
    in hf/ alone where the export needs no padding (modeldir.shares_export_weights), the model
    directory reading them from there; a contracted model's compact weights beside its padded
    export."""
    document = metrics.model_dump(mode="json")
    export_hf(model, tokenizer, root / "model" / EXPORT_DIR, shard_bytes)
    own = not shares_export_weights(model.config)
    save_model_dir(root / "model", model, tokenizer, document, shard_bytes, weights=own)
    output = root / "output/data"
    output.mkdir(parents=True, exist_ok=True)
    (output / METRICS).write_text(json.dumps(document, indent=2))


def write_metrics(root: Path, metrics: Metrics) -> None:
    """metrics.json alone, for a job that makes no model: in model/ (which the events function
    reads, uploaded uncompressed) and in output/data/, as a model-making job writes it."""
    text = json.dumps(metrics.model_dump(mode="json"), indent=2)
    for folder in (root / "output/data", root / "model"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / METRICS).write_text(text)


def write_failure(root: Path, error: BaseException) -> None:
    """output/failure, SageMaker's FailureReason. Under DDP any rank writes it, naming itself, and
    the first to fail wins: the others' errors (a peer gone from a collective) follow from it."""
    text = f"{type(error).__name__}: {error}"
    failure = root / "output/failure"
    failure.parent.mkdir(parents=True, exist_ok=True)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        failure.write_text(text[:FAILURE_LIMIT])
        return
    text = f"rank {dist.get_rank()}: {text}"
    try:
        with open(failure, "x", encoding="utf-8") as file:
            file.write(text[:FAILURE_LIMIT])
    except FileExistsError:
        pass
