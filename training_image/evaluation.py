"""Which windows a perplexity was measured on, and the evaluation job: any models, one dataset, one seq_len.

A perplexity is a figure about a model *and* its windows: the same model scores differently on
another split, another tokenizer or another seq_len (a window of 128 tokens predicts its tokens
with less context than one of 256). So every perplexity a job reports carries `Windows`, and the
evaluation job measures each model it is given on the same windows, forward passes only, with
training_image.evaluate's loss.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from shared.contracts import Windows


def measured_on(windows: torch.Tensor, split: str) -> Windows:
    """The description of (N, seq_len + 1) token windows: their split, count, seq_len and digest."""
    ids = np.ascontiguousarray(windows.numpy().astype("<i8", copy=False))
    return Windows(split=split, windows=int(windows.shape[0]), seq_len=int(windows.shape[1]) - 1,
                   sha256=hashlib.sha256(ids.tobytes()).hexdigest())
