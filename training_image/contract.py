"""Contraction: structured pruning of a trained Decoder into a smaller dense one.

1. Block Influence (1 - mean cosine between a block's input and output hidden states, on a
   calibration sample) ranks how much each block changes the residual stream.
2. The `n` least influential blocks are picked, sparing the first and last while depth allows.
3. The chosen blocks lose, in total, the parameters that `ratio` of their MLP hidden units and
   of their query heads hold (a KV group goes only with the last of its query heads; kept groups
   keep equal numbers of heads, as grouped-query attention needs). What goes is picked by the
   damage it does to the layer's output on the calibration sample: with the Gram matrix G of an
   output projection's inputs, removing columns b and re-solving the others by least squares
   costs tr(W_b ((G^-1)_bb)^-1 W_b^T); a greedy removal with the Optimal Brain Surgeon updates
   picks the cheapest unit or head one at a time, and where a layer's head shape leaves few
   choices of heads every choice is costed. The parameters are allotted across the chosen layers,
   and between each layer's attention and MLP, by that damage relative to the residual stream
   each layer writes into.
4. The kept output-projection columns are refit by least squares, block after block in depth
   order (reconstruct): the contracted model's residual stream after each cut sub-layer is made
   as close as it can be to the source's there, on the contracted model's own inputs, so a later
   cut also takes back what the earlier ones changed (the model has no biases, so FLAP's bias
   compensation has nowhere to go; the refit plays that role).
5. The result is a new Decoder whose config records every layer's own sizes; block ids are kept.
6. Healing trains the contracted model to match the source's next-token distribution (KL to the
   source's logits), optionally plus the language-model loss.

Two baselines take the same size and the same refit, choosing by weight magnitude or at
random and removing ratio of every layer's units and heads (as evenly as head shapes allow).
"""

from __future__ import annotations

import copy
import heapq
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from shared.memory import CALIBRATION_BATCH, IGNORE_INDEX
from shared.settings import TrainSettings
from shared.shapes import LayerShape, ModelConfig, even_cuts, healing_batch_size, head_shapes, heads_to_remove, units_to_remove  # noqa: F401 (the tests read the two rules here)
from training_image.data import TOKEN_MASK, split_windows
from training_image.evaluate import DEFAULT_EVAL_BATCH
from training_image.model import Block, Decoder, chunked_cross_entropy
from training_image.train import Trainer, TrainPlan

Method = Literal["activation", "magnitude", "random", "wanda-sp"]
EXHAUSTIVE_HEAD_SETS = 256  # a layer's head shape with at most this many ways to keep its heads tries them all
RIDGE = 1e-3  # relative ridge of the least-squares refit, for rank-deficient activation Grams


# ----------------------------------------------------------------------------- block influence


def _inputs(windows: torch.Tensor) -> torch.Tensor:
    """Token ids to feed: a window of seq_len+1 tokens gives seq_len inputs (without the flags of
    a conversation's tokens: data.split_windows)."""
    return (windows[:, :-1] if windows.shape[1] > 1 else windows) & TOKEN_MASK


def _share(calibration_windows: torch.Tensor) -> torch.Tensor:
    """This rank's share of the calibration windows: under torchrun every rank is handed the same
    sample and runs the model on every world-th window of it, the statistics then summed over all
    ranks (_sum_over_ranks), so each rank chooses from all the windows for 1/world of the work."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return calibration_windows
    return calibration_windows[dist.get_rank() :: dist.get_world_size()]


def _sum_over_ranks(*tensors: torch.Tensor) -> None:
    """All-reduce (sum) in place: the statistics of every rank's share of the windows. Each
    statistic is a sum over tokens, so the total is that of one process given all of them (fp64
    accumulators: equal but for the order of the additions)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in tensors:
            dist.all_reduce(tensor)


Watch = Callable[[str, nn.Module], list]  # (block id, the block) -> the hooks put on it
Finish = Callable[[str], None]  # a block's windows all seen: its statistics are complete


def _device(model: "Decoder | StreamedSource") -> torch.device:
    return model.device if isinstance(model, StreamedSource) else next(model.parameters()).device


def _calibrate(model: "Decoder | StreamedSource", watch: Watch, calibration_windows: torch.Tensor, batch_size: int,
               finish: Finish = lambda bid: None) -> int:
    """Run this rank's share of the calibration windows through the blocks in eval mode, each block
    with the hooks `watch` puts on it (removed even if a batch fails), and `finish` each block
    once every window has gone through it. Returns the input tokens fed (by this rank).

    A StreamedSource runs all the windows through one block before it reads the next
    (StreamedSource.calibrate); a Decoder runs each batch through all its blocks. Each block sees
    the same inputs in the same batches either way, so the statistics are the same."""
    if isinstance(model, StreamedSource):
        return model.calibrate(watch, calibration_windows, batch_size, finish)
    was_training = model.training
    model.eval()
    tokens = 0
    hooks = []
    try:
        for bid, block in model.blocks.items():
            hooks.extend(watch(bid, block))
        device = next(model.parameters()).device
        share = _inputs(_share(calibration_windows))
        for batch in share.split(batch_size) if len(share) else ():  # more ranks than windows: none here
            model.forward_hidden(batch.to(device))
            tokens += batch.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for bid in model.block_ids:
        finish(bid)
    return tokens


