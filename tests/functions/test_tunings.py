"""Tunings through the API, the launcher and the events function, on moto tables built from
template.yaml, with a fake of SageMaker's tuner (the local one runs real trials: tests/local)."""

import json
from decimal import Decimal

import pytest

from functions.events import app as events
from functions.launcher import app as launcher
from shared.contracts import Hyperparameters
from shared.pricing import bill, estimate_train
from shared.settings import TrainSettings, proxy_settings
from shared.shapes import SIZES
from shared.store import Jobs, Tenants
from tests.conftest import LambdaContext, client_error

DATASET = "ds-aaaaaaaaaaaa"


@pytest.fixture
def world(aws, api):
    ddb = aws.session.client("dynamodb")
    for dataset_id, owner in [(DATASET, "alice"), ("ds-bbbbbbbbbbbb", "bob")]:
        ddb.put_item(TableName=aws.env["DATASETS_TABLE"], Item={
            "dataset_id": {"S": dataset_id}, "owner": {"S": owner}, "status": {"S": "ready"},
            "s3_uri": {"S": f"s3://{aws.env['DATA_BUCKET']}/{owner}/datasets/{dataset_id}/data.jsonl"},
            "created_at": {"S": "2026-01-01T00:00:00Z"}, "name": {"S": "d"}})
    return aws


def _tuning(**fields):
    body = {"model": "base-debug", "dataset": DATASET, "settings": {"seq_len": 64, "steps_per_cycle": 200, "cycles": 2}}
    body.update(fields)
    return body


RANGES = {"lr": {"min": 1e-4, "max": 3e-3}, "turns": {"min": 1, "max": 2}}


def test_dry_run_prices_max_trials_of_the_dearest_trial_and_writes_nothing(world, api):
    status, quote = api("POST", "/tunings", _tuning(ranges=RANGES, max_trials=4, proxy_fraction=0.1),
                        query="dry_run=true")
    assert status == 200, quote
    # The dearest trial: turns at the top of its range, each turn cut to a tenth of its 400 steps.
    dearest = TrainSettings(seq_len=64, steps_per_cycle=200, cycles=2, turns=2)
    trial = estimate_train(proxy_settings(dearest, 0.1), SIZES["debug"])
    assert trial.training_tokens == 2 * 40 * 64
    estimate = quote["estimate"]
    assert estimate["job_type"] == "tuning" and estimate["training_tokens"] == 4 * trial.training_tokens
    assert Decimal(estimate["growth_fee"]) == 0
    assert Decimal(estimate["total"]) == max(
        (Decimal(4 * trial.training_tokens) / 1_000_000 * trial.usd_per_million_tokens).quantize(Decimal("0.01")),
        trial.minimum_charge)
    assert quote["tuning"]["max_trials"] == 4 and quote["allowed_to_proceed"] is True
    assert Jobs(session=world.session).list("alice") == []


def test_create_stores_queues_and_commits_the_price(world, api):
    status, tuning = api("POST", "/tunings", _tuning(ranges=RANGES))
    assert status == 201, tuning
    assert tuning["status"] == "queued" and tuning["tuning_id"].startswith("tune-") and tuning["trials"] == []
    assert tuning["ranges"] == {"lr": {"min": 1e-4, "max": 3e-3}, "turns": {"min": 1, "max": 2}}
    stored = Jobs(session=world.session).get(tuning["tuning_id"])
    assert stored["type"] == "tuning" and stored["owner"] == "alice"
    spent = Tenants(session=world.session).get("alice")["spent_cents"]
    assert spent == int(Decimal(tuning["estimate"]["total"]) * 100)
    messages = world.session.client("sqs").receive_message(QueueUrl=world.env["LAUNCH_QUEUE_URL"])["Messages"]
    assert [json.loads(m["Body"]) for m in messages] == [{"job_id": tuning["tuning_id"]}]
    # Listed and shown to its owner only.
    assert [t["tuning_id"] for t in api("GET", "/tunings")[1]["tunings"]] == [tuning["tuning_id"]]
    assert api("GET", f"/tunings/{tuning['tuning_id']}")[0] == 200
    assert api("GET", f"/tunings/{tuning['tuning_id']}", tenant="bob")[0] == 404
    assert api("GET", "/tunings", tenant="bob")[1]["tunings"] == []


def test_default_ranges_search_lr_and_turns(world, api):
    status, tuning = api("POST", "/tunings", _tuning())
    assert status == 201
    assert set(tuning["ranges"]) == {"lr", "turns"}


