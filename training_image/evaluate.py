"""Held-out loss and perplexity: no gradients, mean over every target token that counts (for
conversations, the assistant's: data.split_windows).

Evaluation runs within the training job's memory plan: the trainer's micro-batch, its
precision (bf16 autocast where it trains so), and the chunked loss, so no vocabulary-wide
logits of a whole batch are ever held."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from shared.memory import IGNORE_INDEX

# Windows a forward pass when the caller has no plan of its own (tests, benches, contraction's
# measurements on one process).
DEFAULT_EVAL_BATCH = 8
from training_image.data import split_windows


def heldout_loss(
    model: nn.Module, windows: torch.Tensor, batch_size: int = DEFAULT_EVAL_BATCH, *, across_ranks: bool = False,
    autocast: bool = False,
) -> float:
    """Mean next-token cross-entropy over windows (N, seq_len + 1), the targets equal to
    IGNORE_INDEX left out (heldout_totals)."""
    loss, _ = heldout_totals(model, windows, batch_size, across_ranks=across_ranks, autocast=autocast)
    return loss


@torch.no_grad()
def heldout_totals(
    model: nn.Module, windows: torch.Tensor, batch_size: int = DEFAULT_EVAL_BATCH, *, across_ranks: bool = False,
    autocast: bool = False,
) -> tuple[float, int]:
    """(mean next-token cross-entropy, targets scored) over windows (N, seq_len + 1), the targets
    equal to IGNORE_INDEX left out. `batch_size`: windows a forward pass (the trainer passes its
    micro-batch); `autocast`: in bf16 autocast, as the trainer computes.

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
    if world > 1:
        windows = windows[dist.get_rank() :: world]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Summed on the device, read back once: no wait for the device per batch.
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, scored targets]
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            for start in range(0, batches * batch_size, batch_size):
                batch = windows[start : start + batch_size]
                inputs, targets, starts = split_windows(batch if len(batch) else spare)
                packed = {} if starts is None else {"starts": starts.to(device)}
                if len(batch) == 0:
                    model(inputs.to(device), targets.to(device), reduction="sum", **packed)
                    continue
                targets = targets.to(device)
                sums[0] += model(inputs.to(device), targets, reduction="sum", **packed)
                sums[1] += (targets != IGNORE_INDEX).sum()
    finally:
        model.train(was_training)
    if world > 1:
        dist.all_reduce(sums)
    total, count = sums.tolist()
    if count == 0:
        raise ValueError("the held-out windows hold no target to measure (no assistant tokens)")
    return total / count, int(count)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = DEFAULT_EVAL_BATCH) -> float:
    return math.exp(heldout_loss(model, windows, batch_size))
