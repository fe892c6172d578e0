"""SageMaker's hyperparameter tuning API on the local SageMaker: each trial is one of its training jobs.

CreateHyperParameterTuningJob starts a runner that draws the trials' values from the ranges (a
Latin hypercube: each range cut into max-trials strata, one draw from each, the strata shuffled per
range, on a log scale where the range says Logarithmic), runs them MaxParallelTrainingJobs at a time
as training jobs named `<tuning job>-<NNN>-<8 hex>` (as the tuner names them), and reads the
objective from each trial's log with the metric definitions. With TrainingJobEarlyStoppingType
Auto it stops a trial whose running average of the objective at its k-th report is worse than the
median of the earlier trials' running averages at their k-th (SageMaker's rule for early stopping;
here with at least two earlier trials to compare with). The tuning's state changes go to `deliver`
as "SageMaker HyperParameter Tuning Job State Change" events.
"""

from __future__ import annotations

import math
import random
import re
import statistics
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from local.aws import LOCAL_ACCOUNT, ApiError

# The service whose tuner this is: local.sagemaker.LocalSageMaker, which calls in here (so this
# module names it only in words, and imports run one way).
Service = Any

NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,31}$")
POLL_SECONDS = 0.2
MIN_EARLIER_TRIALS = 2  # early stopping compares with the median of at least this many trials
STATE_CHANGE = "SageMaker HyperParameter Tuning Job State Change"
END_STATES = ("Completed", "Failed", "Stopped")


def _epoch(moment: datetime | None) -> float | None:
    return moment.timestamp() if moment else None


class TuningJob:
    """One tuning job: its request, its status and the names of its trials."""

    def __init__(self, request: dict[str, Any], region: str):
        self.request = request
        self.name: str = request["HyperParameterTuningJobName"]
        self.arn = f"arn:aws:sagemaker:{region}:{LOCAL_ACCOUNT}:hyper-parameter-tuning-job/{self.name.lower()}"
        self.status = "InProgress"
        self.failure_reason: str | None = None
        self.created = self.modified = datetime.now(timezone.utc)
        self.ended: datetime | None = None
        self.trials: list[str] = []
        self.tuned: dict[str, dict[str, str]] = {}
        self.early_stopped: set[str] = set()
        self.stop_requested = threading.Event()
        self.thread: threading.Thread | None = None

    @property
    def config(self) -> dict[str, Any]:
        return self.request["HyperParameterTuningJobConfig"]

    @property
    def objective(self) -> str:
        return self.config["HyperParameterTuningJobObjective"]["MetricName"]

    @property
    def minimize(self) -> bool:
        return self.config["HyperParameterTuningJobObjective"]["Type"] == "Minimize"


def create(service: Service, request: dict[str, Any]) -> dict[str, Any]:
    for required in ("HyperParameterTuningJobName", "HyperParameterTuningJobConfig", "TrainingJobDefinition"):
        if required not in request:
            raise ApiError("ValidationException", f"1 validation error detected: Value null at '{required}' "
                           "failed to satisfy constraint: Member must not be null")
    name = request["HyperParameterTuningJobName"]
    if not NAME_PATTERN.match(name):
        raise ApiError("ValidationException", f"Value '{name}' at 'hyperParameterTuningJobName' failed to satisfy "
                       f"constraint: Member must satisfy regular expression pattern: {NAME_PATTERN.pattern}")
    config = request["HyperParameterTuningJobConfig"]
    limits = config.get("ResourceLimits", {})
    if "MaxParallelTrainingJobs" not in limits:
        raise ApiError("ValidationException", "ResourceLimits.MaxParallelTrainingJobs must not be null")
    if not any(config.get("ParameterRanges", {}).get(kind) for kind in
               ("ContinuousParameterRanges", "IntegerParameterRanges", "CategoricalParameterRanges")):
        raise ApiError("ValidationException", "The tuning job must have at least one hyperparameter range")
    with service.lock:
        if name in service.tunings:
            raise ApiError("ResourceInUse", f"Hyperparameter tuning job {name} already exists")
        tuning = TuningJob(request, service.region)
        service.tunings[name] = tuning
    tuning.thread = threading.Thread(target=_run, args=(service, tuning), name=f"tuner-{name}", daemon=True)
    tuning.thread.start()
    return {"HyperParameterTuningJobArn": tuning.arn}


def _tuning(service: Service, name: str) -> TuningJob:
    with service.lock:
        tuning = service.tunings.get(name)
    if tuning is None:
        raise ApiError("ResourceNotFound", f"Amazon SageMaker can't find a tuning job with name {name}")
    return tuning