@pytest.mark.parametrize("fields, status, field, words", [
    ({"ranges": {"lr": {"min": 1e-3, "max": 1e-3}}}, 422, "ranges.lr", "empty"),
    ({"ranges": {"cycles": {"min": 5, "max": 2}}}, 422, "ranges.cycles", "empty"),
    ({"ranges": {"turns": {"min": 1, "max": 11}}}, 422, "ranges.turns", "outside its bounds"),
    ({"ranges": {"lr": {"min": 1e-4, "max": 2.0}}}, 422, "ranges.lr", "outside its bounds"),
    ({"ranges": {"steps_per_cycle": {"min": 0, "max": 100}}}, 422, "ranges.steps_per_cycle", "outside its bounds"),
    ({"ranges": {"dropout": {"min": 0.1, "max": 0.2}}}, 422, "ranges.dropout", "not a known field"),
    ({"ranges": {"turns": {"min": 1.5, "max": 2}}}, 422, "ranges.turns.min", ""),
    ({"ranges": {}}, 422, "ranges", "at least one"),
    ({"max_trials": 0}, 422, "max_trials", ""),
    ({"proxy_fraction": 0.9}, 422, "proxy_fraction", ""),
    ({"settings": {"seq_len": 4096}}, 422, "settings.seq_len", "context length"),
    ({"settings": {"train_steps": 100}}, 422, "settings.train_steps", "train_steps"),
    ({"max_trials": 50, "budget_usd": 0.01}, 422, "max_trials", "at most"),
    ({"model": "base-nope"}, 404, "model", ""),
])
def test_bad_tunings_are_refused_naming_the_field_and_write_nothing(world, api, fields, status, field, words):
    code, body = api("POST", "/tunings", _tuning(**fields))
    assert code == status, body
    details = body["error"]["details"]
    assert any(d["field"] == field for d in details), details
    assert words in body["error"]["message"] + " ".join(d["message"] for d in details)
    assert Jobs(session=world.session).list("alice") == []


def test_more_trials_than_the_tenants_budget_allow_is_a_402(world, api, monkeypatch):
    monkeypatch.setenv("FUSION_DEFAULT_BUDGET_USD", "0.01")
    code, body = api("POST", "/tunings", _tuning(ranges=RANGES, max_trials=50,
                                                 settings={"seq_len": 512, "steps_per_cycle": 1000}))
    assert code == 402 and body["error"]["code"] == "budget_exceeded", body
    assert Jobs(session=world.session).list("alice") == []


class FakeTuner:
    """The tuner's calls with SageMaker's shapes: trials are set by the test."""

    def __init__(self):
        self.created: dict[str, dict] = {}
        self.stopped: list[str] = []
        self.trials: list[dict] = []
        self.steps: dict[str, int] = {}

    def create_hyper_parameter_tuning_job(self, **request):
        name = request["HyperParameterTuningJobName"]
        if name in self.created:
            raise client_error("ResourceInUse", "exists", "CreateHyperParameterTuningJob")
        self.created[name] = request

    def describe_hyper_parameter_tuning_job(self, HyperParameterTuningJobName):
        if HyperParameterTuningJobName not in self.created:
            raise client_error("ResourceNotFound", "Amazon SageMaker can't find a tuning job", "Describe")
        return {"HyperParameterTuningJobName": HyperParameterTuningJobName, "HyperParameterTuningJobStatus": "Completed"}

    def stop_hyper_parameter_tuning_job(self, HyperParameterTuningJobName):
        self.stopped.append(HyperParameterTuningJobName)

    def list_training_jobs_for_hyper_parameter_tuning_job(self, HyperParameterTuningJobName, MaxResults, NextToken=None):
        start = int(NextToken or 0)
        page = {"TrainingJobSummaries": self.trials[start:start + 2]}  # pages of two: the reader must follow them
        if start + 2 < len(self.trials):
            page["NextToken"] = str(start + 2)
        return page

    def describe_training_job(self, TrainingJobName):
        return {"TrainingJobName": TrainingJobName,
                "FinalMetricDataList": [{"MetricName": "step", "Value": float(self.steps.get(TrainingJobName, 0))}]}


def _trial(name, status, lr, turns, perplexity):
    summary = {"TrainingJobName": name, "TrainingJobArn": f"arn:{name}", "CreationTime": 0, "TrainingJobStatus": status,
               "TunedHyperParameters": {"lr": str(lr), "turns": str(turns)}}
    if perplexity is not None:
        summary["FinalHyperParameterTuningJobObjectiveMetric"] = {"MetricName": "heldout_perplexity", "Value": perplexity}
    return summary


