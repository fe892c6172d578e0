"""Contraction: exact parameter counts, heads within KV groups, OBS costs, spared ends, distillation, quality, the container job."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch

from shared.shapes import SIZES, LayerShape, contracted_layers, forecast_contraction
from training_image import entry
from training_image.contract import (
    Distillation,
    _Surgeon,
    _allot_joint,
    _obs_heads,
    block_influence,
    choose_blocks,
    contract,
    contract_blocks,
    heads_to_remove,
    heal,
    layer_stats,
    units_to_remove,
)
from training_image import jobs
from training_image.jobs import run_contract_job
from training_image.evaluate import perplexity
from training_image.model import Decoder
from training_image.modeldir import load_model_dir, save_model_dir
from training_image.train import train_steps
from shared.settings import CONTRACT_EVALUATIONS, CONTRACT_HELDOUT_WINDOWS, CONTRACT_SEQ_LEN, ContractSettings
from training_image.evaluation import held_out
from training_image.tokens import TokenData

from .conftest import small_config, write_hyperparameters


pytestmark = pytest.mark.usefixtures("one_thread")


def _removed(before, after, chosen):
    """(MLP units, query heads, kv heads) the chosen layers lost, summed."""
    pairs = [(o, n) for bid, o, n in zip(before.ids(), before.layers, after.layers) if bid in chosen]
    return tuple(sum(getattr(o, f) - getattr(n, f) for o, n in pairs) for f in ("mlp_hidden", "n_heads", "n_kv_heads"))


@pytest.mark.parametrize("method", ["magnitude", "random", "wanda-sp"])
def test_parameter_count_is_what_the_config_predicts_and_totals_are_the_settings(debug_model, windows, method):
    train, _ = windows
    chosen = ["1", "2"]  # depth 4 allows sparing the first and last block
    model, config = contract_blocks(debug_model, debug_model.config, train[:8], 0.5, chosen, method=method)

    assert model.parameter_count() == config.parameters() < debug_model.config.parameters()
    assert model.block_ids == debug_model.block_ids == config.ids()
    assert [b for b, l, o in zip(config.ids(), config.layers, debug_model.config.layers) if l != o] == chosen
    units, heads, _ = _removed(debug_model.config, config, chosen)
    assert (units, heads) == (2 * units_to_remove(172, 0.5), 2 * heads_to_remove(4, 0.5)) == (172, 4)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_ours_removes_the_parameters_the_baselines_do_and_ratios_give_distinct_sizes(debug_model, windows, ratio):
    """Ours may trade heads for MLP units between and within layers, but not the size: the same
    parameters as the baselines' even counts, to within half an MLP unit."""
    train, _ = windows
    chosen = ["1", "2"]
    ours, config = contract_blocks(debug_model, debug_model.config, train[:8], ratio, chosen)
    _, even = contract_blocks(debug_model, debug_model.config, train[:8], ratio, chosen, method="magnitude")
    assert ours.parameter_count() == config.parameters()
    assert abs(config.parameters() - even.parameters()) <= 3 * debug_model.config.dim / 2
    assert [b for b, l, o in zip(config.ids(), config.layers, debug_model.config.layers) if l != o] == chosen
    assert ours(train[:1, :-1]).isfinite().all()
    assert contract_blocks(debug_model, debug_model.config, train[:8], ratio, chosen, even=True)[1] == even
    smaller, _ = contract_blocks(debug_model, debug_model.config, train[:8], ratio + 0.2, chosen, method="magnitude")
    assert smaller.parameter_count() < even.parameters() < debug_model.config.parameters()
    # The size the API forecasts (and the console shows) before the job runs is this size.
    forecast = forecast_contraction(debug_model.config, ratio, len(chosen))
    assert forecast.parameters_min == forecast.parameters_max == even.parameters()  # equal blocks: one outcome
    assert abs(forecast.parameters_min - config.parameters()) <= 3 * debug_model.config.dim / 2
    assert forecast.depth == config.n_layers
    after = sorted((c.after.model_dump_json() for c in forecast.layers for _ in range(c.count)))
    assert after == sorted(layer.model_dump_json() for layer in even.layers[1:3])  # the pruned blocks' shapes


