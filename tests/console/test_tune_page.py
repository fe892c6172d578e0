"""The console's Tune page in a real browser: a live price, a tuning started once, and a finished
tuning's ranked trials with the winner promoted to a train job."""

from __future__ import annotations

import json

import boto3

from playwright.sync_api import expect

from shared.store import Catalog, Datasets, Jobs
from shared.tunings import TuningRequest, resolve_tuning


def test_tune_page_prices_starts_and_promotes(tab, stack, dataset_id):
    tab.open("#/tunings")
    page = tab.page
    page.get_by_label("Trials").fill("3")
    page.get_by_label("seq_len").fill("64")
    expect(page.locator("p.estimate")).to_contain_text("3 trials at 5% of the run: at most $")
    page.get_by_label("lr min (log scale)").fill("0.001")
    page.get_by_label("lr max").fill("0.0001")  # an empty range: the API's 422, in words
    tab.allow("422")
    expect(page.locator("p.estimate")).to_contain_text("the range of lr is empty")
    page.get_by_label("lr max").fill("0.01")
    expect(page.locator("p.estimate")).to_contain_text("3 trials")
    page.get_by_role("button", name="Start tuning").click()
    expect(page.locator("h1")).to_contain_text("Tuning tune-")
    started = page.url.rsplit("/", 1)[-1]
    assert [t["tuning_id"] for t in requests_get(stack, "/tunings")["tunings"]].count(started) == 1

    # A tuning that has ended, its trials ranked: shown best first, the best promoted in one click.
    record = resolve_tuning(TuningRequest(model="base-debug", dataset=dataset_id, settings={"seq_len": 64},
                                          ranges={"lr": {"min": 1e-4, "max": 1e-2}}, max_trials=2),
                            "local", catalog=Catalog(), datasets=Datasets(), data_bucket=stack.env["DATA_BUCKET"],
                            s3=boto3.client("s3"))
    name = f"fusion-{record['job_id']}"
    trials = [{"name": f"{name}-001-aaaaaaaa", "status": "completed", "early_stopped": False, "settings": {"lr": 3e-3},
               "perplexity": 41.5, "curve": [60.0, 41.5], "tokens_trained": 640, "cost": "0.000256"},
              {"name": f"{name}-002-bbbbbbbb", "status": "stopped", "early_stopped": True, "settings": {"lr": 1e-4},
               "perplexity": 90.0, "curve": None, "tokens_trained": 320, "cost": "0.000128"}]
    Jobs().create({**record, "status": "completed", "bill": "0.01", "trials": json.dumps(trials)})
    tab.open(f"#/tunings/{record['job_id']}")
    rows = page.locator("tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("41.50")
    expect(rows.nth(0)).to_contain_text("60.0 → 41.5")
    expect(rows.nth(1)).to_contain_text("stopped early")
    rows.nth(0).get_by_role("button", name="Promote").click()
    expect(page.locator("h1")).to_contain_text("Job ")
    job = requests_get(stack, f"/jobs/{page.url.rsplit('/', 1)[-1]}")
    assert job["settings"]["lr"] == 3e-3 and job["type"] == "train"


def requests_get(stack, path: str) -> dict:
    import requests

    return requests.get(f"{stack.api_url}{path}", timeout=30).json()
