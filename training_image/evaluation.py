"""Which windows a perplexity was measured on, and the evaluation job: any models, one dataset, one seq_len.

A perplexity is a figure about a model *and* its windows: the same model scores differently on
another split, another tokenizer or another seq_len (a window of 128 tokens predicts its tokens
with less context than one of 256). So every perplexity a job reports carries `Windows`, and the
evaluation job measures each model it is given on the same windows, forward passes only, with
training_image.evaluate's loss.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from shared.contracts import EvaluateMetrics, Evaluated, Windows
from shared.settings import EvaluateSettings
from shared.training_jobs import model_channel
from training_image import runtime, tokens
from training_image.evaluate import heldout_loss
from training_image.modeldir import load_model_dir


def measured_on(windows: torch.Tensor, split: str) -> Windows:
    """The description of (N, seq_len + 1) token windows: their split, count, seq_len and digest."""
    ids = np.ascontiguousarray(windows.numpy().astype("<i8", copy=False))
    return Windows(split=split, windows=int(windows.shape[0]), seq_len=int(windows.shape[1]) - 1,
                   sha256=hashlib.sha256(ids.tobytes()).hexdigest())


def evaluation_windows(data: tokens.TokenData, split: str, max_windows: int, seed: int = 0) -> torch.Tensor:
    """The windows an evaluation measures: the first max_windows held-out windows (the ones a train
    job at this seq_len held out), or a seeded sample of max_windows of all windows, in order."""
    if split == "heldout":
        return data.windows(data.heldout[:max_windows])
    ids = np.arange(data.count)
    if data.count > max_windows:
        ids = np.sort(np.random.default_rng(seed).choice(data.count, size=max_windows, replace=False))
    return data.windows(ids)


def _tokenizer_digest(tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def run_evaluate_job(settings: EvaluateSettings, root: Path, job_id: str,
                     log: Callable[[str], None] | None = None) -> EvaluateMetrics:
    """Measure every model of the `model-<i>` channels on the same windows of the `training` channel;
    write metrics.json (the table) and return it. Forward passes only, one model in memory at a time."""
    log = log or (runtime.log if runtime.rank() == 0 else lambda line: None)
    started = time.monotonic()
    device = runtime.device()
    windows_of: dict[str, torch.Tensor] = {}  # tokenizer digest -> its windows: models that share one share them
    rows = []
    for index, model_id in enumerate(settings.model_ids):
        model, tokenizer = load_model_dir(root / "input/data" / model_channel(index))
        if settings.seq_len > model.config.context_length:
            raise ValueError(f"seq_len={settings.seq_len} exceeds the context length {model.config.context_length} "
                             f"of {model_id}")
        digest = _tokenizer_digest(tokenizer)
        if digest not in windows_of:
            data = tokens.prepare(tokenizer, root / "input/data/training", root / "tokens" / f"eval-{digest}",
                                  settings.seq_len, share=runtime.local_share(), wait=runtime.wait_for_all)
            windows_of[digest] = evaluation_windows(data, settings.split, settings.max_windows)
        windows = windows_of[digest]
        if len(windows) == 0:
            raise ValueError(f"the dataset holds no {settings.split} windows of seq_len+1={settings.seq_len + 1} tokens")
        model.to(device)
        loss = heldout_loss(model, windows, across_ranks=True)
        row = Evaluated(model_id=model_id, parameters=model.parameter_count(), windows=measured_on(windows, settings.split),
                        target_tokens=len(windows) * settings.seq_len, loss=loss, perplexity=math.exp(loss))
        log(f"evaluated={model_id} windows={len(windows)} seq_len={settings.seq_len} heldout_loss={loss:.4f} "
            f"heldout_perplexity={row.perplexity:.3f}")
        rows.append(row)
        del model
    metrics = EvaluateMetrics(
        job_id=job_id, job_type="evaluate", seq_len=settings.seq_len, split=settings.split, rows=rows,
        evaluated_tokens=sum(row.windows.windows * settings.seq_len for row in rows),
        wall_time_s=round(time.monotonic() - started, 2),
    )
    if runtime.rank() == 0:
        runtime.write_metrics(root, metrics)
    return metrics
