"""Cancel (queued, launching, running; idempotent; 409 once ended) and per-tenant budgets."""

from __future__ import annotations

from decimal import Decimal

import pytest

from shared.pricing import Estimate, bill
from shared.store import Jobs, Tenants
from shared.training_jobs import training_job_name

from tests.conftest import client_error, deliver, write_metrics

from .conftest import launch, set_budget, stored, train, write_progress


def _create(api, owner="alice", **hyper):
    status, job = api("POST", "/jobs", train(owner, **hyper), tenant=owner)
    assert status == 201, job
    return job


def test_a_queued_job_is_cancelled_before_launch_and_never_launched(tenants, api, sagemaker, observer):
    job = _create(api)
    status, cancelled = api("POST", f"/jobs/{job['job_id']}/cancel")
    assert status == 200 and cancelled["status"] == "cancelled" and cancelled["bill"] == "0.00"
    assert launch(job["job_id"]) == [] and sagemaker.created == {}
    assert stored(tenants, job["job_id"])["status"] == "cancelled"
    assert [(t, d["status"]) for t, d in observer()] == [("Fusion Job State Change", "cancelled")]


def test_a_running_job_is_stopped_and_billed_for_the_tokens_it_trained(tenants, api, sagemaker):
    job = _create(api)
    launch(job["job_id"])
    deliver(tenants, job["job_id"], "InProgress")
    status, cancelling = api("POST", f"/jobs/{job['job_id']}/cancel")
    assert status == 200 and cancelling["status"] == "cancelling"
    assert sagemaker.stopped == [training_job_name(job["job_id"])]
    tokens = job["estimate"]["training_tokens"] // 4
    write_progress(tenants, job["job_id"], tokens)
    deliver(tenants, job["job_id"], "Stopping", "Stopped", "InProgress")
    ended = api("GET", f"/jobs/{job['job_id']}")[1]
    expected = bill(Estimate.model_validate(job["estimate"]), tokens)
    assert ended["status"] == "cancelled" and Decimal(ended["bill"]) == expected
    assert Decimal("0") < expected < Decimal(job["estimate"]["total"])


def test_cancel_is_idempotent(tenants, api, sagemaker):
    job = _create(api)
    launch(job["job_id"])
    first = api("POST", f"/jobs/{job['job_id']}/cancel")
    second = api("POST", f"/jobs/{job['job_id']}/cancel")
    assert first[0] == second[0] == 200 and first[1]["status"] == second[1]["status"] == "cancelling"
    deliver(tenants, job["job_id"], "Stopped")
    assert api("POST", f"/jobs/{job['job_id']}/cancel")[1]["status"] == "cancelled"


@pytest.mark.parametrize("end, status", [("Completed", "completed"), ("Failed", "failed")])
def test_cancelling_an_ended_job_is_a_409(tenants, api, sagemaker, end, status):
    job = _create(api)
    launch(job["job_id"])
    write_metrics(tenants, stored(tenants, job["job_id"]))
    deliver(tenants, job["job_id"], end, reason="AlgorithmError: boom")
    code, body = api("POST", f"/jobs/{job['job_id']}/cancel")
    assert code == 409 and body["error"]["code"] == "job_ended" and status in body["error"]["message"]
    assert stored(tenants, job["job_id"])["status"] == status and sagemaker.stopped == []


def test_cancel_while_launching_ends_it_without_a_training_job(tenants, api, sagemaker):
    """The launcher took the job but was throttled; the cancel comes before its retry."""
    job = _create(api)
    sagemaker.errors.append(client_error("ThrottlingException"))
    assert launch(job["job_id"]) == ["msg-0"]
    assert api("POST", f"/jobs/{job['job_id']}/cancel")[1]["status"] == "cancelling"
    assert launch(job["job_id"], receive_count=2) == []
    assert sagemaker.created == {} and stored(tenants, job["job_id"])["status"] == "cancelled"


def test_cancel_during_creation_stops_the_new_training_job(tenants, api, sagemaker):
    job = _create(api)
    create = sagemaker.create_training_job

    def create_while_cancelled(**request):
        create(**request)
        Jobs(session=tenants.session).annotate(job["job_id"], ("launching",), status="cancelling")

    sagemaker.create_training_job = create_while_cancelled
    launch(job["job_id"])
    assert sagemaker.stopped == [training_job_name(job["job_id"])]


def test_unknown_job_cancel_is_404(tenants, api, sagemaker):
    assert api("POST", "/jobs/nope/cancel")[0] == 404
    assert api("POST", "/jobs/NOT_AN_ID/cancel")[0] == 404


# --- budgets ----------------------------------------------------------------------------------


