"""What a job's life leaves for an operator: the EMF metric records the functions print (read as
CloudWatch would), log lines keyed by the job, and X-Ray tracing with the roles to write traces."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from local.resources import function_environment, load_template
from shared.telemetry import metrics
from tests.conftest import LambdaContext, client_error, deliver, write_metrics

from .conftest import launch, set_budget, stored, train, write_progress

NAMESPACE = function_environment(load_template())["POWERTOOLS_METRICS_NAMESPACE"]


@pytest.fixture(autouse=True)
def _nothing_counted_yet():
    metrics.clear_metrics()  # what earlier cases counted outside a handler is not this case's


def records(capsys) -> list[dict]:
    """Each EMF record printed since the last call: {"namespace", "dimensions", metric: value(s)}."""
    out = []
    for line in capsys.readouterr().out.splitlines():
        try:
            blob = json.loads(line)
        except ValueError:
            continue
        if not isinstance(blob, dict) or "_aws" not in blob:
            continue
        [directive] = blob["_aws"]["CloudWatchMetrics"]
        record = {"namespace": directive["Namespace"],
                  "dimensions": {name: blob[name] for names in directive["Dimensions"] for name in names}}
        record.update({m["Name"]: blob[m["Name"]] for m in directive["Metrics"]})
        out.append(record)
    return out


def total(found: list[dict], name: str, **dimensions: str) -> float:
    """The sum of a metric over the records (with these dimensions), as CloudWatch adds them up."""
    values = []
    for record in found:
        if name in record and dimensions.items() <= record["dimensions"].items():
            value = record[name]
            values += value if isinstance(value, list) else [value]
    return sum(values)


def test_a_created_job_is_counted_in_the_templates_namespace(tenants, api, capsys):
    records(capsys)
    status, job = api("POST", "/jobs", train())
    assert status == 201
    found = records(capsys)
    assert total(found, "JobsCreated") == 1 and total(found, "JobsRefused") == 0
    assert {r["namespace"] for r in found} == {NAMESPACE} and found[0]["dimensions"]["service"] == "fusion"


def test_a_refused_job_is_counted_and_not_created(tenants, api, capsys):
    set_budget(tenants, "alice", "0.00")
    records(capsys)
    assert api("POST", "/jobs", train())[0] == 402
    assert api("POST", "/jobs", {**train(), "model": "no-such-model"})[0] == 404
    assert api("POST", "/jobs/estimate", train())[0] == 200  # an estimate refuses nothing
    found = records(capsys)
    assert total(found, "JobsRefused") == 2 and total(found, "JobsCreated") == 0


def test_a_launch_and_a_retried_launch_are_counted(tenants, api, sagemaker, capsys):
    first, second = (api("POST", "/jobs", train())[1] for _ in range(2))
    sagemaker.errors = [client_error("ThrottlingException", "Rate exceeded")]
    records(capsys)
    assert launch(first["job_id"]) == ["msg-0"]  # throttled: the message comes back
    assert launch(first["job_id"], second["job_id"], receive_count=2) == []
    found = records(capsys)
    assert total(found, "LaunchRetries") == 1 and total(found, "JobsLaunched") == 2


def test_each_end_is_counted_once_by_status_with_its_bill(tenants, api, sagemaker, capsys):
    completed, cancelled, failed = (api("POST", "/jobs", train())[1] for _ in range(3))
    for job in (completed, cancelled, failed):
        launch(job["job_id"])
    write_metrics(tenants, completed)
    write_progress(tenants, cancelled["job_id"], cancelled["estimate"]["training_tokens"] // 3)
    records(capsys)
    deliver(tenants, completed["job_id"], "InProgress", "Completed", "Completed")  # a duplicate end event
    api("POST", f"/jobs/{cancelled['job_id']}/cancel")
    deliver(tenants, cancelled["job_id"], "Stopped")
    deliver(tenants, failed["job_id"], "Failed", reason="AlgorithmError: out of memory")
    found = records(capsys)
    for job, status in ((completed, "completed"), (cancelled, "cancelled"), (failed, "failed")):
        billed = stored(tenants, job["job_id"])["bill"]
        assert total(found, "JobsEnded", status=status) == 1
        assert Decimal(str(total(found, "DollarsBilled", status=status))) == Decimal(billed)
    assert Decimal(stored(tenants, completed["job_id"])["bill"]) > 0 < Decimal(stored(tenants, cancelled["job_id"])["bill"])
    assert total(found, "JobsEnded") == 3


def test_a_job_cancelled_before_launch_ends_cancelled_unbilled(tenants, api, capsys):
    job = api("POST", "/jobs", train())[1]
    records(capsys)
    assert api("POST", f"/jobs/{job['job_id']}/cancel")[1]["status"] == "cancelled"
    found = records(capsys)
    assert total(found, "JobsEnded", status="cancelled") == 1 and total(found, "DollarsBilled", status="cancelled") == 0


def test_every_function_traces_to_xray_and_its_role_may_write_the_traces():
    from local.sam import transformed

    resources = transformed()["Resources"]
    from local.resources import load_template

    functions = {name: r for name, r in resources.items() if r["Type"] == "AWS::Lambda::Function"}
    declared = [r for r in load_template()["Resources"].values() if r["Type"] == "AWS::Serverless::Function"]
    assert len(functions) == len(declared) == 6
    for name, function in functions.items():
        assert function["Properties"]["TracingConfig"] == {"Mode": "Active"}, name
        role = resources[function["Properties"]["Role"]["Fn::GetAtt"][0]]
        assert "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess" in role["Properties"]["ManagedPolicyArns"], name


def test_each_launch_message_logs_under_its_own_job_id(tenants, monkeypatch, request):
    """Whatever the domain logs while it handles a message names that message's job, without
    being told (Logger.append_keys), and the key is gone once the batch is done."""
    import io
    import logging

    from functions.launcher import app as launcher

    lines = io.StringIO()
    service = logging.getLogger(launcher.logger.service)
    # The level the Logger was built with depends on who imported the function first (a local
    # stack builds them at WARNING); this case is about the keys, so it logs at INFO whatever it was.
    request.addfinalizer(lambda level=service.level: service.setLevel(level))
    service.setLevel(logging.INFO)
    [handler] = service.handlers
    monkeypatch.setattr(handler, "stream", lines)
    monkeypatch.setattr(launcher, "launch_job", lambda job_id, attempt, **_: launcher.logger.info("probe") or "started")
    assert launch("job-a", "job-b") == []
    logged = [json.loads(line) for line in lines.getvalue().splitlines()]
    probes = [entry for entry in logged if entry["message"] == "probe"]
    assert [entry.get("job_id") for entry in probes] == ["job-a", "job-b"]
    assert all(entry["function_name"] == LambdaContext().function_name for entry in probes)  # the Lambda context too
    assert "job_id" not in launcher.logger.get_current_keys()
