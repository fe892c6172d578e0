"""Held-out loss and perplexity: fp32, no gradients, mean over every target token."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


IGNORE_INDEX = -100  # a target not scored (chat data: every token but the assistant's), as in torch and transformers


@torch.no_grad()
def heldout_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, *, across_ranks: bool = False,
                 targets: torch.Tensor | None = None) -> float:
    """Mean next-token cross-entropy over windows (N, seq_len + 1).

    targets: (N, seq_len) tokens to score in place of windows[:, 1:], IGNORE_INDEX where a
    position is not scored; the mean is over the scored ones.

    across_ranks: every rank calls this with the same windows and evaluates only its share of
    them; the sums are all-reduced, so each rank gets the loss of the whole set for 1/world of
    the work. Every rank runs the same number of forward passes, the ones short of a share
    on a window they do not count: a sharded (FSDP) forward gathers weights from all ranks, so a
    rank that stopped early would leave the others waiting."""
    if len(windows) == 0:
        raise ValueError("no held-out windows to evaluate")
    world = dist.get_world_size() if across_ranks and dist.is_initialized() else 1
    batches = math.ceil(math.ceil(len(windows) / world) / batch_size)
    spare = windows[:1]
    if targets is None:
        targets = windows[:, 1:]
    if world > 1:
        windows, targets = windows[dist.get_rank() :: world], targets[dist.get_rank() :: world]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Summed on the device, read back once: no wait for the device per batch.
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, target tokens]
    try:
        with torch.autocast(device.type, enabled=False):
            for start in range(0, batches * batch_size, batch_size):
                batch = windows[start : start + batch_size]
                if len(batch) == 0:
                    model(spare[:, :-1].to(device))
                    continue
                batch = batch.to(device)
                logits = model(batch[:, :-1]).float()
                scored = targets[start : start + batch_size].to(device)
                sums[0] += F.cross_entropy(logits.reshape(-1, logits.size(-1)), scored.reshape(-1), reduction="sum",
                                           ignore_index=IGNORE_INDEX)
                sums[1] += (scored != IGNORE_INDEX).sum()
    finally:
        model.train(was_training)
    if world > 1:
        dist.all_reduce(sums)
    total, count = sums.tolist()
    return total / count


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    return math.exp(heldout_loss(model, windows, batch_size))
