"""template.yaml scanned by checkov (its own virtualenv, .venv-checkov, made by `make test`)."""

from __future__ import annotations

import json
import os
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKOV = ROOT / ".venv-checkov/bin/checkov"

# What the template must pass outright, never by a skip: encryption at rest, S3 public access
# blocked and versioned, DynamoDB point-in-time recovery.
REQUIRED = {
    "AWS::S3::Bucket": {"CKV_AWS_19", "CKV_AWS_21", "CKV_AWS_53", "CKV_AWS_54", "CKV_AWS_55", "CKV_AWS_56"},
    "AWS::DynamoDB::Table": {"CKV_AWS_28"},
}


@pytest.fixture(scope="module")
def scan() -> dict:
    assert CHECKOV.exists(), "run `make .venv-checkov/.installed` (make test does) to install checkov"
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    result = subprocess.run([str(CHECKOV), "-f", "template.yaml", "--framework", "cloudformation", "--output", "json"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    report = json.loads(result.stdout)
    return report if isinstance(report, dict) else report[0]


@pytest.mark.slow
def test_no_failed_check_and_every_skip_has_a_written_reason(scan):
    results = scan["results"]
    assert results["failed_checks"] == [], [(c["check_id"], c["resource"]) for c in results["failed_checks"]]
    assert scan["summary"]["parsing_errors"] == 0 and scan["summary"]["passed"] > 0
    for check in results["skipped_checks"]:
        reason = check["check_result"].get("suppress_comment") or ""
        assert len(reason.split()) >= 4, f"{check['check_id']} on {check['resource']} is skipped without a reason"


@pytest.mark.slow
def test_encryption_public_access_versioning_and_recovery_pass(scan):
    passed = defaultdict(set)
    for check in scan["results"]["passed_checks"]:
        passed[check["resource"]].add(check["check_id"])
    resources = [r for r in passed if r.split(".")[0] in REQUIRED]
    assert {r.split(".")[0] for r in resources} == set(REQUIRED)
    for resource in resources:
        missing = REQUIRED[resource.split(".")[0]] - passed[resource]
        assert not missing, f"{resource} does not pass {sorted(missing)}"
    skipped = {(c["resource"].split(".")[0], c["check_id"]) for c in scan["results"]["skipped_checks"]}
    assert not any(check in REQUIRED.get(kind, ()) for kind, check in skipped)
