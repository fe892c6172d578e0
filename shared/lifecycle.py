"""A job's id and its statuses: which exist, the order a job moves through them, which are live
and which end it (docs/architecture.md §6). The stores and every step of the lifecycle read them here.
"""

from __future__ import annotations

import os
import re
from typing import Any

# Every id new_job_id makes, and no more: a training job is named "fusion-<job id>" within
# SageMaker's 63 characters, and the container refuses a job id the service could not have made.
JOB_ID_PATTERN = re.compile(r"[a-z0-9-]{1,40}")
NO_CHARGE = "0.00"


# A transition may only move to a higher rank; the three end states share the top rank so none of
# them can replace another.
STATUS_RANK = {"queued": 0, "launching": 1, "running": 2, "cancelling": 3, "completed": 4, "failed": 4, "cancelled": 4}
ACTIVE_STATUSES = ("launching", "running", "cancelling")
END_STATUSES = ("completed", "failed", "cancelled")
UNLAUNCHED_STATUSES = ("queued", "launching")  # the launcher starts a training job for these only
STOPPABLE_STATUSES = ("launching", "running")  # a cancel moves these to cancelling and stops the training job


# A tuning is a job of the jobs table too (budget, lifecycle, launch queue), told apart by its id:
# no job id new_job_id makes starts with it. Its SageMaker tuning job is named like a training job
# ("fusion-" + id), within the tuner's 32 characters.
TUNING_ID_PREFIX = "tune-"


def new_job_id() -> str:
    return os.urandom(10).hex()


def new_tuning_id() -> str:
    return TUNING_ID_PREFIX + os.urandom(8).hex()


def is_tuning(job_id: str) -> bool:
    return job_id.startswith(TUNING_ID_PREFIX)


def is_active(job: dict[str, Any]) -> bool:
    return job["status"] in ACTIVE_STATUSES