def describe(service: Service, request: dict[str, Any]) -> dict[str, Any]:
    tuning = _tuning(service, request.get("HyperParameterTuningJobName", ""))
    summaries = _summaries(service, tuning)
    counters = {"Completed": 0, "InProgress": 0, "RetryableError": 0, "NonRetryableError": 0, "Stopped": 0}
    objectives = {"Succeeded": 0, "Pending": 0, "Failed": 0}
    for s in summaries:
        status = s["TrainingJobStatus"]
        counters["NonRetryableError" if status == "Failed" else "Stopped" if status == "Stopping" else status] += 1
        objectives[s["ObjectiveStatus"]] += 1
    out = {
        "HyperParameterTuningJobName": tuning.name,
        "HyperParameterTuningJobArn": tuning.arn,
        "HyperParameterTuningJobConfig": tuning.config,
        "TrainingJobDefinition": tuning.request["TrainingJobDefinition"],
        "HyperParameterTuningJobStatus": tuning.status,
        "CreationTime": _epoch(tuning.created),
        "LastModifiedTime": _epoch(tuning.modified),
        "TrainingJobStatusCounters": counters,
        "ObjectiveStatusCounters": objectives,
    }
    scored = [s for s in summaries if "FinalHyperParameterTuningJobObjectiveMetric" in s and s["TrainingJobStatus"] == "Completed"]
    if scored:
        sign = 1 if tuning.minimize else -1
        out["BestTrainingJob"] = min(scored, key=lambda s: sign * s["FinalHyperParameterTuningJobObjectiveMetric"]["Value"])
    if tuning.ended:
        out["HyperParameterTuningEndTime"] = _epoch(tuning.ended)
    if tuning.failure_reason:
        out["FailureReason"] = tuning.failure_reason
    return out


def list_trials(service: Service, request: dict[str, Any]) -> dict[str, Any]:
    tuning = _tuning(service, request.get("HyperParameterTuningJobName", ""))
    summaries = _summaries(service, tuning)
    if "StatusEquals" in request:
        summaries = [s for s in summaries if s["TrainingJobStatus"] == request["StatusEquals"]]
    summaries.sort(key=lambda s: s["CreationTime"], reverse=request.get("SortOrder", "Descending") == "Descending")
    start, size = int(request.get("NextToken") or 0), int(request.get("MaxResults", 10))
    page: dict[str, Any] = {"TrainingJobSummaries": summaries[start:start + size]}
    if start + size < len(summaries):
        page["NextToken"] = str(start + size)
    return page


def stop(service: Service, request: dict[str, Any]) -> dict[str, Any]:
    tuning = _tuning(service, request.get("HyperParameterTuningJobName", ""))
    with service.lock:
        if tuning.status != "InProgress":
            raise ApiError("ValidationException", f"The hyperparameter tuning job is in status {tuning.status}")
        tuning.status = "Stopping"
        tuning.modified = datetime.now(timezone.utc)
        tuning.stop_requested.set()
    _emit(service, tuning)
    return {}


def _summaries(service: Service, tuning: TuningJob) -> list[dict[str, Any]]:
    out = []
    for name in list(tuning.trials):
        job = service.jobs.get(name)
        if job is None:
            continue
        summary = {
            "TrainingJobName": job.name, "TrainingJobArn": job.arn, "TuningJobName": tuning.name,
            "CreationTime": _epoch(job.created), "TrainingJobStatus": job.status,
            "TunedHyperParameters": tuning.tuned[name],
        }
        if job.started:
            summary["TrainingStartTime"] = _epoch(job.started)
        if job.ended:
            summary["TrainingEndTime"] = _epoch(job.ended)
        if job.failure_reason:
            summary["FailureReason"] = job.failure_reason
        values = job.metric_history.get(tuning.objective, [])
        if values:
            summary["FinalHyperParameterTuningJobObjectiveMetric"] = {
                "Type": tuning.config["HyperParameterTuningJobObjective"]["Type"], "MetricName": tuning.objective,
                "Value": values[-1]}
        summary["ObjectiveStatus"] = ("Succeeded" if values and job.status in ("Completed", "Stopped")
                                      else "Failed" if job.status == "Failed" else "Pending")
        out.append(summary)
    return out


# --- the runner ---------------------------------------------------------------------------------


def draws(ranges: dict[str, Any], count: int, rng: random.Random) -> list[dict[str, str]]:
    """`count` trials' values: each range cut into `count` strata, one draw from each, shuffled."""
    columns: dict[str, list[str]] = {}
    for kind in ("ContinuousParameterRanges", "IntegerParameterRanges"):
        for span in ranges.get(kind, []):
            low, high = float(span["MinValue"]), float(span["MaxValue"])
            log = span.get("ScalingType") == "Logarithmic"
            a, b = (math.log(low), math.log(high)) if log else (low, high)
            values = []
            for i in range(count):
                x = a + (b - a) * (i + rng.random()) / count
                x = math.exp(x) if log else x
                if kind == "IntegerParameterRanges":
                    values.append(str(min(int(high), max(int(low), int(round(x))))))
                else:
                    values.append(repr(min(high, max(low, x))))
            rng.shuffle(values)
            columns[span["Name"]] = values
    for span in ranges.get("CategoricalParameterRanges", []):
        columns[span["Name"]] = [rng.choice(span["Values"]) for _ in range(count)]
    return [{name: column[i] for name, column in columns.items()} for i in range(count)]