def test_estimate_says_whether_the_job_fits(tenants, api, monkeypatch):
    monkeypatch.setenv("FUSION_DEFAULT_BUDGET_USD", "1.00")
    status, quote = api("POST", "/jobs/estimate", train())
    total = Decimal(quote["estimate"]["total"])
    assert status == 200 and quote["allowed_to_proceed"] is True and quote["estimate"]["allowed_to_proceed"] is True
    assert quote["budget"] == {"limit": "1.00", "spent": "0.00", "remaining": "1.00"}
    _create(api)
    quote = api("POST", "/jobs", train(), query="dry_run=true")[1]
    assert Decimal(quote["budget"]["spent"]) == total and quote["allowed_to_proceed"] is (2 * total <= 1)
    assert Decimal(quote["estimate"]["remaining_budget"]) == Decimal("1.00") - total


def test_a_job_past_the_limit_is_refused_before_anything_is_written(tenants, api, sagemaker, monkeypatch):
    monkeypatch.setenv("FUSION_DEFAULT_BUDGET_USD", "1.00")
    first = _create(api)  # 0.62 of 1.00
    status, body = api("POST", "/jobs", train())
    assert status == 402 and body["error"]["code"] == "budget_exceeded"
    assert "0.38" in body["error"]["message"] and "1.00" in body["error"]["message"]
    assert [j["job_id"] for j in Jobs(session=tenants.session).list("alice")] == [first["job_id"]]
    assert api("POST", "/jobs/estimate", train())[1]["allowed_to_proceed"] is False
    assert _create(api, "bob")["owner"] == "bob"  # another tenant's budget is their own


def test_spend_counts_bills_of_ended_jobs_not_their_estimates(tenants, api, sagemaker, monkeypatch):
    monkeypatch.setenv("FUSION_DEFAULT_BUDGET_USD", "1.00")
    job = _create(api)
    launch(job["job_id"])
    api("POST", f"/jobs/{job['job_id']}/cancel")
    deliver(tenants, job["job_id"], "Stopped")  # no progress: pays its growth fee only
    billed = Decimal(stored(tenants, job["job_id"])["bill"])
    quote = api("POST", "/jobs/estimate", train())[1]
    assert Decimal(quote["budget"]["spent"]) == billed < Decimal(job["estimate"]["total"])
    assert _create(api)["status"] == "queued"


def test_a_tenant_record_overrides_the_default(tenants, api, monkeypatch):
    monkeypatch.setenv("FUSION_DEFAULT_BUDGET_USD", "1000")
    set_budget(tenants, "alice", "0.50")
    assert api("POST", "/jobs", train())[0] == 402
    assert api("POST", "/jobs/estimate", train())[1]["budget"]["limit"] == "0.50"
    assert api("POST", "/jobs", train("bob"), tenant="bob")[0] == 201


def test_concurrent_jobs_cannot_both_pass_the_limit(tenants, api):
    """Two requests checked against the same remaining budget (0.62 + 0.62 > 1.00): the counter's
    conditional write lets only the first be stored."""
    from shared.admission import resolve, submit
    from shared.budgets import budget_of
    from shared.settings import JOB_REQUEST
    from shared.store import Catalog, Datasets, OverBudget, cents

    tenants_table = Tenants(session=tenants.session)
    set_budget(tenants, "alice", "1.00")
    priced = [resolve(JOB_REQUEST.validate_python(train()), "alice", catalog=Catalog(session=tenants.session),
                      datasets=Datasets(session=tenants.session), data_bucket=tenants.env["DATA_BUCKET"],
                  s3=tenants.session.client("s3"))
              for _ in range(2)]
    both_saw = budget_of("alice", tenants=tenants_table)
    assert all(both_saw.allows(Decimal(job["estimate"]["total"])) for job in priced)
    sqs, queue = tenants.session.client("sqs"), tenants.env["LAUNCH_QUEUE_URL"]
    submit(priced[0], jobs=Jobs(session=tenants.session), sqs=sqs, queue_url=queue, limit_cents=cents(both_saw.limit))
    with pytest.raises(OverBudget):
        submit(priced[1], jobs=Jobs(session=tenants.session), sqs=sqs, queue_url=queue,
               limit_cents=cents(both_saw.limit))
    assert [j["job_id"] for j in Jobs(session=tenants.session).list("alice")] == [priced[0]["job_id"]]
    assert tenants_table.get("alice")["spent_cents"] == cents(priced[0]["estimate"]["total"])


def test_the_spend_counter_follows_each_job_to_its_bill(tenants, api, sagemaker):
    job = _create(api)
    spent = lambda: Tenants(session=tenants.session).get("alice")["spent_cents"]
    assert spent() == int(Decimal(job["estimate"]["total"]) * 100)
    api("POST", f"/jobs/{job['job_id']}/cancel")
    assert spent() == 0
