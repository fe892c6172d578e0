"""How a request becomes an accepted job: checked against the catalog and the caller's datasets,
priced, held to the budget, stored and queued for launch. Nothing is written for a request refused.

The stores (shared.store) and clients come in as arguments.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from shared.budgets import budget_of, check_budget
from shared.datasets import data_warnings, dataset_replaced, parse_dataset_key
from shared.errors import JobError, describe_error, invalid, not_found
from shared.events import announce
from shared.lifecycle import NO_CHARGE, new_job_id
from shared.memory import DoesNotFit
from shared.pricing import Estimate, estimate_contract, estimate_evaluate, estimate_train
from shared.settings import (
    JOB_REQUEST,
    ContractJobRequest,
    ContractSettings,
    EvaluateJobRequest,
    TrainJobRequest,
    TrainSettings,
    default_output_name,
)
from shared.shapes import ModelConfig, contraction_floor, grown_block_ids
from shared.store import Catalog, Datasets, Jobs, OverBudget, Tenants, available, cents, not_available, now
from shared.telemetry import job_created, job_ended, job_refused
from shared.tenancy import data_uri_prefix, is_owner, owns_uri


def resolve(
    request: TrainJobRequest | ContractJobRequest | EvaluateJobRequest,
    owner: str,
    *,
    catalog: Catalog,
    datasets: Datasets,
    data_bucket: str,
    s3: Any,
    job_id: str | None = None,
) -> dict[str, Any]:
    """Check a request against the catalog and price it: the job record, not yet stored.

    Raises JobError for anything the caller got wrong; nothing is written. `s3` looks up what the
    records alone cannot say: whether the base model's weights exist, and whether the dataset's
    object is still the one its check admitted.
    """
    job_id = job_id or new_job_id()
    if isinstance(request, EvaluateJobRequest):
        return _resolve_evaluation(request, owner, catalog=catalog, datasets=datasets, data_bucket=data_bucket,
                                   s3=s3, job_id=job_id)
    warnings = request.hyperparams.warnings()
    if isinstance(request, TrainJobRequest):
        base = catalog.get(request.model, owner)
        if base is None:
            raise not_found("model", "model", request.model)
        if base.get("status", "ready") != "ready":  # a registered folder that failed its check
            raise invalid("model", f"{request.model} is {base['status']}" + (f": {base['reason']}" if base.get("reason") else ""))
        if not available(base, s3):
            raise invalid("model", not_available(request.model))
        config = ModelConfig.model_validate(base["config"])
        settings: TrainSettings | ContractSettings = request.hyperparams
        if settings.seq_len > config.context_length:
            raise invalid(
                "hyperparams.seq_len",
                f"seq_len={settings.seq_len} exceeds the context length {config.context_length} of {request.model}",
            )
        model_id, dataset = request.model, request.dataset
        estimate = _planned(lambda: estimate_train(settings, config), "model")
    else:
        settings = request.hyperparams
        source = catalog.get(settings.source_model_id, owner)
        if source is None:
            raise not_found("model", "hyperparams.source_model_id", settings.source_model_id)
        if source.get("status", "ready") != "ready":
            raise invalid("hyperparams.source_model_id", f"{settings.source_model_id} is {source['status']}")
        if source["owner"] != owner:  # a public base model: untrained here, and not the caller's to shrink
            raise invalid(
                "hyperparams.source_model_id",
                f"{settings.source_model_id} is a base model; contract a model you trained from it",
            )
        if settings.num_layers_to_contract > source["depth"]:
            raise invalid(
                "hyperparams.num_layers_to_contract",
                f"num_layers_to_contract={settings.num_layers_to_contract} exceeds the depth "
                f"{source['depth']} of {settings.source_model_id}",
            )
        source_config = ModelConfig.model_validate(source["config"])
        can_lose, full = contraction_floor(source_config, settings.contraction_ratio, settings.num_layers_to_contract)
        if not can_lose:
            raise invalid("hyperparams.contraction_ratio",
                          f"contracting {settings.source_model_id} at contraction_ratio={settings.contraction_ratio} "
                          "would remove nothing: no layer can lose a head or an MLP unit at this ratio (a layer keeps "
                          "at least 1 of each)")
        if full < settings.num_layers_to_contract:
            warnings.append(f"only {full} of the {settings.num_layers_to_contract} layers asked for can lose all that "
                            f"contraction_ratio={settings.contraction_ratio} asks (a layer keeps at least 1 query head "
                            f"and 1 MLP unit; {can_lose} can lose anything): this contraction removes less than asked")
        dataset = request.dataset or source.get("dataset")
        if not dataset:
            raise invalid("dataset", f"{settings.source_model_id} records no dataset: give one for calibration")
        model_id, base = settings.source_model_id, source
        estimate = _planned(lambda: estimate_contract(settings, source_config), "hyperparams.source_model_id")
        warnings += grown_blocks_warning(source_config, settings)
    dataset_uri, pinned = _unreplaced(s3, dataset, owner, datasets=datasets, data_bucket=data_bucket)
    validation: dict[str, Any] = {}
    if isinstance(request, TrainJobRequest):
        warnings += _data_warnings(dataset, owner, datasets, settings.seq_len)
        if request.validation_dataset is not None:
            uri, pin = _unreplaced(s3, request.validation_dataset, owner, datasets=datasets, data_bucket=data_bucket,
                                   field="validation_dataset")
            validation = {"validation_dataset": request.validation_dataset, "validation_dataset_uri": uri,
                          "validation_dataset_pin": pin}
    if settings.output_name is None:
        settings = settings.model_copy(update={"output_name": default_output_name(job_id)})
    return _queued_job(job_id, request.type, owner, settings, estimate, warnings, dataset, dataset_uri, pinned,
                       model=model_id, input_model_uri=base["artifact_uri"], **validation)


def _queued_job(job_id: str, job_type: str, owner: str, settings: Any, estimate: Estimate, warnings: list[str],
                dataset: str, dataset_uri: str, pinned: Any, **fields: Any) -> dict[str, Any]:
    """A job's record as admitted (queued, nothing launched yet); `fields` are its type's own."""
    created = now()
    return {
        "job_id": job_id,
        "type": job_type,
        "status": "queued",
        "owner": owner,
        "dataset": dataset,
        "settings": settings.model_dump(mode="json"),
        "estimate": estimate.model_dump(mode="json"),
        "warnings": warnings,
        "training_job_name": None,
        "output_model_id": None,
        "failure_reason": None,
        "progress": None,
        "bill": None,
        "created_at": created,
        "updated_at": created,
        "dataset_uri": dataset_uri,
        "dataset_pin": pinned,
        **fields,
    }


def _data_warnings(dataset: str, owner: str, datasets: Datasets, seq_len: int) -> list[str]:
    return [] if dataset.startswith("s3://") else data_warnings(datasets.get(dataset, owner), seq_len)
def grown_blocks_warning(source: ModelConfig, settings: ContractSettings) -> list[str]:
    """What contracting a model that still holds the blocks growth inserted removes.

    A grown block starts as an identity function (its output projections are zero) and stays close
    to one until trained at length; contraction picks the blocks of least influence first, so on a
    freshly grown model it prunes mostly those inserted blocks, not the model's own."""
    inserted = grown_block_ids(source)
    if not inserted:
        return []
    return [f"{len(inserted)} of the {source.n_layers} blocks of {settings.source_model_id} were inserted by growth "
            f"({', '.join(inserted)}); until trained at length they are near-identity, and contraction prunes the "
            f"least influential blocks first: on a freshly grown model it removes mostly the inserted blocks' "
            f"units, so the result stays above the size of the model it grew from"]


