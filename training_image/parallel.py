"""How the model spreads over the ranks: a replica on each (DDP) or sharded (FSDP2), and whether
its blocks recompute their activations in the backward pass. The memory plan (shared.memory)
chooses; this module applies the choice.

Under FSDP every block is one unit (`fully_shard` per block), the embeddings another, the final
norm with the head a third, then the root: a unit's weights are gathered just before it runs and
freed after, so a rank holds its shard of the fp32 weights, gradients and AdamW state plus a
couple of gathered units. When the job computes in bf16 (training_image.precision: on CUDA by
default) the gathered weights are bf16 and gradients are reduced in fp32 onto the fp32 shards
the optimizer steps (master weights); in fp32 everything stays fp32, so a sharded run computes
what one process computes.

Growth happens before any of this (the trainer wraps the grown model). A sharded model may come
on the meta device: once sharded, each rank allocates its shard and fills it (`load_shards`
reads its rows of the base's files), so none holds the whole model. What leaves the trainer —
the final weights — is gathered back into one full state dict (`full_model`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.utils.checkpoint import checkpoint

from shared.memory import Strategy
from training_image.model import Decoder
from training_image.precision import computes_in_bf16


Materialize = Callable[[Decoder], None]


def shards(strategy: Strategy, world_size: int) -> bool:
    """Whether `wrap` shards the model (FSDP over more than one rank)."""
    return strategy == "fsdp" and world_size > 1


def wrap(
    model: Decoder, *, strategy: Strategy, activation_checkpointing: bool, world_size: int, device: torch.device,
    materialize: Materialize | None = None, bf16: bool | None = None, compile: bool = False,
) -> nn.Module:
    """The module the training step calls: `model` itself on one process, DDP over it, or `model`
    sharded in place (FSDP). `model` may still be on the CPU under FSDP: each unit moves to
    `device` as it is sharded, so no rank ever holds the whole model there.

    `materialize`: `model` is on the meta device (no storage at all); once sharded, each rank
    allocates its own part on `device` and this fills it (load_shards), as torchtitan does. A
    rank then never holds more of the model than its shard, on the host or on the device.
    `bf16`: a sharded model's compute precision (mixed_precision).

    `compile`: each block compiled (compile_blocks), before it is sharded.

    `model` may also be a module that trains a Decoder it holds as `student` (a contract job's
    distillation): its blocks are the ones recomputed, compiled and sharded; its frozen teacher
    lies outside the module tree and stays as it is."""
    decoder = trained_decoder(model)
    if activation_checkpointing:
        checkpoint_blocks(decoder)
    if compile:
        compile_blocks(decoder)
    if shards(strategy, world_size):
        network = shard(model, device, bf16)
        if materialize is not None:
            _materialize(model, device, materialize)
        return network
    if materialize is not None:
        _materialize(model, device, materialize)
    model.to(device)
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        # Gradients live in the all-reduce buckets (no copy in and out of them); the only
        # buffers are the rotary tables, equal on every rank: no broadcast before each forward.
        return nn.parallel.DistributedDataParallel(
            model, device_ids=ids, gradient_as_bucket_view=True, forward_sync_buffers=False
        )
    return model


# Recompilations a block's code may take beyond one per distinct layer shape: the shapes a
# step also meets (evaluation's last partial micro-batch, sequence lengths marked dynamic).
RECOMPILE_MARGIN = 4


def compile_blocks(model: Decoder) -> None:
    """torch.compile each block in place (its parameter names unchanged): the hand-written
    RMSNorm, rotary and SwiGLU become a few fused kernels instead of chains of element-wise ones.
    Per block rather than the whole model, as FSDP shards per block.

    Every block runs the same code, so dynamo counts their shapes against one recompile limit:
    a contracted model has one shape per contracted layer, and the limit is raised to hold them
    all. Past the limit, or where compilation fails, the block runs eagerly."""
    import torch._dynamo

    shapes = len({(layer.n_heads, layer.n_kv_heads, layer.mlp_hidden) for layer in model.config.layers})
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, shapes + RECOMPILE_MARGIN)
    config.suppress_errors = True  # a block dynamo or inductor cannot compile runs eagerly
    for block in model.blocks.values():
        block.compile()


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


@torch.no_grad()
def _materialize(model: nn.Module, device: torch.device, materialize: Materialize) -> None:
    decoder = trained_decoder(model)
    decoder.to_empty(device=device)  # uninitialized storage for this rank's part (a DTensor's local shard)
    if decoder.config.tie_embeddings and decoder.lm_head.weight is not decoder.embed.weight:
        decoder.lm_head.weight = decoder.embed.weight  # to_empty gives each module its own tensor
    materialize(decoder)
    decoder.reset_buffers(device)


def frozen_model(config, device: torch.device, materialize: Materialize, *, dtype: torch.dtype = torch.float32,
                 sharded: bool = False) -> Decoder:
    """A model that is only run forward (a contract job's teacher), built on the meta device and
    filled by `materialize` (load_shards) in `dtype`, its rotary tables fp32: on each rank whole,
    or, `sharded`, with FSDP2 over all ranks (the mesh the trained model is sharded over), so a
    rank holds 1/world of its blocks and embeddings and gathers one unit at a time to run it.

    Sharded, every block (and the embeddings, where the head does not share them) is its own
    unit, resharded after its forward pass; the final norm and the head stay whole on every
    rank, as the distillation loss reads the head's weight itself. The model is never called as
    a whole (the teacher runs forward_hidden), so no unit sits above the blocks: each gathers and
    frees its own weights as it runs."""
    with torch.device("meta"):
        model = Decoder(config)
    model.requires_grad_(False).to(dtype)
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in model.blocks.values():
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        if not config.tie_embeddings:
            fully_shard(model.embed, mesh=mesh, reshard_after_forward=True)
    _materialize(model, device, materialize)
    return model.eval()


def _rows(parameter: torch.Tensor) -> tuple[int, int]:
    """The rows [start, stop) of the whole tensor that this rank holds of `parameter`: all of a
    plain tensor; of FSDP's Shard(0) over one mesh dimension, the rank's torch.chunk of dim 0."""
    if not isinstance(parameter, DTensor):
        return 0, parameter.shape[0]
    if len(parameter.placements) != 1 or parameter.placements[0] != Shard(0):
        raise ValueError(f"cannot load a parameter placed as {parameter.placements}: FSDP's Shard(0) expected")
    n, world = parameter.shape[0], parameter.device_mesh.size()
    chunk = -(-n // world)
    start = min(parameter.device_mesh.get_local_rank() * chunk, n)
    return start, min(start + chunk, n)


def load_shards(model: nn.Module, files: list[Path], sources: dict[str, str | torch.Tensor | None]) -> None:
    """Fill each parameter of `model` with its rows of the tensor `sources` names for it in the
    safetensors `files` (None: zeros; a tensor: its rows, as a contract job gives the blocks it
    cut) — only those rows, as the files are read in place (memory-mapped), never a whole tensor
    per rank. Copied into the parameter's dtype."""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(safe_open(str(path), framework="pt")) for path in files]
        where = {name: file for file in opened for name in file.keys()}
        for name, parameter in model.named_parameters():
            local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
            start, stop = _rows(parameter)
            if stop - start != local.shape[0]:
                raise RuntimeError(f"{name}: rows {start}:{stop} of {tuple(parameter.shape)}, but the shard holds {local.shape[0]}")
            source = sources[name]
            if source is None:
                local.zero_()
            elif isinstance(source, torch.Tensor):
                local.copy_(source[start:stop])
            elif source not in where:
                raise ValueError(f"the weights in {files[0].parent} lack {source} (for {name})")
            else:
                local.copy_(where[source].get_slice(source)[start:stop])


def mixed_precision(device: torch.device, bf16: bool | None = None) -> MixedPrecisionPolicy:
    """bf16 weights gathered for compute, gradients reduced in fp32 (bf16 True; None: the job's
    precision on `device`), or fp32 throughout."""
    if computes_in_bf16(device) if bf16 is None else bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def trained_decoder(model: nn.Module) -> Decoder:
    """The Decoder `model` trains: itself, or the `student` of a distillation."""
    return getattr(model, "student", model)


def shard(model: Decoder, device: torch.device, bf16: bool | None = None) -> nn.Module:
    """FSDP2 over all ranks, unit by unit (blocks, embeddings, norm and head), then the root: the
    Decoder (a distillation's student: the module around it is no unit and holds no weight)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision(device, bf16)
    decoder = trained_decoder(model)
    for block in decoder.blocks.values():
        fully_shard(block, mesh=mesh, mp_policy=policy)
    if not decoder.config.tie_embeddings:  # a tied weight must live in one unit: the root's
        fully_shard(decoder.embed, mesh=mesh, mp_policy=policy)
        # The head runs last in the forward and first in the backward: gathering it again at
        # once would be wasted, so it stays gathered between the two.
        fully_shard([decoder.norm, decoder.lm_head], mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    fully_shard(decoder, mesh=mesh, mp_policy=policy)
    # Non-persistent buffers (the rotary tables) are the root's; fully_shard moved them.
    return model


def is_sharded(network: nn.Module) -> bool:
    return isinstance(trained_decoder(network), FSDPModule)


def reshard(network: nn.Module) -> None:
    """Put every FSDP unit of `network` back to its shards, so that its parameters are the shards
    themselves. A unit may be left gathered (the head and final norm: reshard_after_forward=False),
    and a copy read from its gathered parameters or written into them does not round-trip: a
    sharded contract job whose healing did harm delivered the healed head instead of the kept one
    (tests/training_image/test_contract_sharded.py, on a CPU where healing was not kept)."""
    for module in network.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def accumulating(network: nn.Module, last: bool, defer_gradient_sync: bool = False):
    """The context of one micro-batch's forward and backward: DDP skips its all-reduce until the
    last one. FSDP, with defer_gradient_sync, skips its reduce-scatter until the last one too,
    accumulating each unit's whole gradient in between (the memory plan counts them:
    whole_gradients); without it, it reduce-scatters every micro-batch and gradients accumulate
    in shards."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        return network.no_sync() if not last else contextlib.nullcontext()
    if isinstance(network, FSDPModule) and defer_gradient_sync:
        return _fsdp_sync(network, last)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_sync(network: FSDPModule, sync: bool):
    network.set_requires_gradient_sync(sync)  # every unit below the root too
    try:
        yield
    finally:
        network.set_requires_gradient_sync(True)


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


def leave(completed: bool) -> None:
    """Leave the process group. After a completed job every rank first waits for the others (rank 0
    may still be writing the outputs): a rank that tore its group down alone, with its peers' gloo
    connections and the store still open, was seen to abort at exit. After a failure the ranks
    leave as they are: a peer may be gone, and waiting for it would hang."""
    if not dist.is_initialized():
        return
    if completed:
        dist.barrier()
    dist.destroy_process_group()
