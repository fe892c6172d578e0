"""Checkpoints expire; a job's metrics log does not: it is kept beside the job's outputs when the
job ends, and GET /jobs/{id}/metrics reads it there once the checkpoint folder is gone."""

from __future__ import annotations

import json

import pytest

from local.resources import load_template
from shared.outputs import (
    CHECKPOINT_RETENTION_DAYS,
    CHECKPOINTS_PREFIX,
    checkpoint_prefix,
    kept_metrics_log_key,
    metrics_log_key,
)
from tests.conftest import deliver, write_metrics
from tests.trust.conftest import launch, stored, train

STEP = {"kind": "step", "turn": 1, "cycle": 1, "lr": 1e-4, "time": "2026-01-01T00:00:00+00:00"}


def test_the_lifecycle_rule_expires_the_checkpoint_folders_and_nothing_else():
    rules = load_template()["Resources"]["ArtifactsBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    expiring = [r for r in rules if "ExpirationInDays" in r]
    assert [(r["Prefix"], r["ExpirationInDays"]) for r in expiring] == [(CHECKPOINTS_PREFIX, CHECKPOINT_RETENTION_DAYS)]
    assert checkpoint_prefix("j").startswith(CHECKPOINTS_PREFIX) and metrics_log_key("j").startswith(CHECKPOINTS_PREFIX)
    assert not kept_metrics_log_key("j").startswith(CHECKPOINTS_PREFIX)
    for bucket in ("ArtifactsBucket", "DataBucket"):
        rules = load_template()["Resources"][bucket]["Properties"]["LifecycleConfiguration"]["Rules"]
        assert [r["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] for r in rules
                if "AbortIncompleteMultipartUpload" in r] == [7], bucket


@pytest.mark.parametrize("end", ["Completed", "Failed", "Stopped"])
def test_an_ended_jobs_curve_outlives_its_checkpoints(tenants, api, sagemaker, end):
    job_id = api("POST", "/jobs", train(train_steps=20))[1]["job_id"]
    assert launch(job_id) == []
    s3, bucket = tenants.session.client("s3"), tenants.env["ARTIFACTS_BUCKET"]
    log = "".join(json.dumps({**STEP, "step": s, "loss": 5.0 - s / 10}) + "\n" for s in (10, 20))
    s3.put_object(Bucket=bucket, Key=metrics_log_key(job_id), Body=log.encode())
    if end == "Completed":
        write_metrics(tenants, stored(tenants, job_id))
    deliver(tenants, job_id, "InProgress", end)
    assert stored(tenants, job_id)["status"] in ("completed", "failed", "cancelled")
    assert s3.get_object(Bucket=bucket, Key=kept_metrics_log_key(job_id))["Body"].read().decode() == log
    s3.delete_object(Bucket=bucket, Key=metrics_log_key(job_id))  # the lifecycle rule's doing
    status, curve = api("GET", f"/jobs/{job_id}/metrics")
    assert status == 200 and [p["step"] for p in curve["steps"]] == [10, 20]


def test_a_job_that_logged_nothing_ends_all_the_same(tenants, api, sagemaker):
    job_id = api("POST", "/jobs", train(train_steps=20))[1]["job_id"]
    assert launch(job_id) == []
    deliver(tenants, job_id, "InProgress", "Failed", reason="AlgorithmError: boom")
    assert stored(tenants, job_id)["status"] == "failed"
    status, curve = api("GET", f"/jobs/{job_id}/metrics")
    assert status == 200 and curve["steps"] == []