def test_the_forecast_of_blocks_of_different_sizes_spans_the_choices():
    """A model contracted before has blocks of different widths: which ones the calibration picks
    decides the size, so the forecast gives the least and the most of the choices."""
    base = SIZES["tiny"]
    narrow = LayerShape(n_heads=2, n_kv_heads=1, mlp_hidden=100)
    config = base.model_copy(update={"layers": [base.layers[0], narrow, *base.layers[2:]]})
    forecast = forecast_contraction(config, 0.5, 1)
    removed = lambda layer: config.layer_parameters(layer) - config.layer_parameters(contracted_layers([layer], 0.5)[0])  # noqa: E731
    assert forecast.parameters_max == config.parameters() - removed(narrow)  # the narrow block chosen
    assert forecast.parameters_min == config.parameters() - removed(base.layers[1])  # a wide one
    assert forecast.parameters_min < forecast.parameters_max
    assert forecast_contraction(config, 0.5, config.n_layers).parameters_min == \
        config.parameters() - sum(config.layer_parameters(l) for l in config.layers) + \
        sum(config.layer_parameters(l) for l in contracted_layers(config.layers, 0.5))  # every block


def test_joint_allotment_is_the_least_error_way_to_remove_the_parameters():
    """Against brute force over every head shape and unit count of three layers (convex unit
    curves, where the greedy allotment of units is exact)."""
    generator = torch.Generator().manual_seed(3)
    unit_parameters, shapes = 3, [(2, 2), (2, 1), (1, 2), (1, 1)]
    curves = [torch.rand(7, generator=generator, dtype=torch.float64).cumsum(0).cumsum(0).tolist() for _ in range(3)]
    curves = [[c - curve[0] for c in curve] for curve in curves]
    options = [[(0, 0.0, (2, 2))] + [(5 * (4 - k * s) + 4 * (2 - k), torch.rand(1, generator=generator).item(), (k, s))
                                     for k, s in shapes[1:]] for _ in range(3)]
    for target in (0, 14, 25, 40):
        heads, units = _allot_joint(options, curves, unit_parameters, target)
        picked = {(l, shape) for l, shape in enumerate(heads)}
        size = sum(p for l, layer in enumerate(options) for p, _, shape in layer if (l, shape) in picked) + unit_parameters * sum(units)
        error = sum(c for l, layer in enumerate(options) for _, c, shape in layer if (l, shape) in picked)
        error += sum(curves[l][n] for l, n in enumerate(units))
        assert abs(size - target) <= unit_parameters / 2
        brute = min(sum(c for _, c, _ in combo) + sum(curves[l][n] for l, n in enumerate(ns))
                    for combo in itertools.product(*options) for ns in itertools.product(range(7), repeat=3)
                    if abs(sum(p for p, _, _ in combo) + unit_parameters * sum(ns) - target) <= unit_parameters / 2)
        assert error == pytest.approx(brute)


def test_head_choice_is_the_least_squares_best_where_the_choices_are_few():
    """4 query heads in 2 groups: the kept head of shape (1 group, 1 head) is the one of the four
    whose exact refit error is least, not only what greedy removal reaches."""
    shape, D = LayerShape(n_heads=4, n_kv_heads=2, mlp_hidden=8), 3
    for seed in (4, 16, 19):  # Grams where greedy removal of three heads keeps the wrong one
        generator = torch.Generator().manual_seed(seed)
        w = torch.randn(6, 4 * D, generator=generator, dtype=torch.float64)
        a = torch.randn(100, 4 * D, generator=generator, dtype=torch.float64) @ torch.randn(4 * D, 4 * D, generator=generator, dtype=torch.float64)
        options = _obs_heads(w, a.T @ a, shape, D)
        surgeon = _Surgeon(w, a.T @ a)
        errors = [surgeon.cost(torch.cat([torch.arange(g * D, (g + 1) * D) for g in range(4) if g != h])) for h in range(4)]
        error, kept = options[(1, 1)]
        assert error == pytest.approx(min(errors)) and kept == [[min(range(4), key=errors.__getitem__)]]


