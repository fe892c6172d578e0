"""One local stack per test module: moto, the local SageMaker and the HTTP API on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from local.demo import build_dataset
from local.stack import LocalStack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with LocalStack(base_sizes=("debug",), runs_dir=tmp_path_factory.mktemp("runs"), stop_grace_seconds=10) as running:
        yield running


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("data") / "stdlib.jsonl", 150_000)
