"""A small tuning end to end on the local stack: the local tuner runs real trials of the debug
model (the trainer in subprocesses), the events function ranks and bills them, and the winner is
promoted to a train job whose model records the tuning."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from decimal import Decimal

import pytest
import requests

from local.tuner import draws, should_stop
from shared.pricing import Estimate, bill
from tests.local.test_stack import dataset_id  # noqa: F401 (the fixture)


def test_draws_cover_each_range_once_per_stratum():
    ranges = {"ContinuousParameterRanges": [{"Name": "lr", "MinValue": "1e-5", "MaxValue": "1e-1",
                                             "ScalingType": "Logarithmic"}],
              "IntegerParameterRanges": [{"Name": "turns", "MinValue": "1", "MaxValue": "4", "ScalingType": "Linear"}]}
    trials = draws(ranges, 4, random.Random(0))
    decades = sorted(int(-__import__("math").log10(float(t["lr"])) - 1e-9) for t in trials)
    assert decades == [1, 2, 3, 4]  # one draw in each quarter of the log range
    assert all(1 <= int(t["turns"]) <= 4 for t in trials)


def test_early_stopping_needs_two_earlier_trials_and_a_worse_running_average():
    assert not should_stop([50.0], [[10.0]], minimize=True)  # one earlier trial is no median
    assert should_stop([50.0], [[10.0], [12.0]], minimize=True)
    assert not should_stop([11.0], [[10.0, 9.0], [12.0, 8.0]], minimize=True)
    assert should_stop([12.0, 11.0], [[10.0, 9.0], [12.0, 8.0], [30.0]], minimize=True)  # the short one is no peer
    assert not should_stop([], [[1.0], [2.0]], minimize=True)


def _wait(url: str, statuses: tuple[str, ...], timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = requests.get(url).json()
        if shown["status"] in statuses:
            return shown
        time.sleep(0.5)
    raise TimeoutError(f"{url} still {shown['status']}")


@pytest.mark.slow
def test_a_small_tuning_runs_ranks_bills_and_promotes(stack, dataset_id, capsys, monkeypatch):  # noqa: F811
    from local.cli import main

    # The trainer subprocesses run this checkout's container code, whichever checkout the
    # interpreter's `train` script was installed from.
    here = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p))

    capsys.readouterr()
    code = main(["--api-url", stack.api_url, "--json", "tune", "start", "--model", "base-debug", "--dataset", dataset_id,
                 "--lr", "1e-4:3e-2", "--set", "seq_len=64", "--set", "steps_per_cycle=20", "--set", "cycles=2",
                 "--max-trials", "4", "--parallel", "2", "--proxy-fraction", "0.25"])
    assert code == 0
    tuning_id = __import__("json").loads(capsys.readouterr().out)["tuning_id"]
    ended = _wait(f"{stack.api_url}/tunings/{tuning_id}", ("completed", "failed", "cancelled"))
    assert ended["status"] == "completed", [(j.name, j.failure_reason) for j in stack.sagemaker.jobs.values()]
    trials = ended["trials"]
    assert len(trials) == 4 and all(t["status"] in ("completed", "stopped") for t in trials), trials
    completed = [t for t in trials if t["status"] == "completed"]
    assert completed and [t["perplexity"] for t in completed] == sorted(t["perplexity"] for t in completed)
    for trial in completed:  # a proxy: a quarter of each turn's 40 steps, evaluated at both cycles' ends
        assert trial["tokens_trained"] == 10 * 64 and len(trial["curve"]) == 2
        assert trial["curve"][-1] == pytest.approx(trial["perplexity"], rel=1e-3)
    for trial in trials:
        if trial["status"] == "stopped":  # stopped early by the tuner: billed for the steps it logged,
            # which can be all of them when the stop lands while it writes its model (on SageMaker too)
            assert trial["early_stopped"] and 0 < trial["tokens_trained"] <= 10 * 64
    tokens = sum(t["tokens_trained"] for t in trials)
    assert Decimal(ended["bill"]) == bill(Estimate.model_validate(ended["estimate"]), tokens)
    assert Decimal(ended["bill"]) <= Decimal(ended["estimate"]["total"])

    assert main(["--api-url", stack.api_url, "tune", "show", tuning_id]) == 0
    assert trials[0]["name"].rsplit("-", 2)[-2] in capsys.readouterr().out  # the ranked table, best first
    assert main(["--api-url", stack.api_url, "--json", "tune", "promote", tuning_id, "--output-name", "tuned"]) == 0
    job = __import__("json").loads(capsys.readouterr().out)
    assert job["settings"]["lr"] == trials[0]["settings"]["lr"] and job["settings"]["steps_per_cycle"] == 20
    done = _wait(f"{stack.api_url}/jobs/{job['job_id']}", ("completed", "failed", "cancelled"))
    assert done["status"] == "completed", done
    model = requests.get(f"{stack.api_url}/models/{done['output_model_id']}").json()
    assert model["tuning_id"] == tuning_id and model["name"] == "tuned"
