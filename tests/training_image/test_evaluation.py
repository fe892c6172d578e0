"""The evaluate job: every model on the same windows at one seq_len, forward passes only (fp32)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shared.contracts import METRICS
from shared.settings import EvaluateSettings
from shared.shapes import SIZES
from training_image import entry, runtime
from training_image.evaluate import perplexity
from training_image.evaluation import evaluation_windows, held_out, run_evaluate_job
from training_image.model import Decoder
from training_image.modeldir import save_model_dir
from training_image.tokens import TokenData

from .conftest import write_hyperparameters


def _two_models(root, tokenizer):
    """The debug model under two inits, as the channels model-0 and model-1."""
    models = [Decoder(SIZES["debug"]).init_weights(seed) for seed in (0, 1)]
    for i, model in enumerate(models):
        save_model_dir(root / f"input/data/model-{i}", model, tokenizer)
    return models


@pytest.mark.parametrize("source", ["split", "dataset"])
def test_every_model_is_measured_on_the_same_windows(ml_root, tokenizer, source, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    models = _two_models(ml_root, tokenizer)
    settings = EvaluateSettings(model_ids=["m-a", "base-debug"], seq_len=32, source=source, max_windows=6)

    metrics = run_evaluate_job(settings, ml_root, "eval-1", log=lambda line: None)

    [folder] = ml_root.glob("tokens-eval-*")
    data = TokenData(folder)
    windows = evaluation_windows(data, source, 6)
    assert len(windows) == 6 and windows.shape[1] == 33
    if source == "split":  # the windows a train job at this seq_len held out
        assert torch.equal(windows, data.heldout_windows()[:6])
    else:  # drawn as a validation set's are
        assert torch.equal(windows, data.sample_windows(max_tokens=6 * 33))
    assert [row.model_id for row in metrics.rows] == ["m-a", "base-debug"]
    for row, model in zip(metrics.rows, models):
        assert row.perplexity_on == held_out(windows, source, data)  # one digest: the very same tokens
        assert (row.perplexity_on.source, row.perplexity_on.tokens, row.perplexity_on.windows) == (source, "all", 6)
        assert row.perplexity == pytest.approx(perplexity(model, windows), rel=1e-6)
        assert row.loss == pytest.approx(math.log(row.perplexity)) and row.target_tokens == 6 * 32
        assert row.parameters == SIZES["debug"].parameters()
    assert metrics.rows[0].perplexity != metrics.rows[1].perplexity
    assert metrics.evaluated_tokens == 2 * 6 * 32 and metrics.training_tokens == 0
    written = (ml_root / "output/data/metrics.json").read_text()
    assert METRICS.validate_json(written) == metrics


def test_the_entry_point_runs_an_evaluate_job_from_its_hyperparameters(ml_root, tokenizer, monkeypatch):
    _two_models(ml_root, tokenizer)
    write_hyperparameters(ml_root, job_type="evaluate", job_id="eval-2", model_ids=json.dumps(["a", "b"]),
                          seq_len="16", source="dataset", max_windows="3")
    monkeypatch.setenv("FUSION_ML_ROOT", str(ml_root))
    assert entry.main() == 0
    metrics = json.loads((ml_root / "output/data/metrics.json").read_text())
    assert (metrics["job_type"], len(metrics["rows"])) == ("evaluate", 2)
    first, second = (row["perplexity_on"] for row in metrics["rows"])
    assert (first["source"], first["seq_len"], first["windows"]) == ("dataset", 16, 3)
    assert first["sha256"] == second["sha256"]


def test_a_seq_len_past_a_models_context_fails_with_its_name(ml_root, tokenizer, monkeypatch):
    _two_models(ml_root, tokenizer)
    too_long = SIZES["debug"].context_length + 1
    settings = EvaluateSettings(model_ids=["a", "b"], seq_len=too_long)
    with pytest.raises(ValueError, match="context length .* of a"):
        run_evaluate_job(settings, ml_root, "eval-3", log=lambda line: None)


def test_an_evaluation_of_the_split_compares_with_a_train_jobs_perplexity(ml_root, tokenizer):
    """With max_windows at least the held-out count, an evaluation at a train job's seq_len names the
    windows the train job measured on (run_train_job: held_out(data.heldout_windows(), "split", data))."""
    _two_models(ml_root, tokenizer)
    settings = EvaluateSettings(model_ids=["a"], seq_len=32, source="split", max_windows=4096)
    [row] = run_evaluate_job(settings, ml_root, "eval-4", log=lambda line: None).rows
    train_data = runtime.prepare_tokens(ml_root, tokenizer, 32)
    trained_on = held_out(train_data.heldout_windows(), "split", train_data)
    assert row.perplexity_on == trained_on and row.perplexity_on.compares_with(trained_on)
    other = runtime.prepare_tokens(ml_root, tokenizer, 48)  # another seq_len: other windows
    assert not row.perplexity_on.compares_with(held_out(other.heldout_windows(), "split", other))
