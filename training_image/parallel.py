"""How the model spreads over the ranks: a replica on each (DDP) or sharded (FSDP2), and whether
its blocks recompute their activations in the backward pass. The memory plan (shared.memory)
chooses; this module applies the choice.

Under FSDP every block is one unit (`fully_shard` per block), the embeddings another, the final
norm with the head a third, then the root: a unit's weights are gathered just before it runs and
freed after, so a rank holds its shard of the fp32 weights, gradients and AdamW state plus a
couple of gathered units. On CUDA the gathered weights are bf16 (compute) and gradients are
reduced in fp32 onto the fp32 shards the optimizer steps (master weights); on a CPU everything
stays fp32, so a sharded run computes what one process computes.

Growth happens before any of this (the trainer wraps the grown model), and what leaves the
trainer — the final weights — is gathered back into one full state dict (`full_model`).
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from shared.memory import Strategy
from training_image.model import Decoder


def wrap(
    model: Decoder, *, strategy: Strategy, activation_checkpointing: bool, world_size: int, device: torch.device
) -> nn.Module:
    """The module the training step calls: `model` itself on one process, DDP over it, or `model`
    sharded in place (FSDP). `model` may still be on the CPU under FSDP: each unit moves to
    `device` as it is sharded, so no rank ever holds the whole model there."""
    if activation_checkpointing:
        checkpoint_blocks(model)
    if strategy == "fsdp" and world_size > 1:
        return shard(model, device)
    model.to(device)
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        # Gradients live in the all-reduce buckets (no copy in and out of them); the only
        # buffers are the rotary tables, equal on every rank: no broadcast before each forward.
        return nn.parallel.DistributedDataParallel(
            model, device_ids=ids, gradient_as_bucket_view=True, forward_sync_buffers=False
        )
    return model


def checkpoint_blocks(model: Decoder) -> None:
    """Each block keeps only its input for the backward pass and runs its forward again there.

    The block's own forward is replaced (not the block wrapped), so parameter names, checkpoints
    and the saved model are those of the plain model.
    """
    for block in model.blocks.values():
        inner = block.forward

        def recomputed(*args, _inner=inner, **kwargs):
            # Nothing in a block draws random numbers, so there is no RNG state to replay.
            return checkpoint(_inner, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

        block.forward = recomputed


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(model: Decoder, device: torch.device) -> nn.Module:
    """FSDP2 over all ranks, unit by unit (blocks, embeddings, norm and head), then the root."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision(device)
    for block in model.blocks.values():
        fully_shard(block, mesh=mesh, mp_policy=policy)
    if not model.config.tie_embeddings:  # a tied weight must live in one unit: the root's
        fully_shard(model.embed, mesh=mesh, mp_policy=policy)
        # The head runs last in the forward and first in the backward: gathering it again at
        # once would be wasted, so it stays gathered between the two.
        fully_shard([model.norm, model.lm_head], mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # Non-persistent buffers (the rotary tables) are the root's; fully_shard moved them.
    return model


def is_sharded(network: nn.Module) -> bool:
    return isinstance(network, FSDPModule)


def accumulating(network: nn.Module, last: bool):
    """The context of one micro-batch's backward: DDP skips its all-reduce until the last one.
    FSDP reduce-scatters every micro-batch, so gradients accumulate in shards, not whole."""
    if not last and isinstance(network, nn.parallel.DistributedDataParallel):
        return network.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (same arithmetic), with the norm of sharded gradients
    summed over all ranks before it scales them."""
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0, False, True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, True)
    return total


def full_model(model: Decoder) -> Decoder | None:
    """The whole model in fp32 on the CPU, gathered from the shards: on rank 0 (None on the
    others, which must call this too). An unsharded model comes back as it is."""
    if not is_sharded(model):
        return model
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    # The gathered tensors become the model's own (no second copy of the whole model on the host).
    with torch.device("meta"):
        whole = Decoder(model.config)
    whole.load_state_dict({name: tensor.to(torch.float32) for name, tensor in state.items()}, assign=True)
    if model.config.tie_embeddings:
        whole.lm_head.weight = whole.embed.weight
    return whole.reset_buffers()
