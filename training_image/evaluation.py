"""What a perplexity was measured on, and the evaluate job: any models, one dataset, one seq_len.

A perplexity is a figure about a model *and* its windows: the same model scores differently on
another split, another tokenizer or chat template, or another seq_len (a window of 128 tokens
predicts its tokens with less context than one of 256). So every perplexity a job reports
carries a `HeldOut` (shared.contracts) with a digest of its windows, and the evaluate job
measures each model it is given on the same windows, forward passes only, with
training_image.evaluate's loss: on conversations, the assistant's tokens only.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from shared.contracts import EvaluateMetrics, Evaluated, HeldOut
from shared.conversations import CHAT
from shared.settings import EvaluateSettings
from shared.training_jobs import model_channel
from training_image import runtime, tokens
from training_image.evaluate import heldout_totals
from training_image.modeldir import load_model_dir


def held_out(windows: torch.Tensor, source: str, data: tokens.TokenData) -> HeldOut:
    """The description of (N, seq_len + 1) windows of `data`: where they come from, their count,
    seq_len and scored tokens, and a sha256 of them as measured (token ids with their flags, which
    say which targets count), so that equal digests mean the very same measurement."""
    ids = np.ascontiguousarray(windows.numpy().astype("<i8", copy=False))
    return HeldOut(source=source, windows=int(windows.shape[0]), seq_len=int(windows.shape[1]) - 1,
                   tokens="assistant" if data.kind == CHAT else "all", sha256=hashlib.sha256(ids.tobytes()).hexdigest())


def evaluation_windows(data: tokens.TokenData, source: str, max_windows: int) -> torch.Tensor:
    """The windows an evaluation measures: the first max_windows held-out windows (the ones a train
    job at this seq_len holds out and measures on), or a seeded sample of max_windows of all of
    them, drawn as a train job draws its validation set's (TokenData.sample_windows)."""
    if source == "split":
        return data.windows(data.heldout[:max_windows])
    return data.sample_windows(max_tokens=max_windows * data.window)


def run_evaluate_job(settings: EvaluateSettings, root: Path, job_id: str,
                     log: Callable[[str], None] | None = None) -> EvaluateMetrics:
    """Measure every model of the `model-<i>` channels on the same windows of the `training` channel;
    write metrics.json (the table) and return it. Forward passes only, one model in memory at a time."""
    log = log or (runtime.log if runtime.rank() == 0 else lambda line: None)
    started = time.monotonic()
    device = runtime.device()
    # A tokenizer's digest -> its windows: models that share a tokenizer share the windows.
    prepared: dict[str, tuple[torch.Tensor, HeldOut]] = {}
    rows = []
    for index, model_id in enumerate(settings.model_ids):
        model, tokenizer = load_model_dir(root / "input/data" / model_channel(index))
        if settings.seq_len > model.config.context_length:
            raise ValueError(f"seq_len={settings.seq_len} exceeds the context length {model.config.context_length} "
                             f"of {model_id}")
        digest = tokens.tokenizer_digest(tokenizer)
        if digest not in prepared:
            data = tokens.prepare(tokenizer, root / "input/data/training", root / f"tokens-eval-{digest[:16]}",
                                  settings.seq_len, share=runtime.local_share(), wait=runtime.wait_for_all,
                                  hold_out=settings.source == "split")
            windows = evaluation_windows(data, settings.source, settings.max_windows)
            prepared[digest] = windows, held_out(windows, settings.source, data)
        windows, on = prepared[digest]
        model.to(device)
        loss, scored = heldout_totals(model, windows, across_ranks=True)
        row = Evaluated(model_id=model_id, parameters=model.parameter_count(), perplexity_on=on,
                        target_tokens=scored, loss=loss, perplexity=math.exp(loss))
        log(f"evaluated={model_id} windows={on.windows} seq_len={on.seq_len} tokens={on.tokens} "
            f"heldout_loss={loss:.4f} heldout_perplexity={row.perplexity:.3f}")
        rows.append(row)
        del model
    metrics = EvaluateMetrics(
        job_id=job_id, job_type="evaluate", rows=rows,
        evaluated_tokens=sum(row.perplexity_on.windows * row.perplexity_on.seq_len for row in rows),
        wall_time_s=round(time.monotonic() - started, 2),
    )
    if runtime.rank() == 0:
        runtime.write_metrics(root, metrics)
    return metrics
