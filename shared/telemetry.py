"""What the service counts, as CloudWatch metrics in the embedded metric format (Powertools Metrics).

The namespace is POWERTOOLS_METRICS_NAMESPACE and the service dimension POWERTOOLS_SERVICE_NAME,
both from the template's Globals. Counts that need no dimension of their own go to `metrics`,
which each function's handler flushes once per invocation (@metrics.log_metrics); a job's end is
published at once as its own record, with the status as a dimension:

- JobsCreated: a job accepted (stored, its estimate committed, queued for launch).
- JobsRefused: a request to create a job that was refused before anything was stored (not in
  the caller's catalog, invalid against it, does not fit, over budget, a pipeline's invalid request).
- JobsLaunched: a training job started for a job.
- LaunchRetries: a launch deferred by a transient limit, its message to be delivered again.
- JobsEnded and DollarsBilled, by status (completed, failed, cancelled): each job once, as its
  final state is written, with its bill in USD.
"""

from __future__ import annotations

import warnings
from decimal import Decimal
from typing import Any

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit

metrics = Metrics()

# Most invocations (a GET, an event that changes nothing) count nothing: that is no fault to warn of.
warnings.filterwarnings("ignore", message="No application metrics to publish", category=UserWarning)


def job_created() -> None:
    metrics.add_metric(name="JobsCreated", unit=MetricUnit.Count, value=1)


def job_refused() -> None:
    metrics.add_metric(name="JobsRefused", unit=MetricUnit.Count, value=1)


def job_launched() -> None:
    metrics.add_metric(name="JobsLaunched", unit=MetricUnit.Count, value=1)


def launch_retried() -> None:
    metrics.add_metric(name="LaunchRetries", unit=MetricUnit.Count, value=1)


def job_ended(job: dict[str, Any]) -> None:
    """Count a job that has just been written in its end state, and what it was billed."""
    ended = EphemeralMetrics()
    ended.add_dimension(name="status", value=job["status"])
    ended.add_metric(name="JobsEnded", unit=MetricUnit.Count, value=1)
    ended.add_metric(name="DollarsBilled", unit=MetricUnit.NoUnit, value=float(Decimal(job.get("bill") or 0)))
    ended.flush_metrics()
