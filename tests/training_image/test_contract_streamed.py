"""Choosing and cutting from a source read block by block (StreamedSource), fp32: the calibration
windows streamed through one block at a time give the block influence, the Grams, the chosen
blocks, the cuts and the contracted weights that the whole model in memory gives; its held-out
loss is the whole model's; and the contracted model is filled from the source's files and the
cut blocks alone."""

from __future__ import annotations

import functools

import pytest
import torch

from shared.shapes import SIZES
from training_image import parallel
from training_image.contract import (
    StreamedSource,
    block_influence,
    choose_blocks,
    contract_blocks,
    contract_streamed,
    layer_stats,
    student_sources,
)
from training_image.data import DOCUMENT_START, FLAG_SHIFT, NOT_TARGET
from training_image.evaluate import heldout_loss
from training_image.model import Decoder
from training_image.modeldir import load_model_dir, open_model_dir, save_model_dir

from .conftest import small_config

CONFIG = small_config()  # 4 blocks
RATIO = 0.5
LAYERS = 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def saved(request, tmp_path, tokenizer):
    """(the source as read whole from its directory, the same directory streamed); with its own
    head, and with the head tied to the embeddings."""
    config = CONFIG.model_copy(update={"tie_embeddings": request.param})
    save_model_dir(tmp_path / "source", Decoder(config).init_weights(2), tokenizer)
    whole, _ = load_model_dir(tmp_path / "source")
    config, _, files, names = open_model_dir(tmp_path / "source")
    return whole, StreamedSource(config, files, names, "cpu")


def _windows(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, SIZES["debug"].vocab_size, (count, 17), generator=generator)


def test_the_streamed_choice_is_the_choice_of_the_whole_model_fp32(saved):
    whole, streamed = saved
    calibration = _windows(11, 0)  # not a multiple of the batch: a short last batch
    influence = block_influence(whole, calibration, batch_size=4)
    assert block_influence(streamed, calibration, batch_size=4) == influence  # the same sums, bit for bit
    chosen = choose_blocks(influence, LAYERS, whole.config.ids())
    stats = layer_stats(whole, calibration, chosen, batch_size=4)
    streamed_stats = layer_stats(streamed, calibration, chosen, batch_size=4)
    assert list(streamed_stats) == chosen
    for bid in chosen:
        torch.testing.assert_close(streamed_stats[bid].mlp_gram, stats[bid].mlp_gram, rtol=0, atol=0)
        torch.testing.assert_close(streamed_stats[bid].attn_gram, stats[bid].attn_gram, rtol=0, atol=0)
        assert (streamed_stats[bid].tokens, streamed_stats[bid].residual) == (stats[bid].tokens, stats[bid].residual)
        assert streamed_stats[bid].mlp_gram.device == streamed.stats_device

    expected, expected_config = contract_blocks(whole, whole.config, calibration, RATIO, chosen, stats=stats)
    config, cut = contract_streamed(streamed, calibration, RATIO, chosen, stats=streamed_stats)
    assert config == expected_config and config.parameters() < whole.config.parameters()  # the same cuts: units and heads
    assert {name.split(".")[1] for name in cut} == set(chosen)  # only the cut blocks are held
    # The student, made on the meta device and filled from the source's files and the cut blocks.
    with torch.device("meta"):
        student = Decoder(config)
    parallel.wrap(student, strategy="ddp", activation_checkpointing=False, world_size=1, device=torch.device("cpu"),
                  materialize=functools.partial(parallel.load_shards, files=streamed.files,
                                                sources=student_sources(streamed, config, cut)))
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(student.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_the_streamed_choice_computes_its_own_statistics(saved):
    whole, streamed = saved
    calibration = _windows(8, 1)
    chosen = ["1", "2"]
    expected, _ = contract_blocks(whole, whole.config, calibration, RATIO, chosen)
    _, cut = contract_streamed(streamed, calibration, RATIO, chosen)
    state = expected.state_dict()
    for name, value in cut.items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("packed", [False, True])
def test_the_streamed_held_out_loss_is_the_whole_models_fp32(saved, packed):
    whole, streamed = saved
    windows = _windows(13, 3)
    if packed:  # conversations: a second one starting mid-window, the first tokens not scored
        flags = torch.zeros_like(windows)
        flags[:, 7] = DOCUMENT_START
        flags[:, :4] = NOT_TARGET
        windows = windows | (flags << FLAG_SHIFT)
    expected = heldout_loss(whole, windows, batch_size=4)
    assert streamed.heldout_loss(windows, batch_size=4) == pytest.approx(expected, rel=1e-6)
    assert expected > 1


CHOOSE = """
import sys
import torch
from bench.memory import peak_bytes
from training_image.contract import StreamedSource, block_influence, contract_streamed
from training_image.modeldir import open_model_dir

torch.set_num_threads(1)
calibration = torch.load(sys.argv[1])


def choose(folder):
    def run():
        config, _, files, names = open_model_dir(folder)
        streamed = StreamedSource(config, files, names, "cpu")
        assert len(block_influence(streamed, calibration)) == config.n_layers
        contract_streamed(streamed, calibration, 0.5, ["1", "2"])

    return run


choose(sys.argv[2])()  # the code and libraries the pass runs, paged in
print(peak_bytes(choose(sys.argv[3])))
"""


@pytest.mark.slow
def test_choosing_from_a_streamed_source_holds_no_whole_copy_and_stays_within_the_plan(tmp_path, tokenizer):
    """The host's peak (resident set, every allocation counted) while a CPU rank chooses and cuts
    from a source whose weights dominate (32 blocks, 135 MB in fp32): under half the source, and
    under the plan's figure for that phase on a CPU (the device's, choosing_bytes, with the chosen
    layers' Grams and cut blocks the host keeps). Measured in a process of its own whose
    allocator gives back what is freed (glibc's mmap threshold fixed), after a first pass over a
    4-block model of another width has loaded the code and libraries the pass runs."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from shared.memory import LayerShape, choosing_bytes, chosen_host_bytes

    config = SIZES["debug"].model_copy(update={
        "vocab_size": 2048, "dim": 512, "head_dim": 64,
        "layers": [LayerShape(n_heads=8, n_kv_heads=2, mlp_hidden=256)] * 32})
    warm = config.model_copy(update={"dim": 256, "layers": config.layers[:4]})
    save_model_dir(tmp_path / "warm", Decoder(warm).init_weights(0), tokenizer)
    save_model_dir(tmp_path / "source", Decoder(config).init_weights(0), tokenizer)
    calibration = _windows(8, 4)
    torch.save(calibration, tmp_path / "calibration.pt")
    root = Path(__file__).parents[2]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", CHOOSE, str(tmp_path / "calibration.pt"), str(tmp_path / "warm"),
                          str(tmp_path / "source")], env=env, cwd=root, capture_output=True, text=True, check=True)
    measured = int(run.stdout.split()[-1])
    source_bytes = 4 * config.parameters()
    planned = choosing_bytes(config, config, 2, calibration.shape[1] - 1) + chosen_host_bytes(config, 2)
    print(f"choosing from a {source_bytes / 2**20:.0f} MiB source: host peak {measured / 2**20:.1f} MiB, "
          f"planned {planned / 2**20:.1f} MiB")
    assert measured < source_bytes / 2
    assert measured < planned