@pytest.mark.parametrize("ratio, shape", [(0.5, (4, 4)), (0.75, (2, 2))])
def test_query_heads_go_within_groups_and_a_group_only_with_its_last_head(windows, ratio, shape):
    config = small_config(head_dim=8, layers=[small_config().layers[0].model_copy(update={"n_heads": 8, "n_kv_heads": 4})] * 3)
    model = Decoder(config).init_weights(1)
    train, _ = windows
    new, new_config = contract_blocks(model, config, train[:4], ratio, ["1"], method="magnitude", refit=False)

    old_attn, attn = model.blocks["1"].attn, new.blocks["1"].attn
    assert (new_config.layers[1].n_heads, new_config.layers[1].n_kv_heads) == shape
    assert attn.q_proj.weight.shape == attn.o_proj.weight.T.shape == (shape[0] * 8, 64)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (shape[1] * 8, 64)
    # Which query heads survived, read off q_proj; the kept heads must compute exactly what they did
    # before, i.e. the old attention with the removed heads' o_proj columns zeroed.
    rows = lambda w, i: w[i * 8 : i * 8 + 8]  # noqa: E731
    kept = [h for h in range(8) if any(torch.equal(rows(old_attn.q_proj.weight, h), rows(attn.q_proj.weight, i)) for i in range(shape[0]))]
    assert len(kept) == shape[0]
    masked = Decoder(config)
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for h in set(range(8)) - set(kept):
            masked.blocks["1"].attn.o_proj.weight[:, h * 8 : h * 8 + 8] = 0
    x = train[:2, :-1]
    masked.blocks["1"].mlp = new.blocks["1"].mlp  # compare attention only
    torch.testing.assert_close(new(x), masked(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_heads, ratio, removed", [(4, 0.25, 1), (4, 0.75, 3), (8, 0.5, 4), (4, 0.1, 1), (8, 0.9, 7), (1, 0.5, 0), (4, 0.0, 0)])
def test_heads_to_remove(n_heads, ratio, removed):
    assert heads_to_remove(n_heads, ratio) == removed


def test_surgeon_costs_are_the_least_squares_error_of_what_is_kept():
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=generator, dtype=torch.float64)
    a = torch.randn(200, 10, generator=generator, dtype=torch.float64) @ torch.randn(10, 10, generator=generator, dtype=torch.float64)
    gram = a.T @ a
    surgeon = _Surgeon(w, gram)
    damped = gram + (surgeon.hinv.inverse() - gram)  # the ridge the surgeon works with
    for block in (torch.tensor([3]), torch.tensor([0, 7]), torch.tensor([5])):
        surgeon.remove(block)
    keep = torch.tensor([1, 2, 4, 6, 8, 9])
    refit = torch.linalg.solve(damped[keep][:, keep], (w @ damped[:, keep]).T).T
    full = torch.zeros_like(w)
    full[:, keep] = refit
    error = torch.trace((w - full) @ damped @ (w - full).T).item()
    assert surgeon.error == pytest.approx(error, rel=1e-6)
    torch.testing.assert_close(surgeon.w[:, keep], refit)  # the updates are the refit


def test_first_and_last_blocks_are_spared_while_depth_allows():
    ids = ["0", "1", "2", "2_1", "3"]
    influence = {"0": 0.0, "1": 0.5, "2": 0.2, "2_1": 0.1, "3": 0.01}
    assert choose_blocks(influence, 2, ids) == ["2", "2_1"]
    assert choose_blocks(influence, 3, ids) == ["1", "2", "2_1"]
    assert choose_blocks(influence, 4, ids) == ["0", "1", "2", "2_1"]  # the lower of the two ends first
    assert choose_blocks(influence, 5, ids) == ids
    with pytest.raises(ValueError, match="5-layer"):
        choose_blocks(influence, 6, ids)


def test_block_influence_is_zero_for_a_block_that_changes_nothing(debug_model, windows):
    with torch.no_grad():
        debug_model.blocks["2"].attn.o_proj.weight.zero_()
        debug_model.blocks["2"].mlp.down_proj.weight.zero_()
    influence = block_influence(debug_model, windows[0][:4])
    assert influence["2"] == pytest.approx(0.0, abs=1e-6)
    assert min(influence[b] for b in ("0", "1", "3")) > 1e-4


def test_a_contracted_model_loads_trains_and_contracts_again(tmp_path, debug_model, windows, tokenizer):
    train, _ = windows
    model, config = contract(debug_model, debug_model.config, train[:8], ratio=0.5, n_layers=2)
    save_model_dir(tmp_path / "contracted", model, tokenizer)
    loaded, _ = load_model_dir(tmp_path / "contracted")
    assert loaded.config == config
    torch.testing.assert_close(loaded(train[:2, :-1]), model(train[:2, :-1]))

    losses = train_steps(loaded, train, steps=3, lr=1e-3, batch_size=4)
    assert len(losses) == 3 and all(math.isfinite(l) for l in losses)

    again, again_config = contract(loaded, loaded.config, train[:8], ratio=0.5, n_layers=3)
    assert again.parameter_count() == again_config.parameters() < config.parameters()


def test_distillation_is_zero_on_the_source_and_healing_lowers_it(debug_model, windows):
    train, _ = windows
    x, y = train[:4, :-1], train[:4, 1:]
    with torch.no_grad():
        debug_model.lm_head.weight.mul_(20)  # a source with opinions: far from uniform next-token odds
    assert Distillation(debug_model, debug_model)(x, y).item() == pytest.approx(0.0, abs=1e-5)
    small, _ = contract_blocks(debug_model, debug_model.config, train[:8], 0.75, ["1", "2"])
    before = Distillation(small, debug_model)(x, y).item()
    losses = heal(small, debug_model, train[:4], steps=8, batch_size=4)  # at the healing lr
    assert before > 0.01 and Distillation(small, debug_model)(x, y).item() < before and len(losses) == 8
    assert not any(p.grad is not None for p in debug_model.parameters())  # the source is not trained
    lm = Distillation(small, debug_model, loss="lm")(x, y)
    torch.testing.assert_close(lm, small(x, y))


def test_wanda_sp_keeps_the_units_and_heads_of_largest_weight_times_input_norm(debug_model, windows):
    """Wanda-sp (An et al. 2024): an output projection's input column j scores mean_i |W_ij| x ||X_j||;
    a head the sum of its columns; every layer loses the same share (fp64 scores)."""
    train, _ = windows
    stats = layer_stats(debug_model, train[:8], ["1"])
    block = debug_model.blocks["1"]
    norms = stats["1"].mlp_gram.diagonal().sqrt()
    unit_score = block.mlp.down_proj.weight.double().abs().mean(0) * norms
    head_dim = block.attn.head_dim
    head_score = (block.attn.o_proj.weight.double().abs().mean(0) * stats["1"].attn_gram.diagonal().sqrt()).view(-1, head_dim).sum(1)
    new, config = contract_blocks(debug_model, debug_model.config, train[:8], 0.5, ["1"], method="wanda-sp",
                                  refit=False, stats=stats)
    kept_units = unit_score.argsort(descending=True)[: config.layers[1].mlp_hidden].sort().values
    assert torch.equal(new.blocks["1"].mlp.up_proj.weight, block.mlp.up_proj.weight[kept_units])
    # grouped-query attention: the best s heads of each group, in the k groups whose heads score most
    k, per_group = config.layers[1].n_kv_heads, block.attn.n_heads // block.attn.n_kv_heads
    s = config.layers[1].n_heads // k
    best = [sorted(range(g * per_group, (g + 1) * per_group), key=lambda h: -head_score[h].item())[:s]
            for g in range(block.attn.n_kv_heads)]
    groups = sorted(range(block.attn.n_kv_heads), key=lambda g: -sum(head_score[h].item() for h in best[g]))[:k]
    kept_heads = sorted(h for g in sorted(groups) for h in best[g])
    rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kept_heads])
    assert torch.equal(new.blocks["1"].attn.q_proj.weight, block.attn.q_proj.weight[rows])
    assert config.parameters() < debug_model.config.parameters()


