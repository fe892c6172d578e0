"""Weights past the shard size are written as safetensors shards with their index, read back by
every reader, and a sharded (FSDP) run writes the very tensors one process writes."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from tokenizers import Tokenizer

from shared.contracts import TrainMetrics
from shared.hf import INDEX, SINGLE
from shared.shapes import SIZES
from training_image import parallel, runtime
from training_image.hf import import_hf
from training_image.model import Decoder
from training_image.modeldir import load_model_dir, save_model_dir
from training_image.train import Trainer, TrainPlan

from .conftest import free_port, gloo_group, small_config

TINY_SHARD = 20_000  # bytes: the debug model in several shards
PLAN = TrainPlan(turns=1, cycle_steps=[3], lr=3e-3, seq_len=16, batch_size=4, seed=1)


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            out.update({name: tensors.get_tensor(name) for name in tensors.keys()})
    return out


def test_a_model_past_the_shard_size_is_written_in_shards_and_loads_back_bit_identical(tmp_path, tokenizer):
    model = Decoder(small_config(dtype="bfloat16", tie_embeddings=True)).init_weights(2)
    directory = save_model_dir(tmp_path / "model", model, tokenizer, shard_bytes=TINY_SHARD)
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    index = json.loads((directory / INDEX).read_text())
    assert len(shards) > 2 and not (directory / SINGLE).exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    loaded, _ = load_model_dir(directory)
    expected = {name: t.to(torch.bfloat16).float() for name, t in model.state_dict().items()}
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert loaded.lm_head.weight is loaded.embed.weight
    # Written again in place as one file: the stale shards and index go, the rest loads as before.
    save_model_dir(directory, loaded, tokenizer)
    assert sorted(p.name for p in directory.glob("*.safetensors")) == [SINGLE] and not (directory / INDEX).exists()
    again, _ = load_model_dir(directory)
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_a_missing_shard_is_named(tmp_path, tokenizer):
    directory = save_model_dir(tmp_path / "model", Decoder(SIZES["debug"]).init_weights(0), tokenizer, shard_bytes=TINY_SHARD)
    second = sorted(directory.glob("model-*.safetensors"))[1]
    second.unlink()
    with pytest.raises(FileNotFoundError, match=f"{second.name}.*{INDEX}"):
        load_model_dir(directory)


def _outputs(root, tokenizer_file: str) -> None:
    """Train PLAN on the debug model (sharded when under a process group) and write the outputs."""
    windows = torch.randint(0, SIZES["debug"].vocab_size, (16, PLAN.seq_len + 1), generator=torch.Generator().manual_seed(4))
    model = Decoder(SIZES["debug"]).init_weights(0)
    trainer = Trainer(model, windows, None, PLAN, strategy="fsdp", log=None, autocast=False)  # fp32: the very tensors
    trainer.run()
    whole = parallel.full_model(trainer.model)
    if runtime.rank() == 0:
        config = SIZES["debug"]
        metrics = TrainMetrics(job_type="train", job_id=f"ranks-{trainer.world_size}", config=config,
                               parameters_before=config.parameters(), parameters_after=config.parameters(),
                               depth_before=config.n_layers, depth_after=config.n_layers, training_tokens=0,
                               tokens_processed=0, tokens_per_second=0.0, wall_time_s=0.0, cycles=[],
                               final_perplexity=None, sequences_per_step=PLAN.batch_size)
        runtime.write_outputs(root, whole, Tokenizer.from_file(tokenizer_file), metrics, TINY_SHARD)


def _worker(rank: int, world_size: int, port: int, root, tokenizer_file: str) -> None:
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)
    with gloo_group(rank, world_size, port):
        _outputs(root, tokenizer_file)


def test_a_sharded_run_at_two_ranks_writes_the_tensors_of_one_process(tmp_path, tokenizer):
    tokenizer_file = str(tmp_path / "tokenizer.json")
    tokenizer.save(tokenizer_file)
    _outputs(tmp_path / "one", tokenizer_file)
    mp.spawn(_worker, args=(2, free_port(), tmp_path / "two", tokenizer_file), nprocs=2, join=True)
    one, two = _tensors(tmp_path / "one/model/hf"), _tensors(tmp_path / "two/model/hf")
    assert len(list((tmp_path / "two/model/hf").glob("*.safetensors"))) > 2
    assert sorted(two) == sorted(one)
    for name, tensor in one.items():
        # Apart by fp32 rounding only (the ranks' reductions add in another order), which AdamW
        # amplifies where a gradient is near zero (it divides by the gradient's own running
        # size): a rare element moves further, never beyond the 3 steps' learning rate. A wrong
        # shard or a missing reduction moves most elements.
        apart = (two[name] - tensor).abs()
        beyond = apart > 1e-5 + 1e-4 * tensor.abs()
        assert beyond.sum() <= max(1, tensor.numel() // 1000) and apart.max() <= 3 * PLAN.lr, (name, beyond.sum(), apart.max())
    assert json.loads((tmp_path / "two/model/metrics.json").read_text())["job_id"] == "ranks-2"  # rank 0 wrote it
    # The weights are written once, in the export; the model directory reads them from there.
    assert not list((tmp_path / "two/model").glob("*.safetensors"))
    # The export, in shards, imports back to the model directory's tensors.
    imported = _tensors(import_hf(tmp_path / "two/model/hf", tmp_path / "imported"))
    loaded = load_model_dir(tmp_path / "two/model")[0].state_dict()
    assert sorted(imported) == sorted(loaded)
    assert all(torch.equal(imported[name], t) for name, t in loaded.items())
