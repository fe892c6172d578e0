"""`fusion models evaluate` against the real HTTP API on moto: what it sends and the table it shows."""

from __future__ import annotations

from local import cli as cli_module
from shared.contracts import EvaluateMetrics, Evaluated, HeldOut
from shared.shapes import SIZES
from shared.store import Catalog, Jobs
from shared.training_jobs import training_job_name
from tests.conftest import deliver, put_metrics
from tests.local.test_cli import DATASET, cli  # noqa: F401 (the fixture)


def _complete(aws, job_id: str) -> None:
    """What the container and SageMaker would do: the table in metrics.json of the model prefix, then Completed."""
    job = Jobs(session=aws.session).get(job_id)
    same = HeldOut(source="split", windows=12, seq_len=64, tokens="all", sha256="ab" * 32)
    other = same.model_copy(update={"sha256": "cd" * 32})  # another tokenizer's windows of the same text
    rows = [Evaluated(model_id=model_id, parameters=2_740_000, perplexity_on=on, target_tokens=12 * 64, loss=loss,
                      perplexity=ppl)
            for model_id, on, loss, ppl in zip(job["models"], (same, same, other), (5.25, 5.5, 4.0),
                                               (190.57, 244.69, 54.6))]
    metrics = EvaluateMetrics(job_id=job_id, job_type="evaluate", rows=rows,
                              evaluated_tokens=3 * 12 * 64, wall_time_s=2.0)
    Jobs(session=aws.session).transition(job_id, "launching", training_job_name=training_job_name(job_id))
    put_metrics(aws, job_id, metrics.model_dump_json().encode())
    deliver(aws, job_id, "InProgress", "Completed")


def _trained(aws, *model_ids: str) -> None:
    """alice's trained models (their archives' presence is not checked: a job wrote them)."""
    for model_id in model_ids:
        Catalog(session=aws.session).register({
            "model_id": model_id, "owner": "alice", "name": model_id, "kind": "trained", "parent_id": "base-debug",
            "job_id": "j0", "parameters": SIZES["debug"].parameters(), "depth": SIZES["debug"].n_layers,
            "artifact_uri": f"s3://{aws.env['ARTIFACTS_BUCKET']}/jobs/j0/output/fusion-j0/output/model.tar.gz",
            "config": SIZES["debug"].model_dump(mode="json"), "created_at": "2026-01-02T00:00:00.000Z"})


def test_evaluate_submits_follows_and_shows_the_models_side_by_side(cli, aws, monkeypatch):  # noqa: F811
    _trained(aws, "m-tuned", "m-other")
    real_follow = cli_module.follow

    def follow(client, job_id, console, **kwargs):
        _complete(aws, job_id)
        return real_follow(client, job_id, console, interval=0.01, **kwargs)

    monkeypatch.setattr(cli_module, "follow", follow)
    code, out, err = cli("models", "evaluate", "base-debug", "m-tuned", "m-other", "--dataset", DATASET,
                         "--seq-len", "64", "--max-windows", "12")
    assert code == 0, err
    method, path, body, _ = [s for s in cli.sent if s[0] == "POST"][0]
    assert (method, path) == ("POST", "/jobs")
    assert body == {"type": "evaluate", "dataset": DATASET,
                    "hyperparams": {"model_ids": ["base-debug", "m-tuned", "m-other"], "seq_len": 64,
                                    "max_windows": 12}}
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith(("base-", "m-"))}
    assert rows["base-debug"][1:5] == ["2.74M", "190.57", "5.2500", "768"]
    assert rows["m-tuned"][2] == "244.69" and rows["m-tuned"][-1] == "abababababab"
    assert rows["m-other"][-3:] == ["cdcdcdcdcdcd", "(other", "windows)"]
    assert f"12 held-out windows of 64 tokens of {DATASET}" in " ".join(out.split())


def test_evaluate_estimate_prices_forward_tokens_only(cli):  # noqa: F811
    code, out, err = cli("models", "evaluate", "base-debug", "--dataset", DATASET, "--estimate")
    assert code == 0, err
    text = " ".join(out.split())
    assert "evaluate of base-debug on" in text and "evaluated tokens 65,536 at most" in text
    assert "billed tokens" not in text and "training cost" not in text and "evaluation cost" in text


def test_an_unknown_model_is_refused_in_one_line(cli):  # noqa: F811
    code, _, err = cli("models", "evaluate", "base-debug", "m-nope", "--dataset", DATASET)
    first = err.strip().splitlines()[0]
    assert code == 1 and first == "error: MODEL 2: no model 'm-nope' in your catalog"