def test_the_sequential_refit_is_the_plain_refit_at_the_first_cut_and_closer_to_the_source_after_several_fp32(
        debug_model, windows):
    """The cut blocks' output projections are refit in depth order against the source's residual
    stream (contract.reconstruct), fp32. A single cut's attention sees the source's own stream, so
    its o_proj is the plain least-squares refit; over several cut blocks the later refits also take
    back what the earlier cuts changed, and the final hidden states come closer to the source's."""
    train, _ = windows
    calibration = train[:16]
    model, config = debug_model.eval(), debug_model.config
    plain, _ = contract_blocks(model, config, calibration, 0.5, ["1"], sequential=False)
    sequential, _ = contract_blocks(model, config, calibration, 0.5, ["1"], sequential=True)
    torch.testing.assert_close(sequential.blocks["1"].attn.o_proj.weight, plain.blocks["1"].attn.o_proj.weight,
                               rtol=1e-4, atol=1e-6)
    assert torch.equal(sequential.blocks["1"].mlp.up_proj.weight, plain.blocks["1"].mlp.up_proj.weight)

    inputs = calibration[:, :-1]
    with torch.no_grad():
        source = model.forward_hidden(inputs)

        def error(sequential: bool) -> float:
            new, _ = contract_blocks(model, config, calibration, 0.5, config.ids()[1:-1], sequential=sequential)
            return ((new.forward_hidden(inputs) - source).pow(2).sum() / source.pow(2).sum()).item()

        plain_error, sequential_error = error(False), error(True)
    assert 0 < sequential_error < 0.95 * plain_error, (sequential_error, plain_error)


