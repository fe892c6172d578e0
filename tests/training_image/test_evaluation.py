"""The evaluate job: every model on the same windows at one seq_len, forward passes only (fp32)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shared.contracts import METRICS
from shared.settings import EvaluateSettings
from shared.shapes import SIZES
from training_image import entry
from training_image.evaluate import IGNORE_INDEX, heldout_loss, perplexity
from training_image.evaluation import evaluation_windows, measured_on, run_evaluate_job
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


@pytest.mark.parametrize("split", ["heldout", "all"])
def test_every_model_is_measured_on_the_same_windows(ml_root, tokenizer, split, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    models = _two_models(ml_root, tokenizer)
    settings = EvaluateSettings(model_ids=["m-a", "base-debug"], seq_len=32, split=split, max_windows=6)

    metrics = run_evaluate_job(settings, ml_root, "eval-1", log=lambda line: None)

    [folder] = (ml_root / "tokens").iterdir()
    data = TokenData(folder)
    windows = evaluation_windows(data, split, 6)
    assert len(windows) == 6 and windows.shape[1] == 33
    if split == "heldout":  # the windows a train job at this seq_len held out
        assert torch.equal(windows, data.heldout_windows()[:6])
    assert [row.model_id for row in metrics.rows] == ["m-a", "base-debug"]
    for row, model in zip(metrics.rows, models):
        assert row.windows == measured_on(windows, split)  # one digest: the very same tokens
        assert row.perplexity == pytest.approx(perplexity(model, windows), rel=1e-6)
        assert row.loss == pytest.approx(math.log(row.perplexity)) and row.target_tokens == 6 * 32
        assert row.parameters == SIZES["debug"].parameters() and row.assistant_loss is None
    assert metrics.rows[0].perplexity != metrics.rows[1].perplexity
    assert metrics.evaluated_tokens == 2 * 6 * 32 and metrics.training_tokens == 0
    written = (ml_root / "output/data/metrics.json").read_text()
    assert METRICS.validate_json(written) == metrics


def test_the_entry_point_runs_an_evaluate_job_from_its_hyperparameters(ml_root, tokenizer, monkeypatch):
    _two_models(ml_root, tokenizer)
    write_hyperparameters(ml_root, job_type="evaluate", job_id="eval-2", model_ids=json.dumps(["a", "b"]),
                          seq_len="16", split="all", max_windows="3")
    monkeypatch.setenv("FUSION_ML_ROOT", str(ml_root))
    assert entry.main() == 0
    metrics = json.loads((ml_root / "output/data/metrics.json").read_text())
    assert (metrics["job_type"], metrics["seq_len"], len(metrics["rows"])) == ("evaluate", 16, 2)
    assert metrics["rows"][0]["windows"]["sha256"] == metrics["rows"][1]["windows"]["sha256"]


def test_a_seq_len_past_a_models_context_fails_with_its_name(ml_root, tokenizer, monkeypatch):
    _two_models(ml_root, tokenizer)
    too_long = SIZES["debug"].context_length + 1
    settings = EvaluateSettings(model_ids=["a", "b"], seq_len=too_long)
    with pytest.raises(ValueError, match="context length .* of a"):
        run_evaluate_job(settings, ml_root, "eval-3", log=lambda line: None)


def test_ignored_targets_leave_the_loss_of_the_scored_ones(windows):
    """Chat data scores the assistant's tokens only: targets of IGNORE_INDEX count for nothing (fp32)."""
    model = Decoder(SIZES["debug"]).init_weights(0)
    _, heldout = windows
    heldout = heldout[:4]
    targets = heldout[:, 1:].clone()
    targets[:, : targets.shape[1] // 2] = IGNORE_INDEX
    masked = heldout_loss(model, heldout, targets=targets)
    with torch.no_grad():
        logits = model(heldout[:, :-1]).float()
        half = targets.shape[1] // 2
        expected = torch.nn.functional.cross_entropy(logits[:, half:].reshape(-1, logits.size(-1)),
                                                     heldout[:, 1 + half :].reshape(-1))
    assert masked == pytest.approx(expected.item(), rel=1e-5)
    assert heldout_loss(model, heldout, targets=heldout[:, 1:]) == pytest.approx(heldout_loss(model, heldout), rel=1e-12)
