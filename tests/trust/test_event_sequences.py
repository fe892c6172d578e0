"""Any sequence of duplicated, reordered or replayed SageMaker events for a set of jobs ends in the
same statuses, catalog and bills as the events in their true order."""

from __future__ import annotations

import json
import os
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from shared.admission import resolve
from shared.settings import JOB_REQUEST
from shared.state_changes import model_id_for
from shared.store import Catalog, Datasets, Jobs, Tenants, cents
from shared.training_jobs import training_job_name

from tests.conftest import deliver, write_metrics

from .conftest import dataset_id, write_progress

# What really happened to a job, as SageMaker reports it in order.
HISTORIES = {
    "completes": ["InProgress", "Completed"],
    "fails": ["InProgress", "Failed"],
    "is stopped": ["InProgress", "Stopping", "Stopped"],
    "is stopped before it ran": ["Stopping", "Stopped"],
    "completes while being stopped": ["InProgress", "Stopping", "Completed"],
}


ROOT = Path(__file__).resolve().parents[2]
STEPS_PER_CYCLE = 50
# turns x cycles x steps_per_cycle x seq_len, with the defaults 1, 6 and 256 for the others.
TRAINING_TOKENS = 1 * 6 * STEPS_PER_CYCLE * 256
STOPPED_TOKENS = TRAINING_TOKENS // 3  # what a stopped job's progress.json says it trained


def _launched(aws, story: str) -> dict:
    request = JOB_REQUEST.validate_python({"type": "train", "model": "base-debug", "dataset": dataset_id("alice"),
                                           "hyperparams": {"steps_per_cycle": STEPS_PER_CYCLE}})
    job = resolve(request, "alice", catalog=Catalog(session=aws.session),
                  datasets=Datasets(session=aws.session), data_bucket=aws.env["DATA_BUCKET"],
                  s3=aws.session.client("s3"))
    jobs = Jobs(session=aws.session)
    jobs.create(job, limit_cents=10**9)  # commits its estimate to alice's spend
    jobs.transition(job["job_id"], "launching", training_job_name=training_job_name(job["job_id"]))
    if "Completed" in HISTORIES[story]:
        write_metrics(aws, job)
    if "Stopped" in HISTORIES[story]:
        write_progress(aws, job["job_id"], STOPPED_TOKENS)
    return job


def _priced_by_hand(job: dict, tokens: int) -> str:
    """The bill by the pricing rule, worked from the raw price table rather than by shared.pricing:
    the tier is the first whose max_parameters holds the trained model; tokens x its price per
    million, plus the growth fee per million parameters added, rounded half up to cents once; never
    below the minimum charge."""
    table = json.loads(Path(os.environ.get("FUSION_PRICES", ROOT / "shared/prices.json")).read_text())
    parameters, added = job["estimate"]["parameters"], job["estimate"]["growth_parameters"]
    tier = next(t for t in table["tiers"] if t["max_parameters"] is None or parameters <= t["max_parameters"])
    exact = (Decimal(tokens) * Decimal(tier["usd_per_million_tokens"])
             + Decimal(added) * Decimal(table["growth_fee_per_million_parameters"])) / Decimal(10**6)
    return str(max(exact.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP), Decimal(table["minimum_charge_usd"])))


def _expected(job: dict, story: str) -> tuple:
    assert job["estimate"]["training_tokens"] == TRAINING_TOKENS
    end = HISTORIES[story][-1]
    if end == "Completed":
        return ("completed", _priced_by_hand(job, TRAINING_TOKENS), model_id_for(job["job_id"]))
    if end == "Failed":
        return ("failed", "0.00", None)
    return ("cancelled", _priced_by_hand(job, STOPPED_TOKENS), None)


@st.composite
def deliveries(draw):
    stories = draw(st.lists(st.sampled_from(sorted(HISTORIES)), min_size=1, max_size=3))
    events = [(i, status) for i, story in enumerate(stories) for status in HISTORIES[story]]
    replays = draw(st.lists(st.sampled_from(events), max_size=6))
    order = draw(st.permutations(events + replays))
    return stories, order


@pytest.mark.slow
def test_any_delivery_order_ends_in_the_same_statuses_catalog_and_bills(tenants):
    tried: list[int] = []

    @given(case=deliveries())
    @settings(max_examples=30, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    def delivered_in_any_order(case):
        tried.append(len(case[1]))
        _check(tenants, case)

    delivered_in_any_order()
    print(f"\nhypothesis: {len(tried)} event sequences tried, {sum(tried)} events delivered")
    assert len(tried) >= 20


def _check(tenants, case) -> None:
    stories, order = case
    jobs = [_launched(tenants, story) for story in stories]
    for index, status in order:
        deliver(tenants, jobs[index]["job_id"], status, reason="AlgorithmError: out of memory")
    store, catalog = Jobs(session=tenants.session), Catalog(session=tenants.session)
    for job, story in zip(jobs, stories):
        now = store.get(job["job_id"])
        assert (now["status"], now["bill"], now["output_model_id"]) == _expected(job, story), (story, order)
        model = catalog.get(model_id_for(job["job_id"]), "alice")
        assert (model is not None) == (now["status"] == "completed")
        if model is not None:
            assert Decimal(model["cost"]) == Decimal(now["bill"]) and model["job_id"] == job["job_id"]
        if now["status"] == "failed":
            assert now["failure_reason"] == "AlgorithmError: out of memory"
        assert now["published_status"] == now["status"]  # every end state was announced
    # The spend counter settled once per job, whatever was delivered twice: the sum of the bills.
    spent = Tenants(session=tenants.session).get("alice")["spent_cents"]
    assert spent == sum(cents(j["bill"]) for j in store.list("alice"))
