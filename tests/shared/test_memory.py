"""The memory plan's arithmetic against figures worked out by hand."""

import pytest

from shared.memory import (
    GIB,
    DoesNotFit,
    Instance,
    block_activation_bytes,
    bytes_per_gpu,
    plan,
)
from shared.shapes import ModelConfig, SIZES

LLAMA_8B = ModelConfig.uniform(
    vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, mlp_hidden=14336, context_length=8192
)
A10G = Instance(type="ml.g5.xlarge", gpus=1, gpu_memory_bytes=24 * 10**9)
A100_NODE = Instance(type="ml.p4d.24xlarge", gpus=8, gpu_memory_bytes=40 * 10**9)


def test_an_8b_model_holds_16_bytes_a_parameter_before_activations():
    assert LLAMA_8B.parameters() == 8_030_261_248  # Llama 3.1 8B's published count
    need = bytes_per_gpu(LLAMA_8B, seq_len=256, micro_batch=1, strategy="ddp", world_size=1, checkpointing=False)
    state = need.weights + need.gradients + need.optimizer
    assert state == 16 * 8_030_261_248  # about 128 GB
    assert round(state / 1e9) == 128
    assert need.autocast_weights == 2 * 8_030_261_248


def test_fsdp_shards_the_state_over_the_ranks():
    ddp = bytes_per_gpu(LLAMA_8B, seq_len=256, micro_batch=1, strategy="ddp", world_size=8, checkpointing=False)
    fsdp = bytes_per_gpu(LLAMA_8B, seq_len=256, micro_batch=1, strategy="fsdp", world_size=8, checkpointing=False)
    assert fsdp.weights + fsdp.gradients + fsdp.optimizer == 16 * (8_030_261_248 // 8)
    assert fsdp.activations == ddp.activations
    # The largest unit is the head (vocab x dim + the final norm): two gathered in bf16, and one
    # bf16 gradient and its fp32 copy for the reduction.
    head = 128256 * 4096 + 4096
    assert fsdp.working == head * (2 * 2 + 2 + 4)


def test_a_block_saves_what_its_tensors_add_up_to():
    # tiny: C=128, H=4, K=2, D=32, M=352; bf16 autocast (a=2) over an fp32 residual stream.
    layer = SIZES["tiny"].layers[0]
    norms = 2 * (128 * 4 + 4)
    # q/k/v input once, rotated q and k, v, attention output and log-sum-exp, o_proj's input.
    attention = 128 * 2 + 6 * 32 * 2 + 2 * 32 * 2 + 4 * 32 * 2 + 4 * 4 + 4 * 32 * 2
    mlp = 128 * 2 + 4 * 352 * 2
    assert block_activation_bytes(SIZES["tiny"], layer) == norms + attention + mlp == 5400


def test_checkpointing_keeps_only_block_inputs_and_one_block():
    config = SIZES["small"]
    full = bytes_per_gpu(config, seq_len=1024, micro_batch=4, strategy="ddp", world_size=1, checkpointing=False)
    ckpt = bytes_per_gpu(config, seq_len=1024, micro_batch=4, strategy="ddp", world_size=1, checkpointing=True)
    tokens = 4 * 1024
    per_block = block_activation_bytes(config, config.layers[0])
    assert full.activations - ckpt.activations == tokens * config.n_layers * (per_block - config.dim * 4)
    assert ckpt.recompute == tokens * per_block


def test_a_model_that_fits_keeps_ddp_and_the_whole_batch():
    p = plan(SIZES["tiny"], seq_len=256, batch_size=8, instances=[A10G])
    assert (p.strategy, p.instance_count, p.micro_batch, p.activation_checkpointing) == ("ddp", 1, 8, False)


def test_a_long_sequence_splits_the_batch_into_micro_batches():
    p = plan(SIZES["medium"], seq_len=2048, batch_size=32, instances=[A10G])
    assert p.strategy == "ddp" and 1 <= p.micro_batch < 32 and 32 % p.micro_batch == 0
    assert p.per_gpu.total <= A10G.usable_bytes
    bigger = bytes_per_gpu(
        SIZES["medium"], seq_len=2048, micro_batch=2 * p.micro_batch, strategy="ddp", world_size=1, checkpointing=False
    )
    assert bigger.total > A10G.usable_bytes  # the largest micro-batch that fits


def test_8b_on_a100s_is_sharded():
    p = plan(LLAMA_8B, seq_len=256, batch_size=64, instances=[A100_NODE])
    assert p.strategy == "fsdp" and p.world_size == 8
    assert p.per_gpu.total <= A100_NODE.usable_bytes


def test_a_job_no_instance_holds_is_refused_with_the_figures():
    with pytest.raises(DoesNotFit, match=r"needs at least [\d.]+ GiB per GPU, more than the [\d.]+ GiB usable .*ml\.g5\.xlarge"):
        plan(LLAMA_8B, seq_len=256, batch_size=64, instances=[A10G])


def test_more_instances_only_when_one_node_cannot_hold_the_shards():
    llama_70b = ModelConfig.uniform(
        vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, mlp_hidden=28672, context_length=8192
    )
    h100_node = Instance(type="ml.p5.48xlarge", gpus=8, gpu_memory_bytes=80 * 10**9)
    with pytest.raises(DoesNotFit):
        plan(llama_70b, seq_len=256, batch_size=64, instances=[h100_node], max_instance_count=1)
    p = plan(llama_70b, seq_len=256, batch_size=64, instances=[h100_node], max_instance_count=8)
    assert p.strategy == "fsdp" and p.instance_count > 1
    assert 16 * llama_70b.parameters() / p.world_size < p.per_gpu.total <= h100_node.usable_bytes
    assert p.per_gpu.total / GIB < 80


def test_a_deferred_fsdp_sync_holds_whole_fp32_gradients_and_the_plan_counts_them():
    each = bytes_per_gpu(LLAMA_8B, seq_len=256, micro_batch=1, strategy="fsdp", world_size=8, checkpointing=False)
    deferred = bytes_per_gpu(LLAMA_8B, seq_len=256, micro_batch=1, strategy="fsdp", world_size=8, checkpointing=False,
                             defer_gradient_sync=True)
    assert deferred.whole_gradients == 4 * 8_030_261_248 and each.whole_gradients == 0
    assert deferred.total - each.total == deferred.whole_gradients
    # DDP's gradients are whole anyway: deferring its all-reduce costs nothing.
    ddp = bytes_per_gpu(LLAMA_8B, seq_len=256, micro_batch=1, strategy="ddp", world_size=1, checkpointing=False,
                        defer_gradient_sync=True)
    assert ddp.whole_gradients == 0


def test_with_a_time_model_the_plan_takes_the_fastest_way_that_fits():
    # 8 A100s, 64 sequences of 256: FSDP fits without recomputation; a time model that makes
    # recomputation cheaper than sharding's micro-batches picks it instead, at a larger micro-batch.
    first = plan(LLAMA_8B, seq_len=256, batch_size=64, instances=[A100_NODE])
    timed = plan(LLAMA_8B, seq_len=256, batch_size=64, instances=[A100_NODE],
                 step_seconds=lambda p: (p.micro_batches * 10.0) + (1.0 if p.activation_checkpointing else 0.0))
    assert not first.activation_checkpointing and first.micro_batches > 1
    assert timed.micro_batches < first.micro_batches and timed.activation_checkpointing
    assert timed.batch_size == 64 and timed.micro_batch * timed.micro_batches * timed.world_size == 64
