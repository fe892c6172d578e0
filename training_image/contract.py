"""Contraction: structured pruning of a trained Decoder into a smaller dense one.

1. Block Influence (1 - mean cosine between a block's input and output hidden states, on a
   calibration sample) ranks how much each block changes the residual stream.
2. The `n` least influential blocks are picked, sparing the first and last while depth allows.
3. In each picked block, `ratio` of the MLP hidden units and of the attention KV groups (a kv
   head with the query heads it serves) are removed by activation-aware importance: the energy a
   unit sends into the residual stream on the calibration sample, ||W_out column||^2 x E[a^2],
   i.e. output-projection weight magnitude times the norm of its input activation (Wanda-sp /
   FLAP). The kept output-projection columns are then refit by least squares so that the kept
   units reproduce, as well as they can, what the whole layer wrote (the model has no biases,
   so FLAP's bias compensation has nowhere to go; the refit plays that role).
4. The result is a new Decoder whose config records every layer's own sizes; block ids are kept.

Two baselines remove exactly the same units per layer count: weight magnitude and random.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.distributed as dist

from shared.settings import CONTRACT_SEQ_LEN, ContractSettings, TrainSettings
from shared.shapes import LayerShape, ModelConfig
from training_image.data import read_texts, token_windows
from training_image.evaluate import heldout_loss
from training_image.model import Decoder
from training_image.modeldir import load_model_dir
from training_image import runtime
from training_image.train import Trainer, TrainPlan

Method = Literal["activation", "magnitude", "random"]
CALIBRATION_BATCH = 8
RIDGE = 1e-3  # relative ridge of the least-squares refit, for rank-deficient activation Grams


# ----------------------------------------------------------------------------- block influence


def _inputs(windows: torch.Tensor) -> torch.Tensor:
    """Token ids to feed: a window of seq_len+1 tokens gives seq_len inputs."""
    return windows[:, :-1] if windows.shape[1] > 1 else windows


def _calibrate(model: Decoder, hooks: list, calibration_windows: torch.Tensor, batch_size: int) -> int:
    """Run the calibration windows through the blocks in eval mode with the hooks attached; the hooks
    are removed and the model's mode restored even if a batch fails. Returns the input tokens fed."""
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        device = next(model.parameters()).device
        for batch in _inputs(calibration_windows).split(batch_size):
            model.forward_hidden(batch.to(device))
            tokens += batch.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return tokens


@torch.no_grad()
def block_influence(model: Decoder, calibration_windows: torch.Tensor, batch_size: int = CALIBRATION_BATCH) -> dict[str, float]:
    """1 - mean cosine(input, output) of each block's hidden states over the calibration tokens."""
    sums = {bid: 0.0 for bid in model.block_ids}
    hooks = []

    def watch(bid: str):
        def hook(module, args, output):
            cos = torch.nn.functional.cosine_similarity(args[0].float(), output.float(), dim=-1)  # (B, T)
            sums[bid] += cos.sum().item()

        return hook

    for bid, block in model.blocks.items():
        hooks.append(block.register_forward_hook(watch(bid)))
    count = _calibrate(model, hooks, calibration_windows, batch_size)
    return {bid: 1.0 - s / count for bid, s in sums.items()}


def choose_blocks(influence: dict[str, float], n: int, block_ids: list[str]) -> list[str]:
    """The n lowest-influence blocks, in model order; first and last only when depth forces it."""
    if not 1 <= n <= len(block_ids):
        raise ValueError(f"cannot contract {n} layers of a {len(block_ids)}-layer model")
    interior = sorted(block_ids[1:-1], key=lambda b: influence[b])
    ends = sorted({block_ids[0], block_ids[-1]}, key=lambda b: influence[b])
    chosen = set((interior + ends)[:n])
    return [b for b in block_ids if b in chosen]


# ----------------------------------------------------------------------------- what to remove


def groups_to_remove(n_kv_heads: int, ratio: float) -> int:
    """Whole KV groups to remove: round(ratio x K), at least 1 when ratio > 0, leaving at least 1."""
    if ratio <= 0:
        return 0
    return min(max(1, round(ratio * n_kv_heads)), n_kv_heads - 1)


def units_to_remove(mlp_hidden: int, ratio: float) -> int:
    return min(round(ratio * mlp_hidden), mlp_hidden - 1)


def contracted_shape(shape: LayerShape, ratio: float) -> LayerShape:
    kv = shape.n_kv_heads - groups_to_remove(shape.n_kv_heads, ratio)
    group = shape.n_heads // shape.n_kv_heads
    return LayerShape(n_heads=kv * group, n_kv_heads=kv, mlp_hidden=shape.mlp_hidden - units_to_remove(shape.mlp_hidden, ratio))


