"""Tuning: find a run's settings cheaply, on SageMaker's own tuner, then promote the winner.

A tuning names a base model, a dataset, the settings it keeps fixed and the ranges of those it
searches (lr on a log scale, steps_per_cycle, cycles, turns). SageMaker's hyperparameter tuning job
(CreateHyperParameterTuningJob, Bayesian with early stopping) is the search: each trial it starts
runs our container on a short proxy of the full run (shared.settings.proxy_settings: the same grown
model and data, `proxy_fraction` of the run's steps, held-out perplexity on the same windows at
every cycle's end), and the objective is that perplexity, read from the container's log by the
metric definitions of every training job.

A tuning is a job of the jobs table (type "tuning", an id from shared.lifecycle.new_tuning_id):
admitted against the budget, queued, launched, followed and reconciled as any job. Its price is
fixed before it runs: at most max_trials x the dearest trial the ranges allow (the proxy's tokens
at the grown model's tier; no growth fee: a trial delivers no model). Its bill is the same
function of the tokens its trials trained (shared.pricing.bill): a completed trial its proxy's
tokens, one the tuner stopped early the steps it logged, a failed one nothing. A tuning whose
trials all run in full at the top of the ranges pays its estimate exactly.

Promoting a trial creates an ordinary train job with the fixed settings and the trial's, through
the same admission (catalog, dataset, budget, idempotency) as POST /jobs; the job, and the model
it makes, keep the tuning's id.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.contracts import PRECISION_ENV, Hyperparameters
from shared.errors import JobError, invalid, not_found
from shared.lifecycle import END_STATUSES, JOB_ID_PATTERN, NO_CHARGE, is_tuning, new_tuning_id
from shared.pricing import CENT, MILLION, Estimate, bill, estimate_train
from shared.settings import (
    MAX_PROXY_FRACTION,
    MIN_PROXY_FRACTION,
    STRICT,
    OutputName,
    TrainJobRequest,
    TrainSettings,
    proxy_settings,
)
from shared.shapes import ModelConfig
from shared.store import Catalog, ConditionFailed, Datasets, Jobs, json_column
from shared.training_jobs import (
    METRIC_DEFINITIONS,
    NETWORK_ISOLATION,
    NO_SUCH_TRAINING_JOB,
    LaunchConfig,
    input_channels,
    job_id_of,
    job_tags,
    output_config,
    sagemaker_call,
    training_job_name,
)

OBJECTIVE_METRIC = "heldout_perplexity"  # one of the container's metric lines; lower is better
STRATEGY = "Bayesian"
EARLY_STOPPING = "Auto"  # SageMaker stops a trial doing worse than the median of earlier ones at the same point
TUNING_STATE_CHANGE = "SageMaker HyperParameter Tuning Job State Change"

DEFAULT_PROXY_FRACTION = 0.05
DEFAULT_MAX_TRIALS = 5
MAX_TRIALS = 50
DEFAULT_MAX_PARALLEL_TRIALS = 2
MAX_PARALLEL_TRIALS = 10

# The settings a tuning may search, and how the tuner walks each range.
TUNABLE: dict[str, Literal["Logarithmic", "Linear"]] = {
    "lr": "Logarithmic",
    "steps_per_cycle": "Linear",
    "cycles": "Linear",
    "turns": "Linear",
}


class LogRange(BaseModel):
    """A continuous range searched on a log scale."""

    model_config = STRICT

    min: float = Field(gt=0)
    max: float = Field(gt=0)


class IntRange(BaseModel):
    """An integer range, both ends included."""

    model_config = STRICT

    min: int
    max: int


class Ranges(BaseModel):
    """The settings searched; any other setting of a train job is fixed (unknown names are refused)."""

    model_config = STRICT

    lr: LogRange | None = Field(default=None, description="Peak learning rate, searched on a log scale.")
    steps_per_cycle: IntRange | None = None
    cycles: IntRange | None = None
    turns: IntRange | None = None

    def given(self) -> dict[str, LogRange | IntRange]:
        return {name: getattr(self, name) for name in TUNABLE if getattr(self, name) is not None}


# Whether lr 3e-4 beats 1e-4, and whether a second turn pays: the questions the product page asks.
DEFAULT_RANGES = Ranges(lr=LogRange(min=3e-5, max=1e-3), turns=IntRange(min=1, max=2))


class TuningRequest(BaseModel):
    """Body of `POST /tunings`."""

    model_config = STRICT

    model: str = Field(min_length=1, max_length=128, description="Base model id (a catalog model).")
    dataset: str = Field(min_length=1, max_length=1024, description="Dataset id or S3 URI of the training data.")
    settings: TrainSettings = Field(default_factory=TrainSettings,
                                    description="The settings every trial shares (those not searched).")
    ranges: Ranges | None = Field(default=None, description="The settings searched, each with its range. "
                                  "Default: lr 3e-5..1e-3 (log scale) and turns 1..2.")
    max_trials: int = Field(default=DEFAULT_MAX_TRIALS, ge=1, le=MAX_TRIALS, description="Trials the tuner runs at most.")
    max_parallel_trials: int = Field(default=DEFAULT_MAX_PARALLEL_TRIALS, ge=1, le=MAX_PARALLEL_TRIALS)
    proxy_fraction: float = Field(default=DEFAULT_PROXY_FRACTION, ge=MIN_PROXY_FRACTION, le=MAX_PROXY_FRACTION,
                                  description="Each trial trains this fraction of its full run's steps.")
    budget_usd: float | None = Field(default=None, gt=0, le=1_000_000,
                                     description="The most this tuning may cost; refused if max_trials may cost more.")

    def searched(self) -> dict[str, LogRange | IntRange]:
        return (self.ranges if self.ranges is not None else DEFAULT_RANGES).given()


class PromoteRequest(BaseModel):
    """Body of `POST /tunings/{tuning_id}/promote`."""

    model_config = STRICT

    trial: str | None = Field(default=None, max_length=63, description="The trial to promote; default: the best.")
    output_name: OutputName


# --- validation and price --------------------------------------------------------------------


def bounds(name: str) -> tuple[float, bool, float]:
    """(low, whether low itself is allowed, high) of a train setting, from TrainSettings' own field."""
    low, inclusive, high = -math.inf, True, math.inf
    for constraint in TrainSettings.model_fields[name].metadata:
        if getattr(constraint, "ge", None) is not None:
            low, inclusive = constraint.ge, True
        if getattr(constraint, "gt", None) is not None:
            low, inclusive = constraint.gt, False
        if getattr(constraint, "le", None) is not None:
            high = constraint.le
    return low, inclusive, high


