"""Held-out loss and perplexity: fp32, no gradients, mean over every target token."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def heldout_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over windows (N, seq_len + 1)."""
    if len(windows) == 0:
        raise ValueError("no held-out windows to evaluate")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.autocast(device.type, enabled=False):
            for start in range(0, len(windows), batch_size):
                batch = windows[start : start + batch_size].to(device)
                logits = model(batch[:, :-1]).float()
                targets = batch[:, 1:]
                total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()
                count += targets.numel()
    finally:
        model.train(was_training)
    return total / count


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    return math.exp(heldout_loss(model, windows, batch_size))