def _resolve_evaluation(request: EvaluateJobRequest, owner: str, *, catalog: Catalog, datasets: Datasets,
                        data_bucket: str, s3: Any, job_id: str) -> dict[str, Any]:
    """An evaluate job: every model the caller may see (theirs or a base model), ready, its weights
    stored, and with a context at least seq_len long; each model's artifact is an input channel of
    the training job. The dataset is checked and pinned as a train job's is."""
    settings = request.hyperparams
    models = []
    for index, model_id in enumerate(settings.model_ids):
        field_name = f"hyperparams.model_ids.{index}"
        model = catalog.get(model_id, owner)
        if model is None:
            raise not_found("model", field_name, model_id)
        if model.get("status", "ready") != "ready" or not model.get("artifact_uri"):
            raise invalid(field_name, f"{model_id} is {model.get('status', 'not ready')}: {model.get('reason')}")
        if not available(model, s3):
            raise invalid(field_name, not_available(model_id))
        config = ModelConfig.model_validate(model["config"])
        if settings.seq_len > config.context_length:
            raise invalid("hyperparams.seq_len", f"seq_len={settings.seq_len} exceeds the context length "
                                                 f"{config.context_length} of {model_id}")
        models.append((model, config))
    estimate = _planned(lambda: estimate_evaluate(settings, [config for _, config in models]), "hyperparams.model_ids")
    dataset_uri, pinned = _unreplaced(s3, request.dataset, owner, datasets=datasets, data_bucket=data_bucket)
    warnings = settings.warnings() + _data_warnings(request.dataset, owner, datasets, settings.seq_len)
    return _queued_job(job_id, request.type, owner, settings, estimate, warnings, request.dataset, dataset_uri, pinned,
                       model=None,  # an evaluation has no one model: it measures `models`
                       models=list(settings.model_ids),
                       input_model_uris=[model["artifact_uri"] for model, _ in models])