def contracted_config(config: ModelConfig, chosen: list[str], ratio: float) -> ModelConfig:
    """The config after contraction: chosen layers shrink, every other layer and all ids stay."""
    picked = set(chosen)
    layers = [contracted_shape(l, ratio) if bid in picked else l for l, bid in zip(config.layers, config.ids())]
    return config.model_copy(update={"layers": layers})


@dataclass
class LayerStats:
    """Second moments of the inputs of a block's two output projections on the calibration sample."""

    mlp_gram: torch.Tensor  # (F, F) sum over tokens of h h^T, h = silu(gate x) * up x
    attn_gram: torch.Tensor  # (H*D, H*D) sum over tokens of y y^T, y = attention heads' output
    tokens: int = 0


@torch.no_grad()
def layer_stats(model: Decoder, calibration_windows: torch.Tensor, block_ids: list[str], batch_size: int = CALIBRATION_BATCH) -> dict[str, LayerStats]:
    """Activation Grams of the chosen blocks' o_proj and down_proj inputs (fp64 accumulators)."""
    stats: dict[str, LayerStats] = {}
    hooks = []

    def accumulate(bid: str, which: str):
        def hook(module, args):
            a = args[0].reshape(-1, args[0].shape[-1]).double()  # (tokens, features)
            gram = getattr(stats[bid], which)
            gram += a.T @ a
            if which == "mlp_gram":
                stats[bid].tokens += a.shape[0]

        return hook

    for bid in block_ids:
        block = model.blocks[bid]
        d_mlp = block.mlp.down_proj.in_features
        d_attn = block.attn.o_proj.in_features
        device = block.mlp.down_proj.weight.device
        stats[bid] = LayerStats(
            mlp_gram=torch.zeros(d_mlp, d_mlp, dtype=torch.float64, device=device),
            attn_gram=torch.zeros(d_attn, d_attn, dtype=torch.float64, device=device),
        )
        hooks.append(block.mlp.down_proj.register_forward_pre_hook(accumulate(bid, "mlp_gram")))
        hooks.append(block.attn.o_proj.register_forward_pre_hook(accumulate(bid, "attn_gram")))
    _calibrate(model, hooks, calibration_windows, batch_size)
    return stats


