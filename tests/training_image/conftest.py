"""Tiny models and a corpus built from the Python standard library (nothing is downloaded)."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import pytest
import torch

from shared.shapes import SIZES, ModelConfig
from training_image.data import stdlib_corpus, token_windows
from training_image.model import Decoder
from training_image.modeldir import save_model_dir
from training_image.tokenizer import train_tokenizer

SEQ_LEN = 32

# The suite runs as two pytest workers on two cores: one thread each avoids oversubscription,
# which slows small matmuls several times over.
torch.set_num_threads(1)


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