@torch.no_grad()
def block_influence(model: "Decoder | StreamedSource", calibration_windows: torch.Tensor,
                    batch_size: int = CALIBRATION_BATCH) -> dict[str, float]:
    """1 - mean cosine(input, output) of each block's hidden states over the calibration tokens
    (of all ranks, under torchrun)."""
    ids = model.block_ids
    # [cosine sum of each block..., tokens], summed on the device in fp64 and read back once.
    sums = torch.zeros(len(ids) + 1, dtype=torch.float64, device=_device(model))

    def watch(bid: str, block: nn.Module) -> list:
        i = ids.index(bid)

        def hook(module, args, output):
            cos = torch.nn.functional.cosine_similarity(args[0].float(), output.float(), dim=-1)  # (B, T)
            sums[i] += cos.double().sum()

        return [block.register_forward_hook(hook)]

    sums[-1] = _calibrate(model, watch, calibration_windows, batch_size)
    _sum_over_ranks(sums)
    *cosines, count = sums.tolist()
    return {bid: 1.0 - s / count for bid, s in zip(ids, cosines)}


def choose_blocks(influence: dict[str, float], n: int, block_ids: list[str]) -> list[str]:
    """The n lowest-influence blocks, in model order; first and last only when depth forces it."""
    if not 1 <= n <= len(block_ids):
        raise ValueError(f"cannot contract {n} layers of a {len(block_ids)}-layer model")
    interior = sorted(block_ids[1:-1], key=lambda b: influence[b])
    ends = sorted({block_ids[0], block_ids[-1]}, key=lambda b: influence[b])
    chosen = set((interior + ends)[:n])
    return [b for b in block_ids if b in chosen]


# ----------------------------------------------------------------------------- how much to remove


@dataclass
class LayerStats:
    """Second moments of the inputs of a block's two output projections on the calibration sample."""

    mlp_gram: torch.Tensor  # (F, F) sum over tokens of h h^T, h = silu(gate x) * up x
    attn_gram: torch.Tensor  # (H*D, H*D) sum over tokens of y y^T, y = attention heads' output
    tokens: int = 0
    residual: float = 0.0  # sum over tokens of ||x||^2, x the residual stream entering the block


@torch.no_grad()
def layer_stats(model: "Decoder | StreamedSource", calibration_windows: torch.Tensor, block_ids: list[str],
                batch_size: int = CALIBRATION_BATCH) -> dict[str, LayerStats]:
    """Activation Grams of the chosen blocks' o_proj and down_proj inputs (fp64 accumulators),
    over the calibration tokens of all ranks under torchrun.

    Each block's Grams are made on the device beside it and summed over the ranks there once
    every window has gone through it; from a StreamedSource they then move to the host
    (StreamedSource.stats_device), so the device holds one block's Grams at a time."""
    stats: dict[str, LayerStats] = {}
    keep_on = model.stats_device if isinstance(model, StreamedSource) else None

    def accumulate(bid: str, which: str):
        def hook(module, args):
            a = args[0].reshape(-1, args[0].shape[-1]).double()  # (tokens, features)
            gram = getattr(stats[bid], which)
            gram += a.T @ a
            if which == "mlp_gram":
                stats[bid].tokens += a.shape[0]

        return hook

    def residual(bid: str):
        def hook(module, args):
            stats[bid].residual += args[0].double().pow(2).sum().item()

        return hook

    def watch(bid: str, block: nn.Module) -> list:
        if bid not in block_ids:
            return []
        d_mlp = block.mlp.down_proj.in_features
        d_attn = block.attn.o_proj.in_features
        device = block.mlp.down_proj.weight.device
        stats[bid] = LayerStats(
            mlp_gram=torch.zeros(d_mlp, d_mlp, dtype=torch.float64, device=device),
            attn_gram=torch.zeros(d_attn, d_attn, dtype=torch.float64, device=device),
        )
        return [block.register_forward_pre_hook(residual(bid)),
                block.mlp.down_proj.register_forward_pre_hook(accumulate(bid, "mlp_gram")),
                block.attn.o_proj.register_forward_pre_hook(accumulate(bid, "attn_gram"))]

    def finish(bid: str) -> None:  # every rank's share of the windows, in every rank's statistics
        if bid not in block_ids:
            return
        one = stats[bid]
        counts = torch.tensor([one.tokens, one.residual], dtype=torch.float64, device=one.mlp_gram.device)
        _sum_over_ranks(one.mlp_gram, one.attn_gram, counts)
        one.tokens, one.residual = int(counts[0].item()), counts[1].item()
        if keep_on is not None:
            one.mlp_gram, one.attn_gram = one.mlp_gram.to(keep_on), one.attn_gram.to(keep_on)

    _calibrate(model, watch, calibration_windows, batch_size, finish)
    return {bid: stats[bid] for bid in block_ids}


def _on(stats: LayerStats | None, device: torch.device) -> LayerStats | None:
    """A layer's statistics with its Grams on `device` (where its block is): the same object
    where they already are there."""
    if stats is None or stats.mlp_gram.device == device:
        return stats
    return LayerStats(stats.mlp_gram.to(device), stats.attn_gram.to(device), stats.tokens, stats.residual)


# ----------------------------------------------------------------------------- what to remove: ours


