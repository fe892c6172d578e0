"""Contraction under torchrun (gloo): each rank calibrates on its share of the windows and the
statistics are summed over the ranks, so two ranks choose the blocks and cuts, and compute the
weights, of one process calibrating on them all."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from shared.shapes import SIZES
from training_image.contract import block_influence, choose_blocks, contract_blocks, layer_stats
from training_image.model import Decoder

from .conftest import free_port, gloo_group, small_config

CONFIG = small_config(n_layers=4)
RATIO = 0.5
WINDOWS = 7  # uneven over two ranks: one calibrates on 4 windows, the other on 3


def _windows() -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    return torch.randint(0, SIZES["debug"].vocab_size, (WINDOWS, 17), generator=generator)


def _contract() -> dict:
    model = Decoder(CONFIG).init_weights(1)
    calibration = _windows()
    influence = block_influence(model, calibration, batch_size=2)
    chosen = choose_blocks(influence, 2, CONFIG.ids())
    stats = layer_stats(model, calibration, chosen, batch_size=2)
    new, config = contract_blocks(model, CONFIG, calibration, RATIO, chosen, stats=stats)
    return {
        "influence": influence, "chosen": chosen, "config": config.model_dump(), "state": new.state_dict(),
        "tokens": {bid: s.tokens for bid, s in stats.items()},
        "grams": {bid: s.mlp_gram for bid, s in stats.items()},
    }


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, world_size, port):
        result = _contract()
        torch.save(result, f"{out}.{rank}")


def test_two_ranks_choose_and_cut_what_one_process_does(tmp_path):
    alone = _contract()
    out = str(tmp_path / "ranks")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(2)]
    tokens = WINDOWS * 16
    assert all(count == tokens for count in alone["tokens"].values())
    for result in ranks:  # every rank has the statistics of all the windows, not of its share
        assert result["tokens"] == alone["tokens"]
        assert result["chosen"] == alone["chosen"]
        assert result["config"] == alone["config"]
        for bid, value in alone["influence"].items():
            assert abs(result["influence"][bid] - value) < 1e-6, bid
        for bid, gram in alone["grams"].items():
            torch.testing.assert_close(result["grams"][bid], gram, rtol=1e-10, atol=1e-10)
        for name, tensor in alone["state"].items():
            torch.testing.assert_close(result["state"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # Not vacuous: the shapes changed, and half the windows alone would have given other statistics.
    assert alone["config"]["layers"] != CONFIG.model_dump()["layers"]
    half = layer_stats(Decoder(CONFIG).init_weights(1), _windows()[::2], alone["chosen"], batch_size=2)
    assert not torch.allclose(half[alone["chosen"][0]].mlp_gram, alone["grams"][alone["chosen"][0]])