def _planned(estimate: Any, field_name: str) -> Estimate:
    """The estimate, or a 422 naming the model when no instance the service runs on can hold it."""
    try:
        return estimate()
    except DoesNotFit as error:
        message = f"no instance this service trains on can hold this job: {error}"
        raise JobError(422, "does_not_fit", message, [{"field": field_name, "message": message}]) from None


def _unreplaced(s3: Any, dataset: str, owner: str, *, datasets: Datasets, data_bucket: str,
                field: str = "dataset") -> tuple[str, dict | None]:
    """resolve_dataset, then the object itself: a dataset replaced since its check is refused at
    once (the upload's notification may not have been checked yet)."""
    uri, pin = resolve_dataset(dataset, owner, datasets=datasets, data_bucket=data_bucket, field=field)
    replaced = dataset_replaced(s3, {"dataset": dataset, "dataset_uri": uri, "dataset_pin": pin})
    if replaced:
        raise invalid(field, replaced)
    return uri, pin


def resolve_dataset(dataset: str, owner: str, *, datasets: Datasets, data_bucket: str,
                    field: str = "dataset") -> tuple[str, dict | None]:
    """The S3 URI to train on and the object its check admitted ({"etag", "version_id"}): a ready
    dataset of the caller, named by its id or by the s3:// URI of its upload. Any other S3 URI is
    refused: its bytes were never checked, and nothing would pin them between admission and launch.
    `field`: the request's field that named it (dataset, validation_dataset)."""
    if dataset.startswith("s3://"):
        parsed = parse_dataset_key(dataset[len(f"s3://{data_bucket}/"):]) if owns_uri(dataset, data_bucket, owner) else None
        if parsed is None or parsed[0] != owner:
            raise invalid(field, "a job trains on a checked dataset only: name a dataset id (ds-...) that "
                                     "POST /datasets registered and its check made ready, or its s3:// URI; "
                                     f"other S3 URIs (even under {data_uri_prefix(data_bucket, owner)}) are "
                                     "neither checked nor pinned")
        uri, dataset = dataset, parsed[1]
    else:
        uri = None
    record = datasets.get(dataset, owner)
    if record is None or (uri is not None and record["s3_uri"] != uri):
        raise not_found("dataset", field, uri or dataset)
    if record.get("status") != "ready":
        raise invalid(field, f"dataset {dataset!r} is {record.get('status')}, not ready"
                                 + (f": {record['reason']}" if record.get("reason") else ""))
    pin = {"etag": record["s3_etag"], "version_id": record.get("s3_version_id")} if record.get("s3_etag") else None
    return record["s3_uri"], pin


def submit(job: dict[str, Any], *, jobs: Jobs, sqs: Any, queue_url: str, limit_cents: int | None = None) -> dict[str, Any]:
    """Store a resolved job "queued" and put it on the launch queue.

    If the queue refuses it, the job is marked failed with the reason (never left queued with
    nothing to launch it) and a 503 JobError is raised.
    """
    jobs.create(job, limit_cents=limit_cents)
    try:
        sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps({"job_id": job["job_id"]}))
    except Exception as exc:  # whatever the cause, the job must not sit queued forever unseen
        failed = jobs.transition(job["job_id"], "failed", failure_reason=f"could not queue the job for launch: {exc}",
                                 bill=NO_CHARGE)
        job_ended(failed)
        raise JobError(503, "launch_queue_unavailable",
                       "the job could not be queued for launch and was marked failed; retry later",
                       [{"field": "job_id", "message": failed["job_id"]}]) from exc
    return job


