"""One local stack per test module: moto, the local SageMaker and the HTTP API on loopback."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from local.stack import LocalStack


def stdlib_jsonl(path: Path, max_bytes: int) -> Path:
    """A small JSONL dataset of Python standard-library sources: text every machine has."""
    written = 0
    with path.open("w") as out:
        for source in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
            text = source.read_text(errors="replace")
            out.write(json.dumps({"text": text}) + "\n")
            written += len(text)
            if written >= max_bytes:
                break
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with LocalStack(base_sizes=("debug",), runs_dir=tmp_path_factory.mktemp("runs"), stop_grace_seconds=10) as running:
        yield running


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory) -> Path:
    return stdlib_jsonl(tmp_path_factory.mktemp("data") / "stdlib.jsonl", 150_000)
