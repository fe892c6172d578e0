"""The price formula of docs/architecture.md §5 against figures computed by hand."""

from decimal import Decimal
from pathlib import Path

import pytest

from shared.pricing import LLAMA_SHAPES, bill, estimate_contract, estimate_train, plan_table, price_table, tier_table
from shared.settings import ContractSettings, TrainSettings
from shared.shapes import SIZES, ModelConfig, batch_size_for, grown_config

# By hand, SIZES["debug"] (vocab 512, dim 64, 4 blocks, 4 heads of 16, 2 KV heads, MLP 172):
#   block = attention 64*64 + 2*64*32 + 64*64 = 12288, MLP 3*64*172 = 33024, norms 128 -> 45440
#   model = embeddings 2*512*64 + final norm 64 + 4 blocks = 65600 + 181760 = 247360
#   grown = one block more -> 292800; growth adds 45440 parameters.
DEBUG_BASE, DEBUG_BLOCK = 247_360, 45_440


def test_debug_shapes_by_hand():
    assert SIZES["debug"].parameters() == DEBUG_BASE


def test_default_train_estimate_by_hand():
    # 1 turn x 6 cycles x 1000 steps x 256 tokens = 1,536,000 tokens at xs (0.40/M) = 0.6144
    # growth 45440 params x 0.02/M = 0.0009088; total 0.6153088 -> 0.62
    e = estimate_train(TrainSettings(), SIZES["debug"])
    assert e.training_tokens == 1_536_000
    assert e.parameters == DEBUG_BASE + DEBUG_BLOCK
    assert (e.tier, e.usd_per_million_tokens) == ("xs", Decimal("0.40"))
    assert e.training_cost == Decimal("0.6144")
    assert e.growth_parameters == DEBUG_BLOCK
    assert e.growth_fee == Decimal("0.0009088")
    assert e.contraction_fee == 0
    assert e.total == Decimal("0.62")


def test_turns_scale_training_not_the_growth_fee():
    one = estimate_train(TrainSettings(turns=1), SIZES["debug"])
    three = estimate_train(TrainSettings(turns=3), SIZES["debug"])
    assert three.training_cost == 3 * one.training_cost
    assert three.growth_fee == one.growth_fee


def test_large_model_prices_at_the_grown_tier_by_hand():
    # large: block = 2048*2048 + 2*2048*256 + 2048*2048 + 3*2048*5632 + 4096 = 44,044,288
    # base = 2*32768*2048 + 2048 + 22 blocks = 1,103,194,112; growth adds 5 blocks (one per 4)
    # grown = 1,323,415,552 -> tier s (<= 1.5B) at 1.00/M: 1.536 + 220,221,440 x 0.02/M = 5.9404288
    e = estimate_train(TrainSettings(), SIZES["large"])
    assert SIZES["large"].parameters() == 1_103_194_112
    assert e.parameters == 1_323_415_552
    assert e.tier == "s"
    assert e.growth_fee == Decimal("4.4044288")
    assert e.total == Decimal("5.94")


def test_contract_estimate_by_hand():
    # flat fee of the source's tier (xs: 1.00) + healing 100 steps x 256 tokens x 0.40/M = 1.01024
    e = estimate_contract(ContractSettings(source_model_id="m", train_steps=100), SIZES["debug"])
    assert e.training_tokens == 25_600
    assert e.contraction_fee == Decimal("1.00")
    assert e.growth_fee == 0
    assert e.total == Decimal("1.01")


@pytest.mark.parametrize("parameters, tier", [
    (1, "xs"), (150_000_000, "xs"), (150_000_001, "s"), (1_500_000_000, "s"), (1_500_000_001, "m"),
    (8_000_000_000, "m"), (20_000_000_000, "l"), (20_000_000_001, "xl"),
])
def test_tier_boundaries(parameters, tier):
    assert price_table().tier_for(parameters).name == tier