class _Surgeon:
    """Greedy second-order removal of input columns of an output projection W (out x n), given
    the Gram G of its inputs (Optimal Brain Surgeon on the layer-output error, structured).

    Removing a block b of columns and re-solving the others by least squares raises the output
    error sum_t ||W a(t) - W' a(t)||^2 by tr(W_b (G^-1)_bb^-1 W_b^T); the surviving columns then
    absorb W_b through the same inverse, and G^-1 is downdated to the survivors. Greedy removal of
    the cheapest block at each step, with these updates, is structured OBS (as in OBC / ZipLM).
    """

    def __init__(self, weight: torch.Tensor, gram: torch.Tensor):
        n = gram.shape[0]
        damped = gram + RIDGE * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(n, dtype=gram.dtype, device=gram.device)
        self.w = weight.double().clone()
        self.hinv = torch.linalg.inv(damped)
        self.error = 0.0

    def copy(self) -> "_Surgeon":
        twin = object.__new__(_Surgeon)
        twin.w, twin.hinv, twin.error = self.w.clone(), self.hinv.clone(), self.error
        return twin

    def cost(self, cols: torch.Tensor) -> float:
        w_b, m = self.w[:, cols], self.hinv[cols][:, cols]
        return torch.trace(w_b @ torch.linalg.solve(m, w_b.T)).item()

    def unit_costs(self) -> torch.Tensor:
        """Cost of removing each single column (0 for removed ones: callers mask them)."""
        return self.w.pow(2).sum(0) / self.hinv.diagonal().clamp_min(1e-300)

    def remove(self, cols: torch.Tensor) -> float:
        cost = self.cost(cols)
        rows = torch.linalg.solve(self.hinv[cols][:, cols], self.hinv[cols])  # (|b|, n): (G^-1)_bb^-1 (G^-1)_b:
        self.w -= self.w[:, cols] @ rows
        self.hinv -= self.hinv[:, cols] @ rows
        self.w[:, cols] = 0
        self.hinv[cols, :] = 0
        self.hinv[:, cols] = 0
        self.hinv[cols, cols] = 1.0  # a removed column is never a candidate again; 1 keeps divisions finite
        self.error += cost
        return cost


def _obs_units(weight: torch.Tensor, gram: torch.Tensor, most: int) -> tuple[list[int], list[float]]:
    """Removal order of up to `most` columns, and the output error after each removal."""
    surgeon = _Surgeon(weight, gram)
    alive = torch.ones(gram.shape[0], dtype=torch.bool)
    order, errors = [], []
    chunk = max(1, math.ceil(most / 512))  # wide layers: several columns per update
    while len(order) < most:
        costs = surgeon.unit_costs().cpu()
        costs[~alive] = math.inf
        take = costs.topk(min(chunk, most - len(order)), largest=False).indices
        surgeon.remove(take.to(gram.device))
        alive[take] = False
        order.extend(take.tolist())
        errors.extend([surgeon.error] * len(take))
    return order, errors


def _obs_heads(weight: torch.Tensor, gram: torch.Tensor, shape: LayerShape, head_dim: int) -> dict[tuple[int, int], tuple[float, list[list[int]]]]:
    """For every shape of head_shapes(): (output error, kept heads of each kept group).

    Heads go first, one at a time, the cheapest among the groups that still hold more than the
    target number, so every group ends with the same count; then whole groups, the cheapest first.
    """
    K, per_group = shape.n_kv_heads, shape.n_heads // shape.n_kv_heads

    def cols(heads: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads]).to(gram.device)

    surgeon = _Surgeon(weight, gram)
    kept = [list(range(g * per_group, (g + 1) * per_group)) for g in range(K)]
    options = {}
    for s in range(per_group, 0, -1):
        while any(len(heads) > s for heads in kept):
            candidates = [(surgeon.cost(cols([h])), g, h) for g, heads in enumerate(kept) if len(heads) > s for h in heads]
            _, g, h = min(candidates)
            surgeon.remove(cols([h]))
            kept[g].remove(h)
        options[(K, s)] = (surgeon.error, [list(heads) for heads in kept])
        groups, twin = list(range(K)), surgeon.copy()
        while len(groups) > 1:
            _, g = min((twin.cost(cols(kept[g])), g) for g in groups)
            twin.remove(cols(kept[g]))
            groups.remove(g)
            options[(len(groups), s)] = (twin.error, [list(kept[g]) for g in groups])
    # Where a shape allows few choices (few heads a group, few groups), all of them are costed and
    # the greedy pick gives way to the best: greedy removal is exact one head at a time, not for a set.
    whole = _Surgeon(weight, gram)
    for (k, s), (error, _) in list(options.items()):
        if math.comb(K, k) * math.comb(per_group, s) ** k > EXHAUSTIVE_HEAD_SETS:
            continue
        for groups in itertools.combinations(range(K), k):
            for picks in itertools.product(*(itertools.combinations(range(g * per_group, (g + 1) * per_group), s) for g in groups)):
                gone = sorted(set(range(K * per_group)) - {h for heads in picks for h in heads})
                cost = whole.cost(cols(gone)) if gone else 0.0
                if cost < error:
                    error, options[(k, s)] = cost, (cost, [list(heads) for heads in picks])
    return options


# ----------------------------------------------------------------------------- what to remove: baselines


