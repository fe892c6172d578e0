"""Which precision a job computes in: the job's setting (shared.contracts.PRECISION_ENV: auto,
fp32 or bf16) against what the hardware multiplies natively. The trainer (autocast of a
replicated model) and training_image.parallel (FSDP's mixed-precision policy) both ask here."""

from __future__ import annotations

import os

import torch

from shared.contracts import PRECISION_ENV, PRECISIONS

# Overrides the CPU probe below: "1" as if the CPU had AVX512-BF16 or AMX, "0" as if it had
# neither. The test suite runs once each way, so both of "auto"'s outcomes are tested on any CPU.
CPU_BF16_ENV = "FUSION_CPU_BF16"


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), unless CPU_BF16_ENV says."""
    forced = os.environ.get(CPU_BF16_ENV)
    if forced is None or forced == "":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if forced not in ("0", "1"):
        raise ValueError(f"{CPU_BF16_ENV}={forced!r}: expected 0 or 1")
    return forced == "1"


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware multiplies it natively: CUDA GPUs that have it, and CPUs with
    AVX512-BF16 or AMX (where it trains faster than fp32 at the same held-out quality). None
    (fp32) elsewhere: a CPU without them emulates bf16 more slowly than it runs fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def precision_setting() -> str:
    """The job's PRECISION_ENV: auto (the default), fp32 or bf16."""
    value = os.environ.get(PRECISION_ENV) or "auto"
    if value not in PRECISIONS:
        raise ValueError(f"{PRECISION_ENV}={value!r}: expected one of {', '.join(PRECISIONS)}")
    return value


def computes_in_bf16(device: torch.device, setting: str | None = None) -> bool:
    """Whether a run on `device` computes its matmuls in bf16: what `setting` (default: the
    environment's PRECISION_ENV) forces, or under "auto" whether the hardware has bf16."""
    setting = setting or precision_setting()
    if setting == "auto":
        return autocast_dtype(device) is not None
    return setting == "bf16"