def test_bill_is_pro_rata_to_tokens_with_fees_in_full():
    e = estimate_train(TrainSettings(), SIZES["debug"])
    assert bill(e, e.training_tokens) == e.total
    # half the tokens: 0.3072 + 0.0009088 = 0.3081088 -> 0.31
    assert bill(e, e.training_tokens // 2) == Decimal("0.31")
    assert bill(e, 0) == e.minimum_charge == Decimal("0.01")  # the 0.0009088 growth fee alone rounds to 0.00
    assert bill(e, 10 * e.training_tokens) == e.total  # never more than the estimate


def test_max_runtime_has_margin_and_a_floor():
    e = estimate_train(TrainSettings(), SIZES["large"])
    assert e.max_runtime_seconds >= max(3600, 2 * e.eta_seconds - 1)


def _attention(config: ModelConfig, seq_len: int) -> int:
    """Causal attention's forward FLOPs per token over all layers: q k^T and the sum over v."""
    return 2 * sum(layer.n_heads for layer in config.layers) * config.head_dim * seq_len


def test_eta_prices_the_batch_the_trainer_runs():
    # small grows to 144,727,296 parameters; the trainer runs 16
    # sequences a step at that size, so 1,536,000 billed tokens are 24,576,000 trained: 6 x N
    # plus 3 x attention FLOPs a token, at 40% of 50 TFLOP/s. One GPU: no communication.
    e = estimate_train(TrainSettings(), SIZES["small"])
    assert e.parameters == 144_727_296 and batch_size_for(e.parameters) == 16
    assert e.instance_type == "ml.g5.xlarge"
    per_token = 6 * 144_727_296 + 3 * _attention(grown_config(SIZES["small"]), 256)
    assert e.eta_seconds == round(300 + per_token * 1_536_000 * 16 / (50e12 * 0.4)) == 1389


def test_attention_flops_grow_with_the_sequence():
    from shared.pricing import flops_per_token

    config = LLAMA_SHAPES["llama-8b"]
    six_n = 6 * config.parameters()
    # Causal: each query reads half the sequence on average.
    assert flops_per_token(config, 2048) / six_n == pytest.approx(1.033, abs=1e-3)
    assert flops_per_token(config, 8192) / six_n == pytest.approx(1.134, abs=1e-3)


def test_a_multi_node_fsdp_step_is_priced_by_its_communication():
    # llama-70b (grown to 87.7B) on 4 p5 instances: 2,097,152 tokens a step, 256 sequences a
    # rank. Its whole fp32 gradients (351 GB) fit no GPU, so FSDP reduce-scatters every
    # micro-batch: each gathers the bf16 weights twice and reduce-scatters fp32 gradients, 8
    # bytes a parameter x 31/32, over 400 GB/s of EFA per instance. Recomputing activations buys
    # micro-batches of 8 sequences (one a rank without): 32 micro-batches, not 256, and a step
    # that is compute-bound.
    from shared.pricing import step_seconds, memory_plan

    table = price_table()
    e = estimate_train(TrainSettings(), LLAMA_SHAPES["llama-70b"])
    grown = grown_config(LLAMA_SHAPES["llama-70b"])
    chosen = memory_plan(grown, 256, table.tier_for(grown.parameters()), table)
    compute, communication = step_seconds(grown, 256, chosen, table)
    assert batch_size_for(grown.parameters(), 256) * 256 == 2_097_152
    assert (chosen.world_size, chosen.micro_batch, chosen.micro_batches) == (32, 8, 32)
    assert chosen.activation_checkpointing and not chosen.defer_gradient_sync
    assert communication == pytest.approx(32 * 8 * grown.parameters() * 31 / 32 / 400e9)
    assert compute > communication
    steps = TrainSettings().training_tokens() / 256
    assert e.eta_seconds == round(300 + steps * compute)
    # Without recomputation the same batch would take 256 micro-batches of one sequence.
    eager = chosen.model_copy(update={"activation_checkpointing": False, "micro_batch": 1})
    assert step_seconds(grown, 256, eager, table)[1] == pytest.approx(8 * communication)


def test_a_deferred_gradient_sync_reduce_scatters_once_a_step():
    from shared.pricing import communication_bytes, memory_plan

    table = price_table()
    large = grown_config(SIZES["large"])
    chosen = memory_plan(large, 256, table.tier_for(large.parameters()), table)
    # 128 sequences over 4 A10Gs, 4 micro-batches of 8: gathers for each, one reduce-scatter.
    assert (chosen.strategy, chosen.world_size, chosen.micro_batches, chosen.defer_gradient_sync) == ("fsdp", 4, 4, True)
    assert chosen.per_gpu.whole_gradients == 4 * large.parameters()
    assert communication_bytes(chosen, large.parameters()) == pytest.approx(
        3 / 4 * large.parameters() * (4 * 4 + 4))
    each = chosen.model_copy(update={"defer_gradient_sync": False})
    assert communication_bytes(each, large.parameters()) == pytest.approx(3 / 4 * large.parameters() * 8 * 4)


def test_a_measured_utilization_replaces_the_assumed_one_on_its_instance_type_only():
    table = price_table()
    measured = table.model_copy(update={"measured_flops_utilization": {"ml.g5.xlarge": 0.5}})
    e = estimate_train(TrainSettings(), SIZES["small"], table=measured)
    per_token = 6 * 144_727_296 + 3 * _attention(grown_config(SIZES["small"]), 256)
    assert e.eta_seconds == round(300 + per_token * 1_536_000 * 16 / (50e12 * 0.5))
    other = estimate_train(TrainSettings(), SIZES["large"], table=measured)  # ml.g5.12xlarge: still assumed
    assert other.eta_seconds == estimate_train(TrainSettings(), SIZES["large"], table=table).eta_seconds


def test_the_estimate_runs_where_the_memory_plan_puts_it():
    # large grows to 1,323,415,552 parameters, 128 sequences (32,768 tokens) a step: a replica
    # does not fit one 24 GB A10G (16 bytes a parameter is 19.7 GiB before activations), so tier
    # s's second type, 4 A10Gs, shards it; the ETA is that instance's throughput.
    e = estimate_train(TrainSettings(), SIZES["large"])
    assert (e.instance_type, e.instance_count, e.strategy, e.activation_checkpointing) == (
        "ml.g5.12xlarge", 1, "fsdp", False)
    assert e.micro_batch == 8 and e.defer_gradient_sync and not e.spot
    assert e.sequences_per_step == 128
    large = grown_config(SIZES["large"])
    per_token = 6 * 1_323_415_552 + 3 * _attention(large, 256)
    assert e.eta_seconds == round(300 + per_token * 1_536_000 * 128 / (200e12 * 0.4))


def test_recomputing_activations_costs_a_forward_pass_more_in_the_eta():
    table = price_table()
    xs = table.tiers[0].model_copy(update={"max_parameters": None})
    one_gpu = table.model_copy(update={"tiers": [xs]})
    # medium's shape with 32 layers at an 8k context: its state fits one A10G, a sequence's
    # activations do not (24 layers now fit: the loss no longer holds a sequence's logits).
    long = ModelConfig.uniform(
        vocab_size=32768, dim=1024, n_layers=32, n_heads=16, n_kv_heads=8, mlp_hidden=2816, context_length=8192
    )
    settings = TrainSettings(seq_len=8192)
    e = estimate_train(settings, long, table=one_gpu)
    assert e.instance_type == "ml.g5.xlarge" and e.activation_checkpointing and e.strategy == "ddp"
    per_token = 8 * e.parameters + 4 * _attention(grown_config(long), 8192)
    flops = per_token * settings.training_tokens() * batch_size_for(e.parameters, 8192)
    assert e.eta_seconds == round(300 + flops / (50e12 * 0.4))


def test_a_job_no_instance_of_its_tier_holds_is_refused():
    from shared.memory import DoesNotFit

    table = price_table()
    xl = table.tiers[-1].model_copy(update={"max_instance_count": 1})
    one_node = table.model_copy(update={"tiers": [*table.tiers[:-1], xl]})
    with pytest.raises(DoesNotFit, match="ml.p5.48xlarge"):
        estimate_train(TrainSettings(), LLAMA_SHAPES["llama-70b"], table=one_node)
    assert estimate_train(TrainSettings(), LLAMA_SHAPES["llama-70b"]).instance_count == 4


def test_every_tier_plans_on_instances_the_table_describes():
    table = price_table()
    for tier in table.tiers:
        for instance_type in tier.instance_types:
            assert table.instance(instance_type).gpus >= 1
            assert instance_type in table.flops_per_second


def test_the_memory_plan_document_shows_the_plan_the_code_makes():
    document = (Path(__file__).parents[2] / "docs" / "memory-plan.md").read_text()
    assert plan_table() in document
    assert tier_table() in document