def _wanda_sp(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Wanda-sp's score of each input column j of an output projection W (out x n): the mean over
    its rows of |W_ij| x ||X_j||_2, X_j the column's calibration activations (from the Gram's
    diagonal). Wanda scores a weight by |W| times the norm of its input (Sun et al., "A Simple and
    Effective Pruning Approach for Large Language Models", ICLR 2024, arXiv:2306.11695); Wanda-sp
    is its structured form as An et al. define and measure it ("Fluctuation-based Adaptive
    Structured Pruning for Large Language Models", AAAI 2024, arXiv:2312.11983): a head scores
    the sum of its columns, an MLP unit its column, and every layer loses the same share."""
    return weight.double().abs().mean(0) * gram.diagonal().clamp_min(0).sqrt()


def _unit_scores(block, method: Method, generator: torch.Generator, stats: "LayerStats | None" = None) -> torch.Tensor:
    mlp = block.mlp
    if method == "wanda-sp":
        return _wanda_sp(mlp.down_proj.weight, stats.mlp_gram).cpu()
    if method == "magnitude":
        return (mlp.gate_proj.weight.double().pow(2).sum(1) + mlp.up_proj.weight.double().pow(2).sum(1)
                + mlp.down_proj.weight.double().pow(2).sum(0)).sqrt()
    return torch.rand(mlp.down_proj.in_features, generator=generator, dtype=torch.float64)


def _scored_heads(block, shape: LayerShape, method: Method, generator: torch.Generator,
                  stats: "LayerStats | None" = None) -> dict[tuple[int, int], tuple[float, list[list[int]]]]:
    """head_shapes() options chosen by a per-head score: the best heads of each group, then the
    groups whose kept heads (with their k and v) score best. The error slot is 0: unknown."""
    attn = block.attn
    H, K, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    per_group = H // K
    if method == "wanda-sp":  # a head: the sum of its o_proj columns' scores; a KV group: its heads'
        head = _wanda_sp(attn.o_proj.weight, stats.attn_gram).view(H, D).sum(1).cpu()
        kv = torch.zeros(K, dtype=torch.float64)
    elif method == "magnitude":
        head = attn.q_proj.weight.double().pow(2).view(H, -1).sum(1) + attn.o_proj.weight.double().pow(2).view(-1, H, D).sum((0, 2))
        kv = attn.k_proj.weight.double().pow(2).view(K, -1).sum(1) + attn.v_proj.weight.double().pow(2).view(K, -1).sum(1)
    else:
        head = torch.rand(H, generator=generator, dtype=torch.float64)
        kv = torch.zeros(K, dtype=torch.float64)
    options = {}
    for k, s in head_shapes(shape):
        best = [sorted(range(g * per_group, (g + 1) * per_group), key=lambda h: -head[h].item())[:s] for g in range(K)]
        value = [kv[g].item() + sum(head[h].item() for h in best[g]) for g in range(K)]
        groups = sorted(sorted(range(K), key=lambda g: -value[g])[:k])
        options[(k, s)] = (0.0, [sorted(best[g]) for g in groups])
    return options


# ----------------------------------------------------------------------------- the plan


@dataclass
class LayerCut:
    """What one block keeps: MLP units, and the query heads of each kept KV group (equal counts)."""

    units: list[int]
    groups: list[int]  # kept kv heads, in order
    heads: list[list[int]]  # kept query heads of each kept group, in order

    def shape(self) -> LayerShape:
        return LayerShape(n_heads=sum(len(h) for h in self.heads), n_kv_heads=len(self.groups), mlp_hidden=len(self.units))


def _greedy_sequence(curves: list[list[float]]) -> list[int]:
    """The order in which units leave the layers: each next unit comes from the layer whose error
    it raises least. curves[l][n] is layer l's normalised error with n units removed (curves[l][0]
    == 0); the first n entries of the sequence are the greedy allotment of n units."""
    counts = [0] * len(curves)
    queue = [(curve[1] - curve[0], l) for l, curve in enumerate(curves) if len(curve) > 1]
    heapq.heapify(queue)
    sequence = []
    while queue:
        _, l = heapq.heappop(queue)
        sequence.append(l)
        counts[l] += 1
        if counts[l] + 1 < len(curves[l]):
            heapq.heappush(queue, (curves[l][counts[l] + 1] - curves[l][counts[l]], l))
    return sequence


def _allot_joint(head_options: list[list[tuple[int, float, tuple[int, int]]]], unit_curves: list[list[float]],
                 unit_parameters: int, target: int) -> tuple[list[tuple[int, int]], list[int]]:
    """(head shape, units removed) per layer removing `target` parameters (to within half an MLP
    unit) at the least summed error, attention and MLP together.

    head_options[l]: (parameters removed, normalised error, (kv groups kept, heads per group)) of
    each shape layer l can take. The head shapes are chosen exactly, by dynamic programming over
    the parameters they remove; the MLP units make up the rest, allotted greedily.
    """
    best: dict[int, tuple[float, list[tuple[int, int]]]] = {0: (0.0, [])}
    for layer in head_options:
        step: dict[int, tuple[float, list[tuple[int, int]]]] = {}
        for total, (cost, picks) in best.items():
            for removed, c, shape in layer:
                key, value = total + removed, cost + c
                if key not in step or value < step[key][0]:
                    step[key] = (value, picks + [shape])
        best = step
    sequence = _greedy_sequence(unit_curves)
    counts, cumulative = [0] * len(unit_curves), [0.0]
    for l in sequence:
        counts[l] += 1
        cumulative.append(cumulative[-1] + unit_curves[l][counts[l]] - unit_curves[l][counts[l] - 1])

    def plan(head_total: int) -> tuple[float, float, int]:
        units = min(len(sequence), max(0, round((target - head_total) / unit_parameters)))
        miss = max(0.0, abs(target - head_total - units * unit_parameters) - unit_parameters / 2)
        return miss, best[head_total][0] + cumulative[units], units

    # The least error among the head shapes whose size the units can make up (miss 0), else the nearest size.
    head_total = min(best, key=lambda t: plan(t)[:2])
    units = plan(head_total)[2]
    removed = [0] * len(unit_curves)
    for l in sequence[:units]:
        removed[l] += 1
    return best[head_total][1], removed


def plan_cuts(model: Decoder, chosen: list[str], ratio: float, stats: dict[str, LayerStats], method: Method = "activation",
              seed: int = 0, even: bool = False) -> dict[str, LayerCut]:
    """What each chosen block keeps at `ratio`.

    The size is the setting's: the chosen layers lose round(ratio x F) MLP units and
    round(ratio x H) query heads each (heads spread as evenly as the head shapes allow), and the
    parameters that removes. The baselines remove exactly those counts in every layer, scoring
    units and heads by weight magnitude or at random. Ours ("activation") removes the same number
    of parameters, but chooses what goes by the output error it causes (structured OBS on the
    calibration Grams, relative to the residual stream the layer writes into) and allots the
    parameters across the layers and between attention and MLP by that error, so a layer, or a
    half of one, whose removal costs little gives more. `even`: ours chooses what goes, but in
    the baselines' counts (to measure what the allotment adds).
    """
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    shapes = {bid: config.layers[config.ids().index(bid)] for bid in chosen}
    most = lambda n: min(n - 1, math.ceil(n * (1 + ratio) / 2))  # noqa: E731  (ours: no layer loses more than this)

    def head_parameters(shape: LayerShape, k: int, s: int) -> int:
        return config.layer_parameters(shape) - config.layer_parameters(shape.model_copy(update={"n_heads": k * s, "n_kv_heads": k}))

    # The baselines' plan, which is also the size ours must reach (and the size the API forecasts):
    # even counts in every layer.
    even_heads, even_units = even_cuts([shapes[b] for b in chosen], ratio)

    unit_orders, head_options = {}, {}
    for bid in chosen:
        block, shape = model.blocks[bid], shapes[bid]  # from a StreamedSource: read now, one at a time
        one = _on(stats.get(bid), block.mlp.down_proj.weight.device)
        if method == "activation":
            order, errors = _obs_units(block.mlp.down_proj.weight, one.mlp_gram, most(shape.mlp_hidden))
            unit_orders[bid] = (order, [0.0] + [e / one.residual for e in errors])
            head_options[bid] = _obs_heads(block.attn.o_proj.weight, one.attn_gram, shape, block.attn.head_dim)
        else:
            unit_orders[bid] = (_unit_scores(block, method, generator, one).argsort().tolist(), None)
            head_options[bid] = _scored_heads(block, shape, method, generator, one)
        del block, one

    if method == "activation" and not even:
        target = sum(3 * config.dim * n + head_parameters(shapes[b], k, s) for b, n, (k, s) in zip(chosen, even_units, even_heads))
        options = [[(head_parameters(shapes[b], k, s), error / stats[b].residual, (k, s))
                    for (k, s), (error, _) in head_options[b].items()] for b in chosen]
        heads_kept, units_removed = _allot_joint(options, [unit_orders[b][1] for b in chosen], 3 * config.dim, target)
    else:
        heads_kept, units_removed = even_heads, even_units

    cuts = {}
    for bid, n_units, head_shape in zip(chosen, units_removed, heads_kept):
        order = unit_orders[bid][0]
        units = sorted(set(range(shapes[bid].mlp_hidden)) - set(order[:n_units]))
        heads = head_options[bid][head_shape][1]
        per_group = shapes[bid].n_heads // shapes[bid].n_kv_heads
        cuts[bid] = LayerCut(units=units, groups=[hs[0] // per_group for hs in heads], heads=heads)
    return cuts


def _solve(gram: torch.Tensor, cross: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W minimising sum_t ||y(t) - W a(t)||^2, given G = sum a a^T and C = sum y a^T: C G^-1 (ridged)."""
    ridge = RIDGE * gram.diagonal().mean().clamp_min(1e-12)
    damped = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(damped, cross.T).T.to(dtype)


def _refit(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Kept columns W' minimising sum_t ||W a(t) - W' a_keep(t)||^2: W' = W G[:, k] (G[k, k])^-1."""
    return _solve(gram[keep][:, keep], weight.double() @ gram[:, keep], weight.dtype)


# ----------------------------------------------------------------------------- surgery


@torch.no_grad()
def _shrink_block(old, new, cut: LayerCut, stats: LayerStats | None, refit: bool) -> None:
    """Copy the kept weights of block `old` into the smaller block `new`."""
    new.attn_norm.weight.copy_(old.attn_norm.weight)
    new.mlp_norm.weight.copy_(old.mlp_norm.weight)

    units = torch.tensor(cut.units)
    new.mlp.gate_proj.weight.copy_(old.mlp.gate_proj.weight[units])
    new.mlp.up_proj.weight.copy_(old.mlp.up_proj.weight[units])
    if refit:
        new.mlp.down_proj.weight.copy_(_refit(old.mlp.down_proj.weight, stats.mlp_gram, units.to(stats.mlp_gram.device)))
    else:
        new.mlp.down_proj.weight.copy_(old.mlp.down_proj.weight[:, units])

    a_old, a_new = old.attn, new.attn
    D = a_old.head_dim
    kv_rows = torch.cat([torch.arange(g * D, (g + 1) * D) for g in cut.groups])
    q_rows = torch.cat([torch.arange(h * D, (h + 1) * D) for heads in cut.heads for h in heads])
    a_new.q_proj.weight.copy_(a_old.q_proj.weight[q_rows])
    a_new.k_proj.weight.copy_(a_old.k_proj.weight[kv_rows])
    a_new.v_proj.weight.copy_(a_old.v_proj.weight[kv_rows])
    _copy_head_extras(a_old, a_new, q_rows, kv_rows)
    if refit:
        a_new.o_proj.weight.copy_(_refit(a_old.o_proj.weight, stats.attn_gram, q_rows.to(stats.attn_gram.device)))
    else:
        a_new.o_proj.weight.copy_(a_old.o_proj.weight[:, q_rows])


def _unit(source: "Decoder | StreamedSource", name: str) -> nn.Module:
    return source.unit(name) if isinstance(source, StreamedSource) else source.get_submodule(name)


@torch.no_grad()
def reconstruct(source: "Decoder | StreamedSource", calibration_windows: torch.Tensor, cut: dict[str, nn.Module],
                batch_size: int = CALIBRATION_BATCH) -> None:
    """Refit the output projections of the cut blocks (`cut`: block id -> the smaller block, changed
    in place) in depth order, so that the contracted model's residual stream after each of their
    sub-layers comes as close, by least squares over the calibration tokens, to the source's there.

    The source's hidden states and the contracted model's go through the blocks side by side (the
    blocks that were not cut are the source's own in both). At a cut sub-layer, with the kept
    heads' or units' activations a(t) on the contracted model's own stream x'(t), its output
    projection becomes W' = argmin sum_t ||x_src(t) + W a_src(t) - x'(t) - W' a(t)||^2: the first
    cut sub-layer gets the plain refit (x' = x_src there), and each later one also takes back what
    the cuts before it changed in the stream, which a refit on the source's activations cannot see.
    Each cut block comes to the source's device for its turn and goes back where it was. Under
    torchrun each rank runs its share of the windows and the sums are all-reduced."""
    device = _device(source)
    share = _inputs(_share(calibration_windows))
    batches = share.split(batch_size) if len(share) else ()
    embed = _unit(source, "embed")
    theirs = [embed(batch.to(device)) for batch in batches]  # the source's stream
    del embed
    ours = None  # the contracted model's: the same as the source's up to the first cut block
    skeleton = source._skeleton if isinstance(source, StreamedSource) else source
    T = share.shape[1]
    cos, sin = skeleton.rope_cos[:T], skeleton.rope_sin[:T]

    def refit(projection: nn.Linear, activations: Callable[[int], torch.Tensor]) -> None:
        """projection's weight from the stream's gap, given the activations entering it per batch."""
        width = projection.in_features
        gram = torch.zeros(width, width, dtype=torch.float64, device=device)
        cross = torch.zeros(projection.out_features, width, dtype=torch.float64, device=device)
        for i in range(len(theirs)):
            a = activations(i).reshape(-1, width).double()
            gap = (theirs[i] - ours[i]).reshape(-1, projection.out_features).double()
            gram += a.T @ a
            cross += gap.T @ a
        _sum_over_ranks(gram, cross)
        projection.weight.copy_(_solve(gram, cross, projection.weight.dtype))

    def heads_output(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        seen = []
        hook = attn.o_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            attn(x, cos, sin)
        finally:
            hook.remove()
        return seen[0]

    def units(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)

    remaining = set(cut)
    for bid in source.block_ids:
        if not remaining:
            break
        old = _unit(source, f"blocks.{bid}")
        if bid not in cut:
            for i in range(len(theirs)):
                theirs[i] = old(theirs[i], cos, sin)
                if ours is not None:
                    ours[i] = old(ours[i], cos, sin)
            continue
        remaining.discard(bid)
        new = cut[bid]
        home = new.attn.o_proj.weight.device
        new.to(device)
        if ours is None:
            ours = [x.clone() for x in theirs]
        for i in range(len(theirs)):
            theirs[i] = theirs[i] + old.attn(old.attn_norm(theirs[i]), cos, sin)
        refit(new.attn.o_proj, lambda i: heads_output(new.attn, new.attn_norm(ours[i])))
        for i in range(len(theirs)):
            ours[i] = ours[i] + new.attn(new.attn_norm(ours[i]), cos, sin)
            theirs[i] = theirs[i] + old.mlp(old.mlp_norm(theirs[i]))
        refit(new.mlp.down_proj, lambda i: units(new.mlp, new.mlp_norm(ours[i])))
        for i in range(len(ours)):
            ours[i] = ours[i] + new.mlp(new.mlp_norm(ours[i]))
        new.to(home)
        del old


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
    refit: bool = True,
    seed: int = 0,
    stats: dict[str, LayerStats] | None = None,
    even: bool = False,
    device: torch.device | str | None = None,
    sequential: bool = True,
) -> tuple[Decoder, ModelConfig]:
    """Shrink the given blocks by `ratio` with the given method; a new model, the source untouched.

    `refit` (every method) refits the kept output-projection columns by least squares on the
    calibration activations. `stats`: layer_stats(model, calibration, chosen) when already at hand.
    `even`: see plan_cuts. `device`: where the new model is built (by default the source's; a
    contract job builds it on the host, beside a source that fills the GPU).
    """
    if stats is None:
        stats = layer_stats(model, calibration, chosen) if method in ("activation", "wanda-sp") or refit else {}
    cuts = plan_cuts(model, chosen, ratio, stats, method, seed, even)
    layers = [cuts[bid].shape() if bid in cuts else layer for layer, bid in zip(config.layers, config.ids())]
    new_config = config.model_copy(update={"layers": layers})
    device = device or next(model.parameters()).device
    new = Decoder(new_config).to(device)
    new.embed.weight.copy_(model.embed.weight)
    new.norm.weight.copy_(model.norm.weight)
    if not new_config.tie_embeddings:
        new.lm_head.weight.copy_(model.lm_head.weight)
    for bid, block in model.blocks.items():
        if bid in cuts:
            _shrink_block(block, new.blocks[bid], cuts[bid], stats.get(bid), refit and not sequential)
        else:
            new.blocks[bid].load_state_dict(block.state_dict())
    if refit and sequential:
        reconstruct(model, calibration, {bid: new.blocks[bid] for bid in cuts})
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
    """Prune `ratio` of the query heads and MLP units of the n least influential blocks.

    `calibration` is a (N, seq_len+1) tensor of token windows from the source's training data.
    """
    chosen = choose_blocks(block_influence(model, calibration), n_layers, config.ids())
    return contract_blocks(model, config, calibration, ratio, chosen, method=method, seed=seed)


# ----------------------------------------------------------------------------- the source, streamed


class StreamedSource:
    """The source model read from its safetensors files one unit at a time, never whole: a block,
    the embeddings, the final norm or the head comes onto `device` in fp32 when a pass needs it
    (read in place from the memory-mapped files, one tensor at a time) and is freed after it.

    A pass over windows (calibration, held-out loss) runs all of this rank's windows through one
    block before it reads the next, as layer-wise pruning methods do: the device holds one unit,
    the windows' hidden states and that block's statistics; the chosen layers' Grams, once
    summed over the ranks, wait on the host (`stats_device`) until the surgery takes them back
    to the device one layer at a time. `blocks[bid]` reads one block, as plan_cuts asks for it."""

    def __init__(self, config: ModelConfig, files: list[Path], names: dict[str, str],
                 device: torch.device | str = "cpu", stats_device: torch.device | str = "cpu"):
        self.config, self.files, self.names = config, list(files), names
        self.device, self.stats_device = torch.device(device), torch.device(stats_device)
        with torch.device("meta"):
            self._skeleton = Decoder(config)
        self._skeleton.reset_buffers(self.device)  # the rotary tables (and the document layouts of packed windows)
        self.blocks = _StreamedBlocks(self)

    @property
    def block_ids(self) -> list[str]:
        return self.config.ids()

    def source_names(self) -> dict[str, str]:
        """Our name of every parameter of the model -> its name in the files."""
        return {name: self.names[name] for name, _ in self._skeleton.named_parameters()}

    @torch.no_grad()
    def unit(self, name: str) -> nn.Module:
        """The submodule `name` ("blocks.<id>", "embed", "norm", "lm_head") in fp32 on the device,
        in eval mode, read from the files."""
        from training_image.parallel import load_shards

        module = copy.deepcopy(self._skeleton.get_submodule(name)).to_empty(device=self.device)
        sources = {}
        for local, _ in module.named_parameters():
            ours = f"{name}.{local}"
            if ours == "lm_head.weight" and self.config.tie_embeddings:
                ours = "embed.weight"
            sources[local] = self.names[ours]
        load_shards(module, self.files, sources)
        return module.eval()

    @torch.no_grad()
    def calibrate(self, watch: Watch, calibration_windows: torch.Tensor, batch_size: int, finish: Finish) -> int:
        """_calibrate, block by block: this rank's share of the windows through each block in turn
        (a rank with no share still reads every block and finishes it, for the ranks' sums)."""
        share = _inputs(_share(calibration_windows))
        batches = share.split(batch_size) if len(share) else ()
        embed = self.unit("embed")
        hidden = [embed(batch.to(self.device)) for batch in batches]
        del embed
        T = share.shape[1]
        cos, sin = self._skeleton.rope_cos[:T], self._skeleton.rope_sin[:T]
        for bid in self.block_ids:
            block = self.unit(f"blocks.{bid}")
            hooks = watch(bid, block)
            try:
                for i, x in enumerate(hidden):  # in place: one batch's old states freed as its new ones come
                    hidden[i] = block(x, cos, sin)
            finally:
                for h in hooks:
                    h.remove()
            del block
            finish(bid)
        return share.numel()

    @torch.no_grad()
    def heldout_loss(self, windows: torch.Tensor, batch_size: int = DEFAULT_EVAL_BATCH) -> float:
        """evaluate.heldout_loss of the source (across ranks under torchrun), in fp32, block by
        block: each rank's share of the windows in batches of `batch_size`, as a Decoder's."""
        if len(windows) == 0:
            raise ValueError("no held-out windows to evaluate")
        share = _share(windows)
        batches = [split_windows(batch) for batch in share.split(batch_size)] if len(share) else []
        embed = self.unit("embed")
        hidden, layouts = [], []
        for inputs, _, starts in batches:
            hidden.append(embed(inputs.to(self.device)))
            if starts is None:
                T = inputs.shape[1]
                layouts.append((self._skeleton.rope_cos[:T], self._skeleton.rope_sin[:T], None))
            else:
                layouts.append(self._skeleton._document_layout(starts.to(self.device)))
        del embed
        for bid in self.block_ids:
            block = self.unit(f"blocks.{bid}")
            for i, (cos, sin, mask) in enumerate(layouts):
                hidden[i] = block(hidden[i], cos, sin, None, mask)
            del block
        norm, head = self.unit("norm"), self.unit("lm_head")
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # [loss sum, scored targets]
        for x, (_, targets, _) in zip(hidden, batches):
            targets = targets.to(self.device)
            sums[0] += chunked_cross_entropy(norm(x), head.weight, targets, "sum")
            sums[1] += (targets != IGNORE_INDEX).sum()
        _sum_over_ranks(sums)
        total, count = sums.tolist()
        if count == 0:
            raise ValueError("the held-out windows hold no target to measure (no assistant tokens)")
        return total / count


class _StreamedBlocks:
    def __init__(self, source: StreamedSource):
        self._source = source

    def __getitem__(self, bid: str) -> nn.Module:
        return self._source.unit(f"blocks.{bid}")


def _agreed(cuts: dict[str, LayerCut]) -> dict[str, LayerCut]:
    """Rank 0's cuts on every rank: the ranks choose from the same summed statistics, and this
    makes sure every rank builds the same shape (each fills its own rows of the student)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return cuts
    shared = [cuts]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


@torch.no_grad()
def contract_streamed(source: StreamedSource, calibration: torch.Tensor, ratio: float, chosen: list[str],
                      method: Method = "activation", stats: dict[str, LayerStats] | None = None,
                      ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """contract_blocks for a source read block by block: (the contracted config, the contracted
    blocks' tensors on the host, by our name). Every other tensor of the contracted model is the
    source's own, read from its files where it is needed (student_sources), so no whole model is
    built here: the chosen blocks come to the device one at a time, each with its Grams, to be
    costed (plan_cuts) and then cut and refit."""
    if stats is None:
        stats = layer_stats(source, calibration, chosen)
    cuts = _agreed(plan_cuts(source, chosen, ratio, stats, method))
    config = source.config
    layers = [cuts[bid].shape() if bid in cuts else layer for layer, bid in zip(config.layers, config.ids())]
    new_config = config.model_copy(update={"layers": layers})
    blocks: dict[str, Block] = {}
    for bid in chosen:
        old = source.blocks[bid]
        with torch.device("meta"):
            new = Block(new_config, cuts[bid].shape())
        new.to_empty(device="cpu")
        _shrink_block(old, new, cuts[bid], _on(stats[bid], source.device), refit=False)
        blocks[bid] = new.eval()
        del old
    reconstruct(source, calibration, blocks)
    return new_config, {f"blocks.{bid}.{name}": tensor for bid, new in blocks.items() for name, tensor in new.state_dict().items()}


def student_sources(source: StreamedSource, contracted: ModelConfig, given: dict[str, torch.Tensor]) -> dict:
    """Where each parameter of the contracted model comes from, for parallel.load_shards: a
    contracted block's tensor (given), else the source's tensor of the same name in its files."""
    with torch.device("meta"):
        skeleton = Decoder(contracted)
    return {name: given[name] if name in given else source.names[name] for name, _ in skeleton.named_parameters()}


# ----------------------------------------------------------------------------- healing

HealLoss = Literal["kl", "kl+lm", "lm"]
HEAL_LOSS: HealLoss = "kl"


class Distillation(nn.Module):
    """The contracted model (`student`) trained toward the source: forward(idx, targets) returns
    the mean over tokens of KL(source || student) of the next-token distributions ("kl"), that
    plus the language-model loss ("kl+lm"), or the language-model loss alone ("lm"), as the
    Decoder returns its loss. The source is held outside the module tree: it is neither trained
    nor saved, and a sharded healing (parallel.wrap) shards the student alone; the source comes
    as it was built, whole or itself sharded over the same ranks (a contract job's teacher:
    parallel.frozen_model), and its head, which the loss reads, whole either way.

    Neither model's logits are ever held whole: the source runs to its final hidden states, and
    the student's head computes the loss from both in chunks (model.chunked_kl_divergence), as
    the language-model loss is computed."""

    def __init__(self, student: Decoder, source: Decoder, loss: HealLoss = HEAL_LOSS):
        super().__init__()
        if loss not in ("kl", "kl+lm", "lm"):
            raise ValueError(f"unknown healing loss {loss!r}")
        self.student = student
        self.config = student.config
        self.loss = loss
        self._source = (source.eval().requires_grad_(False),)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
                starts: torch.Tensor | None = None):
        # Evaluated (eval mode), it is the student: held-out loss is the student's own.
        if targets is None or self.loss == "lm" or not self.training:
            return self.student(idx, targets, reduction, starts=starts)
        source = self._source[0]
        with torch.no_grad():
            teacher_hidden = source.norm(source.forward_hidden(idx, starts=starts))  # (B, T, C)
        # Through the student's own forward: sharded, it is the root that gathers its weights.
        return self.student(idx, targets if self.loss == "kl+lm" else None, starts=starts,
                            teacher=(teacher_hidden, source.lm_head.weight))

    def parameter_count(self) -> int:
        return self.student.parameter_count()


def heal(model: Decoder, source: Decoder, windows: torch.Tensor, steps: int, lr: float = None, *, batch_size: int | None = None,
         loss: HealLoss = HEAL_LOSS, seed: int = 0) -> list[float]:
    """Train the contracted `model` in place for `steps` steps of one cycle toward `source`, at
    `batch_size` windows a step (by default a contract job's, shapes.healing_batch_size); the step
    losses."""
    if steps <= 0:
        return []
    plan = TrainPlan(turns=1, cycle_steps=[steps], lr=HEAL_LR if lr is None else lr, seq_len=windows.shape[1] - 1,
                     batch_size=batch_size or healing_batch_size(model.parameter_count(), windows.shape[1] - 1, len(windows)),
                     seed=seed)
    trainer = Trainer(Distillation(model, source, loss).train(), windows, None, plan, log=None)
    trainer.run()
    return trainer.losses


HEAL_LR = TrainSettings.model_fields["lr"].default  # healing uses the product's training learning rate