def _running_average(values: list[float], k: int) -> float:
    return sum(values[:k]) / k


def should_stop(values: list[float], earlier: list[list[float]], minimize: bool) -> bool:
    """Whether a trial with these objective reports is doing worse than the median of the earlier
    trials' running averages at the same report (SageMaker's early-stopping rule)."""
    k = len(values)
    if k == 0:
        return False
    peers = [_running_average(other, k) for other in earlier if len(other) >= k]
    if len(peers) < MIN_EARLIER_TRIALS:
        return False
    mine, median = _running_average(values, k), statistics.median(peers)
    return mine > median if minimize else mine < median


def _run(service: Service, tuning: TuningJob) -> None:
    config, definition = tuning.config, tuning.request["TrainingJobDefinition"]
    limits = config["ResourceLimits"]
    total = int(limits.get("MaxNumberOfTrainingJobs", 1))
    parallel = int(limits["MaxParallelTrainingJobs"])
    rng = random.Random(config.get("RandomSeed", tuning.name))
    plan = draws(config.get("ParameterRanges", {}), total, rng)
    early = config.get("TrainingJobEarlyStoppingType", "Off") == "Auto"
    _emit(service, tuning)
    running: list[Any] = []  # local.sagemaker.TrainingJob
    started = 0
    try:
        while True:
            while not tuning.stop_requested.is_set() and len(running) < parallel and started < total:
                name = f"{tuning.name}-{started + 1:03d}-{uuid.uuid4().hex[:8]}"
                tuned = plan[started]
                request = {
                    "TrainingJobName": name,
                    "HyperParameters": {**definition.get("StaticHyperParameters", {}), **tuned},
                    **{k: definition[k] for k in ("AlgorithmSpecification", "RoleArn", "InputDataConfig",
                                                  "OutputDataConfig", "ResourceConfig", "StoppingCondition",
                                                  "CheckpointConfig", "Environment") if k in definition},
                }
                request["AlgorithmSpecification"] = {k: v for k, v in request["AlgorithmSpecification"].items()
                                                     if k in ("TrainingImage", "TrainingInputMode", "MetricDefinitions")}
                tuning.tuned[name] = tuned
                tuning.trials.append(name)
                service.create_training_job(request)
                running.append(service.jobs[name])
                started += 1
            if tuning.stop_requested.is_set():
                for job in running:
                    _stop_trial(service, job.name, ApiError)
            elif early:
                for job in running:
                    if job.status != "InProgress" or job.name in tuning.early_stopped:
                        continue
                    values = job.metric_history.get(tuning.objective, [])
                    earlier = [service.jobs[n].metric_history.get(tuning.objective, []) for n in tuning.trials
                               if n != job.name and n in service.jobs and service.jobs[n].created < job.created]
                    if should_stop(values, earlier, tuning.minimize):
                        tuning.early_stopped.add(job.name)
                        _stop_trial(service, job.name, ApiError)
            running = [j for j in running if not (j.status in END_STATES and (j.thread is None or not j.thread.is_alive()))]
            if not running and (started >= total or tuning.stop_requested.is_set()):
                break
            time.sleep(POLL_SECONDS)
    except Exception as error:  # the runner itself broke: the tuning fails saying so
        tuning.failure_reason = f"InternalServerError: {error!r}"
    statuses = [service.jobs[n].status for n in tuning.trials if n in service.jobs]
    with service.lock:
        tuning.ended = tuning.modified = datetime.now(timezone.utc)
        if tuning.stop_requested.is_set() and not tuning.failure_reason:
            tuning.status = "Stopped"
        elif tuning.failure_reason or (statuses and all(s == "Failed" for s in statuses)):
            tuning.status = "Failed"
            tuning.failure_reason = tuning.failure_reason or "All training jobs failed"
        else:
            tuning.status = "Completed"
    _emit(service, tuning)


def _stop_trial(service: Service, name: str, api_error: type) -> None:
    try:
        service.stop_training_job({"TrainingJobName": name})
    except api_error:  # already ending
        pass


def _emit(service: Service, tuning: TuningJob) -> None:
    import sys

    detail = describe(service, {"HyperParameterTuningJobName": tuning.name})
    event = {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": STATE_CHANGE,
        "source": "aws.sagemaker",
        "account": LOCAL_ACCOUNT,
        "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": service.region,
        "resources": [tuning.arn],
        "detail": {k: (round(v * 1000) if k.endswith("Time") and isinstance(v, float) else v) for k, v in detail.items()},
    }
    try:
        service.deliver(event)
    except Exception as error:  # EventBridge retries and then drops; the tuning's own status is unaffected
        print(f"[local sagemaker] delivering {tuning.status} of {tuning.name} failed: {error!r}", file=sys.stderr)
