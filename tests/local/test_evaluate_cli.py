"""`fusion models evaluate` against the real HTTP API on moto: what it sends and the table it shows."""

from __future__ import annotations

from local import evaluate as evaluate_cli
from shared.contracts import EvaluateMetrics, Evaluated, Windows
from shared.store import Jobs
from shared.training_jobs import training_job_name
from tests.conftest import artifact, deliver, tar_gz
from tests.local.test_cli import DATASET, cli  # noqa: F401 (the fixture)


def _complete(aws, job_id: str) -> None:
    """What the container and SageMaker would do: the table in output.tar.gz, then Completed."""
    job = Jobs(session=aws.session).get(job_id)
    same = Windows(split="heldout", windows=12, seq_len=64, sha256="ab" * 32)
    other = Windows(split="heldout", windows=12, seq_len=64, sha256="cd" * 32)
    rows = [Evaluated(model_id=model_id, parameters=2_740_000, windows=on, target_tokens=12 * 64, loss=loss,
                      perplexity=ppl)
            for model_id, on, loss, ppl in zip(job["models"], (same, same, other), (5.25, 5.5, 4.0),
                                               (190.57, 244.69, 54.6))]
    metrics = EvaluateMetrics(job_id=job_id, job_type="evaluate", seq_len=64, split="heldout", rows=rows,
                              evaluated_tokens=3 * 12 * 64, wall_time_s=2.0)
    Jobs(session=aws.session).transition(job_id, "launching", training_job_name=training_job_name(job_id))
    key = artifact(aws, job_id).split("/", 3)[3].replace("model.tar.gz", "output.tar.gz")
    aws.session.client("s3").put_object(Bucket=aws.env["ARTIFACTS_BUCKET"], Key=key,
                                        Body=tar_gz({"metrics.json": metrics.model_dump_json().encode()}))
    deliver(aws, job_id, "InProgress", "Completed")


def test_evaluate_submits_follows_and_shows_the_models_side_by_side(cli, aws, monkeypatch):  # noqa: F811
    real_follow = evaluate_cli.follow

    def follow(client, job_id, console, **kwargs):
        _complete(aws, job_id)
        return real_follow(client, job_id, console, interval=0.01, **kwargs)

    monkeypatch.setattr(evaluate_cli, "follow", follow)
    code, out, err = cli("models", "evaluate", "base-debug", "base-tiny", "base-small", "--dataset", DATASET,
                         "--seq-len", "64", "--max-windows", "12")
    assert code == 0, err
    method, path, body, _ = [s for s in cli.sent if s[0] == "POST"][0]
    assert (method, path) == ("POST", "/jobs")
    assert body == {"type": "evaluate", "dataset": DATASET,
                    "hyperparams": {"model_ids": ["base-debug", "base-tiny", "base-small"], "seq_len": 64,
                                    "max_windows": 12}}
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith("base-")}
    assert rows["base-debug"][1:5] == ["2.74M", "190.57", "5.2500", "-"]
    assert rows["base-tiny"][2] == "244.69" and rows["base-tiny"][-1] == "abababababab"
    assert rows["base-small"][-3:] == ["cdcdcdcdcdcd", "(other", "tokenizer)"]
    assert f"12 held-out windows of 64 tokens of {DATASET}" in " ".join(out.split())


def test_evaluate_estimate_prices_forward_tokens_only(cli):  # noqa: F811
    code, out, err = cli("models", "evaluate", "base-debug", "--dataset", DATASET, "--estimate")
    assert code == 0, err
    text = " ".join(out.split())
    assert "evaluate base-debug on" in text and "evaluated tokens 65,536" in text and "training tokens" not in text


def test_an_unknown_model_is_refused_in_one_line(cli):  # noqa: F811
    code, _, err = cli("models", "evaluate", "base-debug", "m-nope", "--dataset", DATASET)
    assert code == 1 and "m-nope" in err and "hyperparams.model_ids.1" in err and len(err.strip().splitlines()) == 1
