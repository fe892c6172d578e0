"""A contract job's memory plan: the teacher beside the student (sharded with it), one source block
at a time while choosing, the chunked distillation loss, and the host's RAM; priced, admitted up
to llama-70b, and refused with it."""

import pytest

from shared import pricing
from shared.memory import (
    GIB,
    DoesNotFit,
    Instance,
    bytes_per_gpu,
    choosing_bytes,
    contract_host_bytes,
    contract_output_host_bytes,
    distillation_peak_bytes,
    healing_bytes,
    logits_peak_bytes,
    plan_contract,
)
from shared.pricing import LLAMA_SHAPES, estimate_contract
from shared.settings import CONTRACT_SEQ_LEN, ContractSettings
from shared.shapes import SIZES, batch_size_for

LLAMA_8B, LLAMA_70B = LLAMA_SHAPES["llama-8b"], LLAMA_SHAPES["llama-70b"]
P5 = pricing.price_table().instance("ml.p5.48xlarge")


def _settings(layers: int = 8) -> ContractSettings:
    return ContractSettings(source_model_id="model-abc", contraction_ratio=0.5, num_layers_to_contract=layers,
                            train_steps=100)


def test_healing_holds_the_students_training_state_and_the_teacher_in_bf16():
    source, student = LLAMA_8B, SIZES["small"]  # any smaller shape stands for a contracted one
    heal = healing_bytes(source, student, seq_len=256, micro_batch=2, strategy="ddp", world_size=1,
                         checkpointing=False)
    train = bytes_per_gpu(student, seq_len=256, micro_batch=2, strategy="ddp", world_size=1, checkpointing=False)
    # The student's state and activations are a train job's; the teacher's weights are whole (replicated), bf16.
    assert (heal.weights, heal.gradients, heal.optimizer, heal.activations) == (
        train.weights, train.gradients, train.optimizer, train.activations)
    assert heal.teacher > 2 * source.parameters() and heal.teacher < 2 * source.parameters() + GIB
    # The loss: two models' chunks of logits, never a micro-batch's whole logits.
    assert heal.logits == distillation_peak_bytes(student, 512) >= logits_peak_bytes(student, 512)
    tokens = 64 * 8192
    assert distillation_peak_bytes(LLAMA_8B, tokens) == distillation_peak_bytes(LLAMA_8B, 4 * tokens)
    assert heal.total == train.total - train.logits + heal.logits + heal.teacher


def test_a_sharded_student_heals_beside_a_teacher_sharded_over_the_same_ranks():
    source, student = LLAMA_70B, LLAMA_70B
    world = 32
    heal = healing_bytes(source, student, seq_len=256, micro_batch=1, strategy="fsdp", world_size=world,
                         checkpointing=False)
    replicated = healing_bytes(source, student, seq_len=256, micro_batch=1, strategy="ddp", world_size=1,
                               checkpointing=False)
    head = 2 * (source.vocab_size * source.dim + source.dim)  # bf16, whole on every rank
    block = 2 * source.layer_parameters(source.layers[0])
    shard = 2 * (source.parameters() - source.vocab_size * source.dim - source.dim) / world
    # Its shard of the blocks and embeddings, the whole head, two gathered units (the embeddings are the largest).
    gathered = 2 * max(block, 2 * source.vocab_size * source.dim)
    assert heal.teacher - (replicated.teacher - 2 * source.parameters()) == pytest.approx(shard + head + gathered, abs=2 * world)
    assert heal.teacher < replicated.teacher / 8


def test_choosing_holds_one_source_block_not_the_source():
    student = SIZES["small"]
    few, many = choosing_bytes(LLAMA_8B, student, 2, 256), choosing_bytes(LLAMA_8B, student, 8, 256)
    gram = (14336 ** 2 + 4096 ** 2) * 8  # one layer's MLP and attention Grams, fp64
    # One block's Grams on the GPU whatever the layers chosen; the chosen layers' Grams wait on the host.
    assert few == many
    assert gram < few < 4 * LLAMA_8B.parameters() / 3  # far below the fp32 source (4 bytes a parameter)
    assert choosing_bytes(LLAMA_70B, LLAMA_70B, 8, 256) < 4 * LLAMA_70B.parameters() / 8
    host_few = contract_host_bytes(LLAMA_8B, student, True, chosen_layers=2, strategy="fsdp", world_size=8)
    host_many = contract_host_bytes(LLAMA_8B, student, True, chosen_layers=8, strategy="fsdp", world_size=8)
    block = 4 * LLAMA_8B.layer_parameters(LLAMA_8B.layers[0])
    assert host_many - host_few == 6 * (gram + block)  # the chosen layers' Grams and cut blocks