def _launch(tuning_id):
    result = launcher.lambda_handler({"Records": [{
        "messageId": "m", "receiptHandle": "r", "body": json.dumps({"job_id": tuning_id}),
        "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "0", "SenderId": "s",
                       "ApproximateFirstReceiveTimestamp": "0"},
        "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q", "awsRegion": "us-east-1"}]}, LambdaContext())
    assert result["batchItemFailures"] == []


def _event(name, status):
    return {"version": "0", "id": f"{name}-{status}", "detail-type": "SageMaker HyperParameter Tuning Job State Change",
            "source": "aws.sagemaker", "account": "123456789012", "time": "2026-01-01T00:00:00Z",
            "region": "us-east-1", "resources": [],
            "detail": {"HyperParameterTuningJobName": name, "HyperParameterTuningJobStatus": status}}


@pytest.fixture
def tuner(world, monkeypatch):
    fake = FakeTuner()
    jobs, _, bus = launcher._clients()
    monkeypatch.setattr(launcher, "_clients", lambda: (jobs, fake, bus))
    clients = {**events._clients(), "sagemaker": fake}
    monkeypatch.setattr(events, "_clients", lambda: clients)
    return fake


def test_a_tuning_launches_ends_ranked_billed_and_promotes(world, api, tuner):
    _, tuning = api("POST", "/tunings", _tuning(ranges=RANGES, max_trials=3, proxy_fraction=0.1))
    tuning_id, name = tuning["tuning_id"], f"fusion-{tuning['tuning_id']}"
    _launch(tuning_id)
    request = tuner.created[name]
    config = request["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Bayesian" and config["TrainingJobEarlyStoppingType"] == "Auto"
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Minimize", "MetricName": "heldout_perplexity"}
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 3, "MaxParallelTrainingJobs": 2}
    assert config["ParameterRanges"]["ContinuousParameterRanges"][0]["ScalingType"] == "Logarithmic"
    definition = request["TrainingJobDefinition"]
    assert {"Name": "heldout_perplexity", "Regex": "heldout_perplexity=([0-9.eE+-]+)"} in \
        definition["AlgorithmSpecification"]["MetricDefinitions"]
    assert definition["OutputDataConfig"]["CompressionType"] == "NONE"  # trials upload their model uncompressed
    assert "CheckpointConfig" not in definition  # trials must not resume from each other's checkpoints
    # What a trial's container reads: the fixed settings, the tuner's values, and the proxy.
    trial_run = Hyperparameters.parse({**definition["StaticHyperParameters"], "lr": "0.0005", "turns": "2"})
    assert trial_run.run_settings().train_steps == 40 and trial_run.run_settings().turns == 2
    assert trial_run.settings.lr == 0.0005
    assert Jobs(session=world.session).get(tuning_id)["status"] == "launching"

    assert events.lambda_handler(_event(name, "InProgress"), LambdaContext())["status"] == "running"
    tuner.trials = [_trial(f"{name}-001-aaaaaaaa", "Completed", 1e-3, 1, 30.5),
                    _trial(f"{name}-002-bbbbbbbb", "Stopped", 1e-4, 2, 80.0),
                    _trial(f"{name}-003-cccccccc", "Completed", 5e-4, 2, 25.25),
                    _trial(f"{name}-004-dddddddd", "Failed", 3e-3, 1, None)]
    tuner.steps[f"{name}-002-bbbbbbbb"] = 15
    key = f"jobs/{tuning_id}/trials/{name}-003-cccccccc/output/model/metrics.json"
    cycles = [{"turn": 1, "cycle": c, "steps": 20, "loss": 3.0, "heldout_loss": 3.3, "perplexity": p, "tokens": 1}
              for c, p in [(1, 40.0), (2, 25.25)]]
    world.session.client("s3").put_object(Bucket=world.env["ARTIFACTS_BUCKET"], Key=key,
                                          Body=json.dumps(_metrics(tuning_id, cycles)).encode())
    assert events.lambda_handler(_event(name, "Completed"), LambdaContext())["status"] == "completed"
    assert events.lambda_handler(_event(name, "Completed"), LambdaContext()) == {"changed": False}

    _, ended = api("GET", f"/tunings/{tuning_id}")
    assert [t["name"][-12:] for t in ended["trials"]] == ["003-cccccccc", "001-aaaaaaaa", "002-bbbbbbbb", "004-dddddddd"]
    best, second, stopped, failed = ended["trials"]
    assert ended["best_trial"] == best["name"] and best["rank"] == 1 and best["curve"] == [40.0, 25.25]
    assert best["tokens_trained"] == 2 * 40 * 64 and second["tokens_trained"] == 40 * 64
    assert stopped["early_stopped"] and stopped["tokens_trained"] == 15 * 64  # in proportion to what it trained
    assert failed["tokens_trained"] == 0 and Decimal(failed["cost"]) == 0
    full = TrainSettings(seq_len=64, steps_per_cycle=200, cycles=2, turns=2, lr=5e-4)
    assert Decimal(best["full_run"]["total"]) == estimate_train(full, SIZES["debug"]).total
    tokens = (2 * 40 + 40 + 15) * 64
    from shared.pricing import Estimate

    assert Decimal(ended["bill"]) == bill(Estimate.model_validate(ended["estimate"]), tokens)
    assert Decimal(ended["bill"]) <= Decimal(ended["estimate"]["total"])
    assert sum(Decimal(t["cost"]) for t in ended["trials"]).quantize(Decimal("0.01")) <= Decimal(ended["bill"])

    # Promote the best: an ordinary train job with its settings, admitted and queued, with its lineage.
    code, job = api("POST", f"/tunings/{tuning_id}/promote", {"output_name": "tuned-v1"})
    assert code == 201, job
    assert job["type"] == "train" and job["status"] == "queued"
    assert job["settings"]["lr"] == 5e-4 and job["settings"]["turns"] == 2 and job["settings"]["output_name"] == "tuned-v1"
    stored = Jobs(session=world.session).get(job["job_id"])
    assert stored["tuning_id"] == tuning_id and stored["trial"] == best["name"]
    assert api("POST", f"/tunings/{tuning_id}/promote", {"trial": stopped["name"]})[0] == 422
    assert api("POST", f"/tunings/{tuning_id}/promote", {}, tenant="bob")[0] == 404


