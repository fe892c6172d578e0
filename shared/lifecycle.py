"""A job's id and its statuses: which exist, the order a job moves through them, which are live
and which end it (docs/architecture.md §6). The stores and every step of the lifecycle read them here.
"""

from __future__ import annotations

import os
import re
from typing import Any

JOB_ID_PATTERN = re.compile(r"[a-z0-9-]{1,40}")
NO_CHARGE = "0.00"


# A transition may only move to a higher rank; the three end states share the top rank so none of
# them can replace another.
STATUS_RANK = {"queued": 0, "launching": 1, "running": 2, "cancelling": 3, "completed": 4, "failed": 4, "cancelled": 4}
ACTIVE_STATUSES = ("launching", "running", "cancelling")
END_STATUSES = ("completed", "failed", "cancelled")


def new_job_id() -> str:
    return os.urandom(10).hex()


def is_active(job: dict[str, Any]) -> bool:
    return job["status"] in ACTIVE_STATUSES