@pytest.mark.slow
def test_activation_aware_importance_beats_random_choice(windows):
    torch.manual_seed(0)
    train, heldout = windows
    model = Decoder(SIZES["debug"]).init_weights(0)
    train_steps(model, train, steps=120, lr=3e-3, batch_size=16)
    calibration, heldout = train[:32], heldout[:64]
    ours, _ = contract(model, model.config, calibration, ratio=0.5, n_layers=2)
    rivals = [contract(model, model.config, calibration, ratio=0.5, n_layers=2, method="random", seed=s)[0] for s in range(3)]
    base = perplexity(model, heldout)
    ours_ppl = perplexity(ours, heldout)
    random_ppl = sum(perplexity(m, heldout) for m in rivals) / len(rivals)
    assert base < ours_ppl < random_ppl


def _digests(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def _contract_hyperparameters(root: Path, **extra: str) -> None:
    values = {"job_type": "contract", "job_id": "contract-1", "source_model_id": "model-abc",
              "contraction_ratio": "0.5", "num_layers_to_contract": "2", "train_steps": "2"}
    write_hyperparameters(root, **{**values, **extra})


@pytest.mark.slow
def test_container_contract_job_end_to_end(ml_root, monkeypatch, capsys):
    monkeypatch.setenv("FUSION_ML_ROOT", str(ml_root))
    _contract_hyperparameters(ml_root)
    source = ml_root / "input/data/model"
    before = _digests(source)

    assert entry.main() == 0

    assert _digests(source) == before
    metrics = json.loads((ml_root / "model/metrics.json").read_text())
    assert json.loads((ml_root / "output/data/metrics.json").read_text()) == metrics
    model, _ = load_model_dir(ml_root / "model")
    assert model.parameter_count() == metrics["parameters_after"] == model.config.parameters()
    assert metrics["parameters_before"] == SIZES["debug"].parameters() > metrics["parameters_after"]
    assert metrics["config"] == model.config.model_dump()
    assert metrics["layers_contracted"] == ["1", "2"]
    assert metrics["training_tokens"] == 2 * 256
    assert (metrics["job_id"], metrics["job_type"], metrics["depth_after"]) == ("contract-1", "contract", 4)
    for key in ("perplexity_before", "perplexity_after_pruning", "perplexity_after_healing"):
        assert math.isfinite(metrics[key]) and metrics[key] > 1
    # model/ holds the healed weights unless healing made held-out perplexity worse
    assert metrics["healing_kept"] == (metrics["perplexity_after_healing"] <= metrics["perplexity_after_pruning"])
    assert metrics["final_perplexity"] == min(metrics["perplexity_after_healing"], metrics["perplexity_after_pruning"])
    progress = json.loads((ml_root / "checkpoints/progress.json").read_text())
    assert (progress["job_type"], progress["step"], progress["total_steps"]) == ("contract", 2, 2)
    out = capsys.readouterr().out
    assert "heldout_perplexity=" in out and "train_loss=" in out
    assert out.count("contract_stage=") == CONTRACT_EVALUATIONS  # the forward passes its price counts


@pytest.mark.slow
def test_healing_that_makes_the_model_worse_is_not_delivered(ml_root, monkeypatch):
    """A healing run that raises held-out perplexity (here: a learning rate that wrecks the
    weights) is reported and billed, but model/ holds the pruned weights and final_perplexity is theirs."""
    settings = ContractSettings(source_model_id="m", num_layers_to_contract=2, contraction_ratio=0.5)
    plain = run_contract_job(settings, ml_root, "contract-3", log=lambda line: None)
    pruned = load_model_dir(ml_root / "model")[0].state_dict()
    assert plain.healing_kept is None

    monkeypatch.setattr(jobs, "HEAL_LR", 1.0)
    lines = []
    healed = run_contract_job(settings.model_copy(update={"train_steps": 3}), ml_root, "contract-4", log=lines.append)

    assert healed.perplexity_after_pruning == plain.perplexity_after_pruning < healed.perplexity_after_healing
    assert healed.healing_kept is False and healed.final_perplexity == plain.final_perplexity
    assert healed.tokens_processed > 0 and healed.training_tokens == settings.model_copy(update={"train_steps": 3}).training_tokens()
    delivered = load_model_dir(ml_root / "model")[0].state_dict()
    assert delivered.keys() == pruned.keys() and all(torch.equal(delivered[k], pruned[k]) for k in pruned)
    assert any("delivering the pruned weights" in line for line in lines)


@pytest.mark.slow
def test_container_contract_reads_a_tarball_and_leaves_it_unchanged(ml_root, tmp_path):
    source = ml_root / "input/data/model"
    packed = tmp_path / "packed"
    packed.mkdir()
    with tarfile.open(packed / "model.tar.gz", "w:gz") as tar:
        for f in source.iterdir():
            tar.add(f, arcname=f.name)
    for f in source.iterdir():
        f.unlink()
    source.rmdir()
    packed.rename(source)
    before = _digests(source)

    settings = ContractSettings(source_model_id="m", num_layers_to_contract=1, contraction_ratio=0.25)
    metrics = run_contract_job(settings, ml_root, "contract-2", log=lambda line: None)

    assert _digests(source) == before
    assert metrics.perplexity_after_healing is None
    assert metrics.final_perplexity == metrics.perplexity_after_pruning
    # source and pruned model on the same windows, which the metrics name
    assert (metrics.heldout.source, metrics.heldout.seq_len) == ("split", CONTRACT_SEQ_LEN)
    data = TokenData(ml_root / "tokens")
    windows = data.heldout_windows()[:CONTRACT_HELDOUT_WINDOWS]
    assert metrics.heldout == held_out(windows, "split", data)
    source, _ = load_model_dir(ml_root / "input/data/model")
    assert metrics.perplexity_before == pytest.approx(perplexity(source, windows), rel=1e-6)
    assert len(metrics.layers_contracted) == 1 and metrics.layers_contracted[0] in ("1", "2")
    assert load_model_dir(ml_root / "model")[0].parameter_count() == metrics.parameters_after


def test_container_rejects_more_layers_than_the_source_has(ml_root):
    settings = ContractSettings(source_model_id="m", num_layers_to_contract=5)
    with pytest.raises(ValueError, match="depth 4"):
        run_contract_job(settings, ml_root, "contract-3", log=lambda line: None)
    assert not (ml_root / "model").exists()


@pytest.mark.slow
def test_held_out_passes_run_at_the_healing_micro_batch(ml_root, monkeypatch):
    """Before and after healing, the held-out loss is computed within the plan: at the healing's
    micro-batch (its chunk of logits), not at a batch of its own beside the optimizer's state."""
    from shared.memory import Layout
    from training_image.evaluate import DEFAULT_EVAL_BATCH, heldout_loss

    batches = []

    def recording(model, windows, batch_size=DEFAULT_EVAL_BATCH, **options):
        batches.append(batch_size)
        return heldout_loss(model, windows, batch_size, **options)

    monkeypatch.setattr(jobs, "heldout_loss", recording)
    settings = ContractSettings(source_model_id="m", num_layers_to_contract=2, contraction_ratio=0.5, train_steps=1)
    run_contract_job(settings, ml_root, "contract-5", log=lambda line: None, layout=Layout(micro_batch=1))
    assert batches == [1, 1]  # pruned, healed


@pytest.mark.slow
def test_healing_on_a_small_dataset_steps_on_smaller_batches(ml_root, corpus):
    """A healing dataset of few windows is read in smaller batches (shapes.healing_batch_size):
    every step reads what the rule says, and the tokens processed are its count."""
    from shared.shapes import batch_size_for, healing_batch_size

    training = ml_root / "input/data/training"
    for path in sorted(training.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (training / "small.txt").write_text("\n".join(corpus)[:20_000])
    settings = ContractSettings(source_model_id="m", num_layers_to_contract=1, contraction_ratio=0.25, train_steps=3)
    metrics = run_contract_job(settings, ml_root, "contract-6", log=lambda line: None)

    windows = len(TokenData(ml_root / "tokens").train_windows())
    parameters = metrics.parameters_after
    batch = healing_batch_size(parameters, CONTRACT_SEQ_LEN, windows)
    assert batch < batch_size_for(parameters, CONTRACT_SEQ_LEN)  # the dataset is small enough to matter
    assert metrics.tokens_processed == settings.train_steps * batch * CONTRACT_SEQ_LEN