def test_promoting_before_any_trial_completed_is_a_409(world, api, tuner):
    _, tuning = api("POST", "/tunings", _tuning(ranges=RANGES))
    code, body = api("POST", f"/tunings/{tuning['tuning_id']}/promote", {})
    assert code == 409 and body["error"]["code"] == "no_trial"


def test_cancel_a_launched_tuning_stops_the_tuner(world, api, tuner, monkeypatch):
    from functions.api import context

    client = context.client
    monkeypatch.setattr(context, "client", lambda service: tuner if service == "sagemaker" else client(service))
    _, tuning = api("POST", "/tunings", _tuning(ranges=RANGES))
    _launch(tuning["tuning_id"])
    code, body = api("POST", f"/tunings/{tuning['tuning_id']}/cancel")
    assert code == 200 and body["status"] == "cancelling"
    assert tuner.stopped == [f"fusion-{tuning['tuning_id']}"]


def test_the_reconciler_ends_a_tuning_whose_event_was_lost(world, api, tuner, monkeypatch):
    from functions.reconciler import app as reconciler

    _, tuning = api("POST", "/tunings", _tuning(ranges=RANGES))
    _launch(tuning["tuning_id"])
    name = f"fusion-{tuning['tuning_id']}"
    tuner.trials = [_trial(f"{name}-001-aaaaaaaa", "Completed", 1e-3, 1, 30.5)]
    clients = {**reconciler._clients(), "sagemaker": tuner}
    monkeypatch.setattr(reconciler, "_clients", lambda: clients)
    summary = reconciler.reconcile()
    assert summary["moved"] == [tuning["tuning_id"]] and summary["not_created"] == 0
    ended = Jobs(session=world.session).get(tuning["tuning_id"])
    assert ended["status"] == "completed" and Decimal(ended["bill"]) > 0


def _metrics(job_id, cycles):
    from shared.shapes import grown_config

    config = grown_config(SIZES["debug"])
    return {"job_id": job_id, "job_type": "train", "config": config.model_dump(mode="json"),
            "parameters_before": 1, "parameters_after": 1, "depth_before": 1, "depth_after": 1,
            "training_tokens": 1, "tokens_processed": 1, "tokens_per_second": 1.0, "wall_time_s": 1.0,
            "cycles": cycles, "final_perplexity": cycles[-1]["perplexity"], "sequences_per_step": 8}
