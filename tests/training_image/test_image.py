"""The training image's Dockerfile agrees with the pins: its base image brings the torch of requirements.lock."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_base_image_brings_the_pinned_torch():
    dockerfile = (ROOT / "training_image/Dockerfile").read_text()
    [base] = re.findall(r"^ARG BASE_IMAGE=pytorch/pytorch:(\S+)$", dockerfile, flags=re.M)
    [pin] = re.findall(r"^torch==(\S+)$", (ROOT / "requirements.lock").read_text(), flags=re.M)
    assert re.fullmatch(rf"{re.escape(pin)}-cuda\d+\.\d+-cudnn\d+-runtime", base), (base, pin)
    assert "efa_installer.sh" in dockerfile  # libfabric and aws-ofi-nccl for NCCL over EFA