def check_ranges(request: TuningRequest) -> dict[str, LogRange | IntRange]:
    """The searched ranges, each non-empty and within its setting's bounds; a 422 naming the first that is not."""
    searched = request.searched()
    if not searched:
        raise invalid("ranges", "name at least one setting to search: " + ", ".join(TUNABLE))
    for name, span in searched.items():
        field = f"ranges.{name}"
        if span.min >= span.max:
            raise invalid(field, f"the range of {name} is empty: min {span.min} must be below max {span.max} "
                                 f"(a setting with one value belongs in settings)")
        low, inclusive, high = bounds(name)
        if span.min < low or (span.min == low and not inclusive) or span.max > high:
            words = f"{'[' if inclusive else '('}{low}, {high}]"
            raise invalid(field, f"the range {span.min}..{span.max} of {name} lies outside its bounds {words}")
    if request.settings.train_steps is not None:
        raise invalid("settings.train_steps", "a tuning searches cycles and steps_per_cycle: leave train_steps out")
    return searched


def trial_settings(fixed: TrainSettings, tuned: dict[str, Any]) -> TrainSettings:
    """A trial's full-run settings: the fixed ones with the tuner's values (strings from SageMaker or numbers)."""
    values = {**fixed.model_dump(exclude_none=True), **{k: v for k, v in tuned.items() if k in TUNABLE}}
    return TrainSettings.model_validate(values, strict=False)


def dearest(fixed: TrainSettings, searched: dict[str, LogRange | IntRange]) -> TrainSettings:
    """The settings of the dearest trial: every integer range at its top (tokens grow with each)."""
    top = {name: span.max for name, span in searched.items() if isinstance(span, IntRange)}
    return trial_settings(fixed, top)


def trial_estimate(full: TrainSettings, base: ModelConfig, fraction: float) -> Estimate:
    """One trial priced: the proxy's tokens at the grown model's tier (the memory plan's instance)."""
    return estimate_train(proxy_settings(full, fraction), base)