def test_the_8b_and_70b_contracts_are_sharded_on_p5():
    chosen = plan_contract(LLAMA_8B, seq_len=CONTRACT_SEQ_LEN, batch_size=batch_size_for(LLAMA_8B.parameters()),
                           instances=[P5], chosen_layers=8, max_instance_count=2)
    assert (chosen.instance_type, chosen.instance_count, chosen.strategy) == ("ml.p5.48xlarge", 1, "fsdp")
    assert max(chosen.per_gpu.total, chosen.choosing_per_gpu) <= chosen.gpu_usable_bytes
    assert chosen.host_per_rank == contract_host_bytes(LLAMA_8B, LLAMA_8B, True, chosen_layers=8, strategy="fsdp",
                                                       world_size=8)
    # No rank holds the fp32 source on the host; the delivered model is gathered on one.
    assert chosen.host_per_rank < 4 * LLAMA_8B.parameters()
    assert chosen.host_per_instance == 8 * chosen.host_per_rank + contract_output_host_bytes(LLAMA_8B)
    # Replicated, the 8B student's AdamW state alone (16 bytes a parameter) is more than a GPU.
    assert bytes_per_gpu(LLAMA_8B, seq_len=256, micro_batch=1, strategy="ddp", world_size=1,
                         checkpointing=True).total > P5.usable_bytes
    big = plan_contract(LLAMA_70B, seq_len=CONTRACT_SEQ_LEN, batch_size=batch_size_for(LLAMA_70B.parameters()),
                        instances=[P5], chosen_layers=8, max_instance_count=8)
    assert (big.instance_type, big.strategy) == ("ml.p5.48xlarge", "fsdp") and big.instance_count > 1
    assert max(big.per_gpu.total, big.choosing_per_gpu) <= big.gpu_usable_bytes
    assert big.host_per_instance <= P5.host_usable_bytes
    # On one instance the 70B student's sharded training state alone is more than its GPUs hold.
    with pytest.raises(DoesNotFit, match="per GPU"):
        plan_contract(LLAMA_70B, seq_len=CONTRACT_SEQ_LEN, batch_size=batch_size_for(LLAMA_70B.parameters()),
                      instances=[P5], chosen_layers=8, max_instance_count=1)


def test_a_contract_that_fits_the_gpu_but_not_the_hosts_ram_is_refused_with_the_reason():
    roomy_gpu = Instance(type="big-gpu", gpus=8, gpu_memory_bytes=10**12, host_memory_bytes=64 * GIB)
    with pytest.raises(DoesNotFit, match="host memory"):
        plan_contract(LLAMA_8B, seq_len=256, batch_size=64, instances=[roomy_gpu], chosen_layers=8)
    unplanned_host = roomy_gpu.model_copy(update={"host_memory_bytes": None})
    assert plan_contract(LLAMA_8B, seq_len=256, batch_size=64, instances=[unplanned_host], chosen_layers=8)


def test_the_contract_estimate_runs_where_the_contract_plan_says():
    estimate = estimate_contract(_settings(), LLAMA_SHAPES["llama-1b"])
    chosen = plan_contract(LLAMA_SHAPES["llama-1b"], seq_len=CONTRACT_SEQ_LEN,
                           batch_size=batch_size_for(LLAMA_SHAPES["llama-1b"].parameters()),
                           instances=[pricing.price_table().instance(t) for t in ("ml.g5.2xlarge", "ml.g5.12xlarge")],
                           chosen_layers=8)
    # Healing a 1B student does not fit one A10G: the 4-GPU instance, the student sharded.
    assert (estimate.instance_type, estimate.strategy, estimate.micro_batch) == (
        chosen.instance_type, chosen.strategy, chosen.micro_batch) == ("ml.g5.12xlarge", "fsdp", chosen.micro_batch)
    big = estimate_contract(_settings(), LLAMA_70B)
    assert (big.instance_type, big.strategy) == ("ml.p5.48xlarge", "fsdp")


def test_on_a_cpu_the_host_holds_both_phases_and_the_kept_copy():
    source, student = SIZES["small"], SIZES["small"].model_copy(update={"n_layers": 10, "layers": SIZES["small"].layers[:10]})
    heal = healing_bytes(source, student, seq_len=256, micro_batch=1, strategy="ddp", world_size=1,
                         checkpointing=False, compute_bytes=4)
    host = contract_host_bytes(source, student, False, chosen_layers=4, seq_len=256, healing=heal)
    assert heal.autocast_weights == 0  # fp32: no bf16 copies
    assert host >= heal.total + 4 * student.parameters()
    # With a GPU the host keeps the pruned weights (this rank's shard when sharded), not the source.
    replicated = contract_host_bytes(source, student, True, chosen_layers=4)
    sharded = contract_host_bytes(source, student, True, chosen_layers=4, strategy="fsdp", world_size=4)
    assert sharded < 4 * student.parameters() <= replicated


def test_the_documented_contract_table_is_the_codes():
    from pathlib import Path

    from shared.pricing import contract_plan_table

    document = (Path(__file__).parents[2] / "docs/memory-plan.md").read_text()
    assert contract_plan_table() in document