def _column_energy(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per input column j of an output projection: ||W[:, j]||^2 x sum_t a_j(t)^2."""
    return weight.double().pow(2).sum(0) * gram.diagonal()


def _mlp_scores(block, stats: LayerStats | None, method: Method, generator: torch.Generator) -> torch.Tensor:
    mlp = block.mlp
    if method == "activation":
        return _column_energy(mlp.down_proj.weight, stats.mlp_gram)
    if method == "magnitude":
        return (mlp.gate_proj.weight.double().pow(2).sum(1) + mlp.up_proj.weight.double().pow(2).sum(1)
                + mlp.down_proj.weight.double().pow(2).sum(0)).sqrt()
    return torch.rand(mlp.down_proj.in_features, generator=generator, dtype=torch.float64)


def _group_scores(block, stats: LayerStats | None, method: Method, generator: torch.Generator) -> torch.Tensor:
    attn = block.attn
    K, D = attn.n_kv_heads, attn.head_dim
    per_group_cols = attn.n_heads // K * D  # o_proj columns read from one kv group's query heads
    if method == "activation":
        # Energy of the group's whole contribution W_g y_g, cross terms inside the group included.
        w = attn.o_proj.weight.double()
        scores = []
        for g in range(K):
            cols = slice(g * per_group_cols, (g + 1) * per_group_cols)
            wg = w[:, cols]
            scores.append(torch.trace(wg @ stats.attn_gram[cols, cols] @ wg.T))
        return torch.stack(scores)
    if method == "magnitude":
        q = attn.q_proj.weight.double().pow(2).view(K, per_group_cols, -1).sum((1, 2))
        k = attn.k_proj.weight.double().pow(2).view(K, D, -1).sum((1, 2))
        v = attn.v_proj.weight.double().pow(2).view(K, D, -1).sum((1, 2))
        o = attn.o_proj.weight.double().pow(2).view(attn.o_proj.out_features, K, per_group_cols).sum((0, 2))
        return (q + k + v + o).sqrt()
    return torch.rand(K, generator=generator, dtype=torch.float64)


def _keep(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the n_keep highest scores, in their original order (keeps weights aligned)."""
    return scores.topk(n_keep).indices.sort().values


def _refit(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Kept columns W' minimising sum_t ||W a(t) - W' a_keep(t)||^2: W' = W G[:, k] (G[k, k])^-1."""
    w = weight.double()
    g_kk = gram[keep][:, keep]
    ridge = RIDGE * g_kk.diagonal().mean().clamp_min(1e-12)
    g_kk = g_kk + ridge * torch.eye(len(keep), dtype=g_kk.dtype, device=g_kk.device)
    rhs = w @ gram[:, keep]  # (out, k)
    return torch.linalg.solve(g_kk, rhs.T).T.to(weight.dtype)


# ----------------------------------------------------------------------------- surgery


@torch.no_grad()
def _shrink_block(old, new, stats: LayerStats | None, method: Method, refit: bool, generator: torch.Generator) -> None:
    """Copy the kept weights of block `old` into the smaller block `new`."""
    new.attn_norm.weight.copy_(old.attn_norm.weight)
    new.mlp_norm.weight.copy_(old.mlp_norm.weight)

    units = _keep(_mlp_scores(old, stats, method, generator), new.mlp.down_proj.in_features)
    new.mlp.gate_proj.weight.copy_(old.mlp.gate_proj.weight[units])
    new.mlp.up_proj.weight.copy_(old.mlp.up_proj.weight[units])
    if refit:
        new.mlp.down_proj.weight.copy_(_refit(old.mlp.down_proj.weight, stats.mlp_gram, units.to(stats.mlp_gram.device)))
    else:
        new.mlp.down_proj.weight.copy_(old.mlp.down_proj.weight[:, units])

    a_old, a_new = old.attn, new.attn
    groups = _keep(_group_scores(old, stats, method, generator), a_new.n_kv_heads)
    D, per_group = a_old.head_dim, a_old.n_heads // a_old.n_kv_heads
    kv_rows = torch.cat([torch.arange(g * D, (g + 1) * D) for g in groups.tolist()])
    q_cols = torch.cat([torch.arange(g * per_group * D, (g + 1) * per_group * D) for g in groups.tolist()])
    a_new.q_proj.weight.copy_(a_old.q_proj.weight[q_cols])
    a_new.k_proj.weight.copy_(a_old.k_proj.weight[kv_rows])
    a_new.v_proj.weight.copy_(a_old.v_proj.weight[kv_rows])
    _copy_head_extras(a_old, a_new, q_cols, kv_rows)
    if refit:
        a_new.o_proj.weight.copy_(_refit(a_old.o_proj.weight, stats.attn_gram, q_cols.to(stats.attn_gram.device)))
    else:
        a_new.o_proj.weight.copy_(a_old.o_proj.weight[:, q_cols])


def _copy_head_extras(old, new, q_rows: torch.Tensor, kv_rows: torch.Tensor) -> None:
    """What else belongs to the kept heads: q/k/v biases follow their rows; a q/k norm is one
    weight shared by every head, so it is kept whole."""
    if old.q_proj.bias is not None:
        new.q_proj.bias.copy_(old.q_proj.bias[q_rows])
        new.k_proj.bias.copy_(old.k_proj.bias[kv_rows])
        new.v_proj.bias.copy_(old.v_proj.bias[kv_rows])
    if old.q_norm is not None:
        new.q_norm.weight.copy_(old.q_norm.weight)
        new.k_norm.weight.copy_(old.k_norm.weight)


@torch.no_grad()
def contract_blocks(
    model: Decoder,
    config: ModelConfig,
    calibration: torch.Tensor,
    ratio: float,
    chosen: list[str],
    method: Method = "activation",
    refit: bool | None = None,
    seed: int = 0,
) -> tuple[Decoder, ModelConfig]:
    """Shrink the given blocks by `ratio` with the given importance; a new model, the source untouched.

    `refit` (default: on for the activation method) refits the kept output-projection columns by
    least squares on the calibration activations.
    """
    refit = method == "activation" if refit is None else refit
    new_config = contracted_config(config, chosen, ratio)
    stats = layer_stats(model, calibration, chosen) if method == "activation" or refit else {}
    device = next(model.parameters()).device
    new = Decoder(new_config).to(device)
    generator = torch.Generator().manual_seed(seed)
    new.embed.weight.copy_(model.embed.weight)
    new.norm.weight.copy_(model.norm.weight)
    if not new_config.tie_embeddings:
        new.lm_head.weight.copy_(model.lm_head.weight)
    picked = set(chosen)
    for bid, block in model.blocks.items():
        if bid in picked:
            _shrink_block(block, new.blocks[bid], stats.get(bid), method, refit, generator)
        else:
            new.blocks[bid].load_state_dict(block.state_dict())
    new.train(model.training)
    return new, new_config


def contract(
    model: Decoder,
    config: ModelConfig,
    calibration: torch.Tensor,
    ratio: float,
    n_layers: int,
    method: Method = "activation",
    seed: int = 0,
) -> tuple[Decoder, ModelConfig]:
    """Prune `ratio` of heads (whole KV groups) and MLP units in the n least influential blocks.

    `calibration` is a (N, seq_len+1) tensor of token windows from the source's training data.
    """
    chosen = choose_blocks(block_influence(model, calibration), n_layers, config.ids())
    return contract_blocks(model, config, calibration, ratio, chosen, method=method, seed=seed)


# ----------------------------------------------------------------------------- the container job

CALIBRATION_WINDOWS = 64  # windows of CONTRACT_SEQ_LEN tokens for Block Influence and activation statistics
HELDOUT_WINDOWS = 512  # cap on the held-out windows each perplexity is measured on
HEAL_LR = TrainSettings.model_fields["lr"].default  # healing uses the product's training learning rate


def run_contract_job(settings: ContractSettings, root: Path, job_id: str, log: Callable[[str], None] | None = None) -> dict:
    """Contract the model of the `model` channel on the `training` channel's text; write model/ and metrics."""
    log = log or runtime.log
    started = time.monotonic()
    source, tokenizer = load_model_dir(root / "input/data/model")
    source_config = source.config
    n_layers = settings.num_layers_to_contract
    if n_layers > source_config.n_layers:
        raise ValueError(
            f"num_layers_to_contract={n_layers} exceeds the source model's depth {source_config.n_layers}"
        )
    seq_len = min(CONTRACT_SEQ_LEN, source_config.context_length)
    train_windows, heldout_windows = token_windows(tokenizer, read_texts(root / "input/data/training"), seq_len)
    heldout_windows = heldout_windows[:HELDOUT_WINDOWS]
    calibration = train_windows[:CALIBRATION_WINDOWS]  # token_windows already shuffled them (seeded)
    device = runtime.device()
    source.to(device)

    before = _measure(log, "source", source, heldout_windows)
    influence = block_influence(source, calibration)
    chosen = choose_blocks(influence, n_layers, source_config.ids())
    log("block influence: " + " ".join(f"{b}={influence[b]:.4f}" for b in source_config.ids()))
    log(f"contracting blocks {chosen} by {settings.contraction_ratio:g}")
    model, config = contract_blocks(source, source_config, calibration, settings.contraction_ratio, chosen)
    model, config = _agree_across_ranks(model, config)
    del source
    pruned = _measure(log, "pruned", model, heldout_windows)

    healed, cycles, tokens_processed, tokens_per_second = None, [], 0, 0.0
    if settings.train_steps > 0:
        trainer = _healer(model, config, train_windows, heldout_windows, settings.train_steps, seq_len, root, job_id, log)
        trainer.install_sigterm()
        trainer.resume()
        state = trainer.run()
        cycles, tokens_processed, tokens_per_second = state.cycles, state.tokens_seen, trainer.tokens_per_second()
        healed = _measure(log, "healed", model, heldout_windows)

    metrics = {
        "job_id": job_id,
        "job_type": "contract",
        "config": config.model_dump(),
        "parameters_before": source_config.parameters(),
        "parameters_after": config.parameters(),
        "depth_before": source_config.n_layers,
        "depth_after": config.n_layers,
        "training_tokens": settings.training_tokens(),
        "tokens_processed": tokens_processed,
        "tokens_per_second": round(tokens_per_second, 1),
        "wall_time_s": round(time.monotonic() - started, 2),
        "cycles": cycles,
        "final_perplexity": healed if healed is not None else pruned,
        "layers_contracted": chosen,
        "contraction_ratio": settings.contraction_ratio,
        "block_influence": influence,
        "perplexity_before": before,
        "perplexity_after_pruning": pruned,
        "perplexity_after_healing": healed,
    }
    if runtime.rank() == 0:
        runtime.write_outputs(root, model, tokenizer, metrics)
    return metrics


def _measure(log: Callable[[str], None], stage: str, model: Decoder, heldout_windows: torch.Tensor) -> float:
    loss = heldout_loss(model, heldout_windows)
    log(f"contract_stage={stage} parameters={model.parameter_count()} heldout_loss={loss:.4f} heldout_perplexity={math.exp(loss):.3f}")
    return math.exp(loss)


def _healer(model, config, train_windows, heldout_windows, steps, seq_len, root, job_id, log) -> Trainer:
    plan = TrainPlan(turns=1, cycle_steps=[steps], lr=HEAL_LR, seq_len=seq_len,
                     batch_size=runtime.batch_size(config.parameters()))
    model.train()
    return Trainer(
        model,
        train_windows,
        heldout_windows,
        plan,
        job_id=job_id,
        job_type="contract",
        checkpoint_dir=root / "checkpoints",
        progress_every=max(1, min(10, steps // 10)),
        log=log if runtime.rank() == 0 else None,
    )


def _agree_across_ranks(model: Decoder, config: ModelConfig) -> tuple[Decoder, ModelConfig]:
    """Under torchrun every rank contracts; all take rank 0's shape (DDP then copies its weights)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model, config
    shared = [config.model_dump_json()]
    dist.broadcast_object_list(shared, src=0)
    agreed = ModelConfig.model_validate_json(shared[0])
    if agreed == config:
        return model, config
    return Decoder(agreed).to(next(model.parameters()).device), agreed