def price(request: TuningRequest, base: ModelConfig, searched: dict[str, LogRange | IntRange]) -> Estimate:
    """The tuning's price before it runs: max_trials of the dearest trial, rounded once to cents.
    The ETA runs the trials max_parallel_trials at a time. Raises memory.DoesNotFit."""
    one = trial_estimate(dearest(request.settings, searched), base, request.proxy_fraction)
    tokens = request.max_trials * one.training_tokens
    training_cost = Decimal(tokens) / MILLION * one.usd_per_million_tokens
    total = max(training_cost.quantize(CENT, rounding=ROUND_HALF_UP), one.minimum_charge)
    waves = -(-request.max_trials // request.max_parallel_trials)
    return one.model_copy(update={
        "job_type": "tuning", "training_tokens": tokens, "training_cost": training_cost, "growth_parameters": 0,
        "growth_fee": Decimal(0), "total": total, "eta_seconds": waves * one.eta_seconds,
    })


def resolve_tuning(request: TuningRequest, owner: str, *, catalog: Catalog, datasets: Datasets, data_bucket: str,
                   s3: Any, tuning_id: str | None = None) -> dict[str, Any]:
    """Check a tuning against the catalog, the caller's data and its budget_usd, and price it: the
    record, not yet stored. Raises JobError for anything the caller got wrong; nothing is written."""
    from shared.admission import resolve

    searched = check_ranges(request)
    tuning_id = tuning_id or new_tuning_id()
    top = dearest(request.settings, searched)
    as_job = TrainJobRequest(type="train", model=request.model, dataset=request.dataset, hyperparams=top)
    try:  # the dearest trial's full run: the catalog, seq_len against the context, the dataset, the memory plan
        job = resolve(as_job, owner, catalog=catalog, datasets=datasets, data_bucket=data_bucket, s3=s3,
                      job_id=tuning_id)
    except JobError as error:
        for detail in error.details:
            detail["field"] = detail["field"].replace("hyperparams.", "settings.", 1)
        raise
    base = ModelConfig.model_validate(catalog.get(request.model, owner)["config"])
    estimate = price(request, base, searched)
    if request.budget_usd is not None:
        budget = Decimal(str(request.budget_usd))
        if estimate.total > budget:
            each = estimate.total / request.max_trials
            fits = int(budget // each) if each > 0 else 0
            raise invalid("max_trials", f"{request.max_trials} trials may cost USD {estimate.total} (USD "
                                        f"{each.quantize(CENT)} each at the top of the ranges), over the budget of USD "
                                        f"{budget}: at most {fits} fit")
    return {
        **job,
        "type": "tuning",
        "settings": request.settings.model_dump(mode="json"),
        "estimate": estimate.model_dump(mode="json"),
        "warnings": [],
        "base_config": base.model_dump(mode="json"),
        "tuning": {
            "ranges": {name: span.model_dump() for name, span in searched.items()},
            "max_trials": request.max_trials,
            "max_parallel_trials": request.max_parallel_trials,
            "proxy_fraction": request.proxy_fraction,
            "strategy": STRATEGY,
            "early_stopping": EARLY_STOPPING,
            "objective": OBJECTIVE_METRIC,
            "budget_usd": None if request.budget_usd is None else str(request.budget_usd),
        },
    }


# --- the tuner's request -----------------------------------------------------------------------


def tuning_job_request(job: dict[str, Any], config: LaunchConfig) -> dict[str, Any]:
    """The CreateHyperParameterTuningJob parameters of a stored tuning (boto3 shapes)."""
    tuning_id, tuning = job["job_id"], job["tuning"]
    estimate = Estimate.model_validate(job["estimate"])
    fixed = TrainSettings.model_validate(job["settings"])
    static = Hyperparameters(job_type="train", job_id=tuning_id, settings=fixed, layout=estimate.layout(),
                             proxy_fraction=tuning["proxy_fraction"]).strings()
    for name in tuning["ranges"]:
        static.pop(name, None)
    ranges: dict[str, list[dict[str, str]]] = {}
    for name, span in tuning["ranges"].items():
        kind = "ContinuousParameterRanges" if TUNABLE[name] == "Logarithmic" else "IntegerParameterRanges"
        ranges.setdefault(kind, []).append({"Name": name, "MinValue": str(span["min"]), "MaxValue": str(span["max"]),
                                            "ScalingType": TUNABLE[name]})
    return {
        "HyperParameterTuningJobName": training_job_name(tuning_id),
        "HyperParameterTuningJobConfig": {
            "Strategy": tuning["strategy"],
            "TrainingJobEarlyStoppingType": tuning["early_stopping"],
            "HyperParameterTuningJobObjective": {"Type": "Minimize", "MetricName": tuning["objective"]},
            "ResourceLimits": {"MaxNumberOfTrainingJobs": tuning["max_trials"],
                               "MaxParallelTrainingJobs": tuning["max_parallel_trials"]},
            "ParameterRanges": ranges,
        },
        "TrainingJobDefinition": {
            "StaticHyperParameters": static,
            "AlgorithmSpecification": {"TrainingImage": config.training_image_uri, "TrainingInputMode": "File",
                                       "MetricDefinitions": METRIC_DEFINITIONS},
            "RoleArn": config.role_arn,
            "InputDataConfig": input_channels(job),
            # Each trial writes under <path>/<its training job name>/output/. No CheckpointConfig: trials
            # sharing one would resume from each other's checkpoints; a short proxy restarts instead.
            "OutputDataConfig": output_config(trials_prefix(config.artifacts_bucket, tuning_id)),
            "ResourceConfig": {"InstanceType": estimate.instance_type, "InstanceCount": estimate.instance_count,
                               "VolumeSizeInGB": config.volume_size_gb},
            "StoppingCondition": {"MaxRuntimeInSeconds": estimate.max_runtime_seconds},
            "EnableManagedSpotTraining": False,
            "EnableNetworkIsolation": NETWORK_ISOLATION,
            "Environment": {PRECISION_ENV: config.precision},
        },
        "Tags": job_tags(tuning_id, job["owner"], config),
    }


def trials_prefix(artifacts_bucket: str, tuning_id: str) -> str:
    return f"s3://{artifacts_bucket}/jobs/{tuning_id}/trials/"


def tuning_job_exists(sagemaker: Any, name: str) -> bool:
    return sagemaker_call(sagemaker.describe_hyper_parameter_tuning_job, HyperParameterTuningJobName=name)


def stop_tuning_job(sagemaker: Any, name: str) -> bool:
    """Ask the tuner to stop (its running trials stop with it); False when there is none to stop."""
    return sagemaker_call(sagemaker.stop_hyper_parameter_tuning_job, HyperParameterTuningJobName=name)


# --- following the tuner ------------------------------------------------------------------------

# HyperParameterTuningJobStatus -> Fusion status.
TUNING_STATUS = {"InProgress": "running", "Stopping": "cancelling", "Completed": "completed", "Failed": "failed",
                 "Stopped": "cancelled"}
TRIAL_STATUS = {"Completed": "completed", "Stopped": "stopped", "Failed": "failed", "InProgress": "running",
                "Stopping": "stopped"}


def read_trials(job: dict[str, Any], *, sagemaker: Any, s3: Any, artifacts_bucket: str) -> list[dict[str, Any]]:
    """The tuning's trials as the tuner reports them, ranked best first: each one's settings, held-out
    perplexity (the objective) and curve (a completed trial's per-cycle perplexities), the tokens it
    trained and what they cost."""
    name = training_job_name(job["job_id"])
    fixed = TrainSettings.model_validate(job["settings"])
    fraction = job["tuning"]["proxy_fraction"]
    price_per_million = Decimal(job["estimate"]["usd_per_million_tokens"])
    summaries, token = [], None
    while True:
        page = sagemaker.list_training_jobs_for_hyper_parameter_tuning_job(
            HyperParameterTuningJobName=name, MaxResults=100, **({"NextToken": token} if token else {}))
        summaries += page.get("TrainingJobSummaries", [])
        token = page.get("NextToken")
        if not token:
            break
    trials = []
    for summary in summaries:
        tuned = summary.get("TunedHyperParameters") or {}
        full = trial_settings(fixed, tuned)
        proxy = proxy_settings(full, fraction)
        status = TRIAL_STATUS.get(summary.get("TrainingJobStatus", ""), "failed")
        curve = None
        if status == "completed":
            tokens = proxy.training_tokens()
            curve = _curve(s3, artifacts_bucket, job["job_id"], summary["TrainingJobName"])
        elif status == "stopped":  # early-stopped: the steps it logged before it stopped
            tokens = min(_logged_step(sagemaker, summary["TrainingJobName"]) * proxy.seq_len, proxy.training_tokens())
        else:
            tokens = 0
        objective = (summary.get("FinalHyperParameterTuningJobObjectiveMetric") or {}).get("Value")
        trials.append({
            "name": summary["TrainingJobName"],
            "status": status,
            "early_stopped": summary.get("TrainingJobStatus") == "Stopped",
            "settings": {k: getattr(full, k) for k in job["tuning"]["ranges"]},
            "perplexity": float(objective) if objective is not None else None,
            "curve": curve,
            "tokens_trained": tokens,
            "cost": str(Decimal(tokens) / MILLION * price_per_million),
        })
    return rank(trials)


def rank(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first: the lowest held-out perplexity of the trials that completed, then the stopped ones,
    then the rest."""
    order = {"completed": 0, "stopped": 1}
    return sorted(trials, key=lambda t: (order.get(t["status"], 2), t["perplexity"] is None,
                                         t["perplexity"] if t["perplexity"] is not None else 0.0, t["name"]))


def _curve(s3: Any, bucket: str, tuning_id: str, trial: str) -> list[float] | None:
    """A completed trial's held-out perplexity at each cycle's end, from its metrics.json."""
    from shared.outputs import model_uri, read_metrics

    try:
        metrics = read_metrics(s3, model_uri(trials_prefix(bucket, tuning_id), trial))
    except Exception:  # a curve is shown when it can be read; the ranking and the bill do not need it
        return None
    return [c.perplexity for c in metrics.cycles if c.perplexity is not None]


def _logged_step(sagemaker: Any, trial: str) -> int:
    """The last step a trial logged (its "step" metric), 0 when it logged none."""
    from botocore.exceptions import ClientError

    try:
        description = sagemaker.describe_training_job(TrainingJobName=trial)
    except ClientError as exc:
        if exc.response["Error"].get("Code") in NO_SUCH_TRAINING_JOB:
            return 0
        raise
    for metric in description.get("FinalMetricDataList") or []:
        if metric.get("MetricName") == "step":
            return max(int(metric.get("Value") or 0), 0)
    return 0


def tuning_id_of(name: Any) -> str | None:
    job_id = job_id_of(name) if isinstance(name, str) else None
    return job_id if job_id and is_tuning(job_id) else None


def record_tuning_change(detail: dict[str, Any], *, jobs: Jobs, sagemaker: Any, s3: Any,
                         artifacts_bucket: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Apply one "SageMaker HyperParameter Tuning Job State Change" (or what DescribeHyperParameterTuningJob
    says) to its tuning: (the tuning after it, or None when it changed nothing; the tuning as it is now).

    An end state reads the trials, records them ranked and bills them, in the one conditional write
    that ends the tuning, so duplicates and late events change nothing twice.
    """
    tuning_id = tuning_id_of(detail.get("HyperParameterTuningJobName"))
    status = TUNING_STATUS.get(detail.get("HyperParameterTuningJobStatus")) if tuning_id else None
    job = jobs.get(tuning_id) if status else None
    if job is None or job.get("type") != "tuning":
        return None, None
    if job["status"] in END_STATUSES:
        return None, job
    fields: dict[str, Any] = {}
    if status in END_STATUSES:
        trials = read_trials(job, sagemaker=sagemaker, s3=s3, artifacts_bucket=artifacts_bucket)
        tokens = sum(t["tokens_trained"] for t in trials)
        estimate = Estimate.model_validate(job["estimate"])
        fields = {"trials": json_column(trials), "bill": str(bill(estimate, tokens)) if tokens else NO_CHARGE}
        if status == "failed":
            reason = detail.get("FailureReason")
            fields["failure_reason"] = reason if isinstance(reason, str) and reason else "the tuner reported the tuning failed"
    try:
        job = jobs.transition(tuning_id, status, **fields)
    except ConditionFailed:
        return None, jobs.get(tuning_id)
    if status in END_STATUSES:
        from shared.telemetry import job_ended

        job_ended(job)
    return job, job


def follow_tuning(detail: dict[str, Any], *, jobs: Jobs, sagemaker: Any, s3: Any, bus: Any,
                  artifacts_bucket: str) -> dict[str, Any] | None:
    """A tuning's state change recorded, then announced (also when an earlier delivery could not)."""
    from shared.events import announce

    changed, current = record_tuning_change(detail, jobs=jobs, sagemaker=sagemaker, s3=s3,
                                            artifacts_bucket=artifacts_bucket)
    if current is not None:
        announce(current, jobs=jobs, bus=bus)
    return changed


def reconcile_tunings(*, jobs: Jobs, sagemaker: Any, s3: Any, bus: Any, artifacts_bucket: str,
                      at: datetime | None = None) -> dict[str, Any]:
    """The reconciler's pass over the tunings in flight: each compared with DescribeHyperParameterTuningJob
    and, where the tuner says more than the tuning knows, followed as the event that state stands for.
    A tuning launching for too long with no tuning job is failed, as a job is (fail_unlaunched); the
    summary has the keys of shared.state_changes.reconcile_in_flight's."""
    from botocore.exceptions import BotoCoreError, ClientError

    from shared.state_changes import not_in_sagemaker

    at = at or datetime.now(timezone.utc)
    summary = {"checked": 0, "moved": [], "not_created": 0, "errors": 0, "unlaunched": []}
    for item in jobs.in_flight():
        if not is_tuning(item["job_id"]):
            continue
        summary["checked"] += 1
        name = training_job_name(item["job_id"])
        try:
            description = sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
            detail = {k: description[k] for k in ("HyperParameterTuningJobName", "HyperParameterTuningJobStatus",
                                                   "FailureReason") if description.get(k) is not None}
            if TUNING_STATUS.get(detail.get("HyperParameterTuningJobStatus", "")) == item["status"]:
                continue
            changed = follow_tuning(detail, jobs=jobs, sagemaker=sagemaker, s3=s3, bus=bus,
                                    artifacts_bucket=artifacts_bucket)
        except ClientError as exc:
            if exc.response["Error"].get("Code") in NO_SUCH_TRAINING_JOB:
                not_in_sagemaker(item, summary, jobs=jobs, bus=bus, at=at)
            else:
                summary["errors"] += 1
            continue
        except BotoCoreError:
            summary["errors"] += 1
            continue
        if changed is not None:
            summary["moved"].append(item["job_id"])
    return summary


# --- what the caller sees, and promotion ---------------------------------------------------------


def trials_of(job: dict[str, Any]) -> list[dict[str, Any]]:
    raw = job.get("trials")
    return json.loads(raw) if isinstance(raw, str) else list(raw or [])


def ranked_table(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The trials best first, each with what its full run would cost and take (the estimate a
    dry-run POST /jobs gives for those settings)."""
    fixed = TrainSettings.model_validate(job["settings"])
    base = ModelConfig.model_validate(job["base_config"])
    out = []
    for position, trial in enumerate(trials_of(job), start=1):
        full = trial_settings(fixed, trial["settings"])
        try:
            estimate = estimate_train(full, base)
            full_run = {"total": str(estimate.total), "eta_seconds": estimate.eta_seconds,
                        "settings": full.model_dump(mode="json", exclude_none=True)}
        except Exception:  # noqa: BLE001 - a plan that no longer fits leaves the row without a forecast
            full_run = None
        out.append({**trial, "rank": position, "full_run": full_run})
    return out


def get_tuning(jobs: Jobs, tuning_id: str, owner: str) -> dict[str, Any]:
    job = jobs.get(tuning_id, owner) if JOB_ID_PATTERN.fullmatch(tuning_id) and is_tuning(tuning_id) else None
    if job is None or job.get("type") != "tuning":
        raise not_found("tuning", "tuning_id", tuning_id)
    return job


def promotion(job: dict[str, Any], request: PromoteRequest) -> tuple[TrainJobRequest, dict[str, Any]]:
    """The train job a promotion asks for, and the trial it promotes: the best completed one, or the
    one named. A 409 while the tuning has no trial to promote."""
    trials = [t for t in trials_of(job) if t["status"] == "completed" and t["perplexity"] is not None]
    if request.trial is not None:
        chosen = next((t for t in trials if t["name"] == request.trial), None)
        if chosen is None:
            raise invalid("trial", f"{request.trial!r} is not a completed trial of {job['job_id']}")
    elif trials:
        chosen = trials[0]
    else:
        raise JobError(409, "no_trial", f"tuning {job['job_id']} is {job['status']} and has no completed trial to promote",
                       [{"field": "tuning_id", "message": f"the tuning is {job['status']}"}])
    settings = trial_settings(TrainSettings.model_validate(job["settings"]), chosen["settings"])
    if request.output_name is not None:
        settings = TrainSettings.model_validate({**settings.model_dump(), "output_name": request.output_name})
    return TrainJobRequest(type="train", model=job["model"], dataset=job["dataset"], hyperparams=settings), chosen