def admit(job: dict[str, Any], *, jobs: Jobs, tenants: Tenants, sqs: Any, queue_url: str) -> dict[str, Any]:
    """Check the budget, then store (committing the estimate) and queue a resolved job: the one way
    a job is accepted. The check here words the refusal; the conditional write in Jobs.create
    enforces it against concurrent requests."""
    budget = budget_of(job["owner"], tenants=tenants)
    try:
        check_budget(job, budget)
        try:
            submit(job, jobs=jobs, sqs=sqs, queue_url=queue_url, limit_cents=cents(budget.limit))
        except OverBudget:
            check_budget(job, budget_of(job["owner"], tenants=tenants))  # words it with the spend as it is now
            raise JobError(402, "budget_exceeded", "another job took the rest of your budget meanwhile",
                           [{"field": "estimate.total", "message": "over budget"}]) from None
    except JobError as error:
        if error.code == "budget_exceeded":  # a queue that failed it took a job it had stored: no refusal
            job_refused()
        raise
    job_created()
    return job


def accept(request: TrainJobRequest | ContractJobRequest | EvaluateJobRequest, owner: str, *, catalog: Catalog,
           datasets: Datasets, data_bucket: str, s3: Any, jobs: Jobs, tenants: Tenants, sqs: Any, queue_url: str,
           job_id: str | None = None) -> dict[str, Any]:
    """A request to create a job, resolved and admitted: the accepted job, or JobError saying why not."""
    try:
        job = resolve(request, owner, catalog=catalog, datasets=datasets, data_bucket=data_bucket, s3=s3,
                      job_id=job_id)
    except JobError:
        job_refused()
        raise
    return admit(job, jobs=jobs, tenants=tenants, sqs=sqs, queue_url=queue_url)


def requested(detail: dict[str, Any], event_id: str | None, *, catalog: Catalog, datasets: Datasets, jobs: Jobs,
              tenants: Tenants, sqs: Any, bus: Any, data_bucket: str, s3: Any, queue_url: str) -> dict[str, Any]:
    """A job request from a pipeline ({"owner", "request": <POST /jobs body>}): the same checks as
    POST /jobs, then admitted. A refusal is answered on the bus, not retried: it would fail again.

    The job id derives from the event id, so a redelivered request finds its job instead of
    creating a second one (and publishes what the first delivery could not).
    """
    from pydantic import ValidationError

    owner, body = detail.get("owner"), detail.get("request")
    job_id = "r-" + hashlib.sha256(event_id.encode()).hexdigest()[:24] if event_id else None
    existing = jobs.get(job_id, owner) if job_id and isinstance(owner, str) else None
    if existing is not None:
        announce(existing, jobs=jobs, bus=bus)
        return {"accepted": True, "job_id": job_id}
    try:
        if not is_owner(owner):
            job_refused()
            raise invalid("owner", "a requested job names its owner: a tenant's owner value, as its jobs and "
                                   "models carry it (the encoded sub)")
        try:
            request = JOB_REQUEST.validate_python(body)
        except ValidationError:
            job_refused()
            raise
        job = accept(request, owner, catalog=catalog, datasets=datasets, data_bucket=data_bucket, s3=s3, jobs=jobs,
                     tenants=tenants, sqs=sqs, queue_url=queue_url, job_id=job_id)
    except ValidationError as exc:
        error = {"code": "invalid_request", "message": "the requested job has invalid fields",
                 "details": [describe_error(e) for e in exc.errors()]}
    except JobError as exc:
        error = {"code": exc.code, "message": exc.message, "details": exc.details}
    else:
        announce(job, jobs=jobs, bus=bus)
        return {"accepted": True, "job_id": job["job_id"]}
    bus.job_rejected(owner, body, error)
    return {"accepted": False, "error": error}
