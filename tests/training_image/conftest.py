"""Tiny models and a corpus built from the Python standard library (nothing is downloaded)."""

from __future__ import annotations

import faulthandler
import json
import os
import random
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from shared.shapes import SIZES, ModelConfig
from training_image import parallel
from training_image.data import stdlib_corpus, token_windows
from training_image.model import Decoder
from training_image.modeldir import save_model_dir
from training_image.tokenizer import train_tokenizer

SEQ_LEN = 32

# The suite runs as two pytest workers on two cores: one thread each avoids oversubscription,
# which slows small matmuls several times over.
torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """Models this small run fastest on one thread, most of all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return stdlib_corpus(300_000)


@pytest.fixture(scope="session")
def tokenizer(corpus):
    return train_tokenizer(corpus, SIZES["debug"].vocab_size)


@pytest.fixture(scope="session")
def windows(tokenizer, corpus) -> tuple[torch.Tensor, torch.Tensor]:
    return token_windows(tokenizer, corpus, SEQ_LEN)


@pytest.fixture
def debug_model() -> Decoder:
    return Decoder(SIZES["debug"]).init_weights(0)


@pytest.fixture
def ml_root(tmp_path, tokenizer, corpus) -> Path:
    """An /opt/ml tree: the debug base model in the model channel, stdlib text in training."""
    root = tmp_path / "ml"
    save_model_dir(root / "input/data/model", Decoder(SIZES["debug"]).init_weights(0), tokenizer)
    data = root / "input/data/training/nested"
    data.mkdir(parents=True)
    lines = [json.dumps({"text": text}) for text in corpus[: len(corpus) // 2]]
    (data / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    (root / "input/data/training/extra.txt").write_text("\n".join(corpus[len(corpus) // 2 :]))
    return root


def write_hyperparameters(root: Path, **values: str) -> None:
    config = root / "input/config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(json.dumps(values))


def small_config(**changes) -> ModelConfig:
    return SIZES["debug"].model_copy(update=changes)


def free_port() -> int:
    """A loopback port nothing listens on, for the rendezvous of spawned gloo ranks.

    Taken below the kernel's ephemeral range (where bind to port 0 would pick): gloo ranks of a
    test running beside this one open many outgoing connections there, and one of them could
    take the port between this check and the rendezvous."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.Random().sample(range(low // 2, low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


# What two bf16 runs of the same training that differ only in how their sums are split (over
# ranks, over micro-batches, or sharded) keep, at these tests' tiny sizes: each step's loss within
# BF16_LOSS_REL, and each tensor's update (final minus initial weights) within BF16_UPDATE_REL of
# its norm. Measured on the debug model, 6 steps at lr 3e-3: losses within 8e-5, updates within
# 3% (DDP), 3% (accumulation) and 8% (FSDP, which also rounds its gathered weights); a bf16 run
# against the fp32 one is 7% off, and the same training on other data 7e-3 and 156%.
BF16_LOSS_REL = 5e-4
BF16_UPDATE_REL = 0.2


def assert_bf16_close(losses, state, expected_losses, expected_state, initial_state) -> None:
    assert losses == pytest.approx(expected_losses, rel=BF16_LOSS_REL)
    for name, value in expected_state.items():
        update = (value - initial_state[name]).norm()
        off = (state[name] - value).norm()
        assert off <= BF16_UPDATE_REL * update, f"{name}: {off:.3g} off an update of {update:.3g}"


@contextmanager
def gloo_group(rank: int, world_size: int, port: int):
    """A spawned rank's work in the test's gloo group on loopback (`port` from free_port).

    After a body that completed, the rank leaves as a job does (parallel.leave: every rank waits
    for the others, then the group is torn down) and the process ends there, at once: what it
    had to say is written, and the interpreter's teardown of gloo's threads, which is not under
    test, was seen to abort a rank ('terminate called without an active exception') in loaded
    runs. After a failure the group is torn down at once and the exception goes to
    torch.multiprocessing, which reports it. A rank that dies of a signal prints its Python
    stacks (faulthandler)."""
    faulthandler.enable()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    completed = False
    try:
        yield
        completed = True
    finally:
        parallel.leave(completed)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
