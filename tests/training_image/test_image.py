"""The training image's Dockerfile agrees with the pins: its base image brings the torch of
requirements.lock, and the tooling that pins that base by digest (local/base_image.py, behind
make image-pin and make image-check) refuses a base that is not pinned or no longer matches."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from local import base_image
from local.base_image import PinError

ROOT = Path(__file__).resolve().parents[2]
DIGEST = "sha256:" + "ab" * 32
MOVED = "sha256:" + "cd" * 32


def test_the_base_image_brings_the_pinned_torch():
    dockerfile = (ROOT / "training_image/Dockerfile").read_text()
    repository, tag, digest = base_image.base(ROOT / "training_image/Dockerfile")
    [pin] = re.findall(r"^torch==(\S+)$", (ROOT / "requirements.lock").read_text(), flags=re.M)
    assert repository == "pytorch/pytorch"
    assert re.fullmatch(rf"{re.escape(pin)}-cuda\d+\.\d+-cudnn\d+-runtime", tag), (tag, pin)
    assert digest is None or re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    assert "efa_installer.sh" in dockerfile  # libfabric and aws-ofi-nccl for NCCL over EFA


def _registry(tags: dict[str, str]):
    """A stand-in for `docker buildx imagetools inspect`: the digest each reference resolves to."""
    asked: list[str] = []

    def run(argv: list[str]) -> str:
        reference = argv[3]
        asked.append(reference)
        if reference not in tags:
            raise subprocess.CalledProcessError(1, argv, stderr=f"{reference}: not found")
        return json.dumps({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": tags[reference]})

    run.asked = asked
    return run


@pytest.fixture
def dockerfile(tmp_path) -> Path:
    copy = tmp_path / "Dockerfile"
    shutil.copy(ROOT / "training_image/Dockerfile", copy)
    repository, tag, _ = base_image.base(copy)
    copy.write_text(base_image.BASE.sub(f"ARG BASE_IMAGE={repository}:{tag}", copy.read_text()))
    return copy


def test_pin_writes_the_tags_digest_into_the_dockerfile(dockerfile):
    repository, tag, _ = base_image.base(dockerfile)
    run = _registry({f"{repository}:{tag}": DIGEST, f"{repository}@{DIGEST}": DIGEST})
    assert base_image.pin(dockerfile, run) == f"{repository}:{tag}@{DIGEST}"
    assert base_image.base(dockerfile) == (repository, tag, DIGEST)
    assert f"ARG BASE_IMAGE={repository}:{tag}@{DIGEST}\n" in dockerfile.read_text()
    assert base_image.check(dockerfile, run) == f"{repository}:{tag}@{DIGEST}"


def test_check_refuses_a_base_without_a_digest_before_asking_the_registry(dockerfile):
    run = _registry({})
    with pytest.raises(PinError, match="not pinned by digest"):
        base_image.check(dockerfile, run)
    assert run.asked == []


def test_check_refuses_a_digest_the_registry_lost_and_a_tag_that_moved(dockerfile):
    repository, tag, _ = base_image.base(dockerfile)
    base_image.pin(dockerfile, _registry({f"{repository}:{tag}": DIGEST}))
    with pytest.raises(PinError, match="is not in the registry"):
        base_image.check(dockerfile, _registry({f"{repository}:{tag}": DIGEST}))
    with pytest.raises(PinError, match=f"now points at {MOVED}"):
        base_image.check(dockerfile, _registry({f"{repository}:{tag}": MOVED, f"{repository}@{DIGEST}": DIGEST}))
