"""A job's outputs hold the weights once: where the transformers export needs no padding, the
model directory keeps none and reads the export's; a contracted model keeps its compact weights.
A model.tar.gz given as the model channel is extracted once per node, by its first rank."""

from __future__ import annotations

import os
import tarfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shared.contracts import TrainMetrics
from shared.hf import EXPORT_DIR
from shared.shapes import SIZES, LayerShape
from training_image import jobs, modeldir, runtime
from training_image.model import Decoder
from training_image.modeldir import load_model_dir, open_model_dir, save_model_dir

from .conftest import free_port, gloo_group


def _metrics(config) -> TrainMetrics:
    return TrainMetrics(job_type="train", job_id="j", config=config, parameters_before=config.parameters(),
                        parameters_after=config.parameters(), depth_before=config.n_layers, depth_after=config.n_layers,
                        training_tokens=0, tokens_processed=0, tokens_per_second=0.0, wall_time_s=0.0, cycles=[],
                        final_perplexity=None, sequences_per_step=8)


def _weight_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def test_a_uniform_model_writes_its_weights_once_in_the_export(tmp_path, tokenizer):
    model = Decoder(SIZES["debug"]).init_weights(3)
    runtime.write_outputs(tmp_path, model, tokenizer, _metrics(model.config), shard_bytes=20_000)
    folder = tmp_path / "model"
    assert not list(folder.glob("*.safetensors")) and list((folder / EXPORT_DIR).glob("*.safetensors"))
    # One copy: the export's files are the weights' size (fp32, 4 bytes a parameter) and headers.
    assert model.parameter_count() * 4 <= _weight_bytes(folder) < model.parameter_count() * 4 * 1.1
    loaded, _ = load_model_dir(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    config, _, files, names = open_model_dir(folder)  # what the sharded path reads its rows from
    assert config == model.config and all(f.parent.name == EXPORT_DIR for f in files)
    assert names["embed.weight"] == "model.embed_tokens.weight"


def test_a_contracted_model_keeps_its_compact_weights_beside_its_padded_export(tmp_path, tokenizer):
    layers = list(SIZES["debug"].layers)
    layers[1] = LayerShape(n_heads=2, n_kv_heads=2, mlp_hidden=100)
    config = SIZES["debug"].model_copy(update={"layers": layers})
    assert not modeldir.shares_export_weights(config) and modeldir.shares_export_weights(SIZES["debug"])
    model = Decoder(config).init_weights(4)
    runtime.write_outputs(tmp_path, model, tokenizer, _metrics(config))
    assert (tmp_path / "model/model.safetensors").is_file() and (tmp_path / "model/hf/model.safetensors").is_file()
    loaded, _ = load_model_dir(tmp_path / "model")
    assert loaded.config == config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def _archive_channel(root, tokenizer) -> None:
    source = root / "source"
    save_model_dir(source, Decoder(SIZES["debug"]).init_weights(5), tokenizer)
    channel = root / jobs.INPUT_MODEL
    channel.mkdir(parents=True)
    with tarfile.open(channel / modeldir.ARCHIVE, "w:gz") as tar:
        for file in source.iterdir():
            tar.add(file, arcname=file.name)


def test_an_archive_is_extracted_once_and_read_in_place_after(tmp_path, tokenizer, monkeypatch):
    _archive_channel(tmp_path, tokenizer)
    folder = jobs.model_source(tmp_path)
    assert folder == tmp_path / jobs.UNPACKED_MODEL and (folder / "config.json").is_file()
    calls = []
    monkeypatch.setattr(modeldir.tarfile, "open", lambda *a, **k: calls.append(a) or pytest.fail("extracted again"))
    assert jobs.model_source(tmp_path) == folder and not calls
    model, _ = load_model_dir(folder)
    assert model.config == SIZES["debug"]


def _worker(rank: int, world_size: int, port: int, root, out: str) -> None:
    os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = str(rank), str(world_size)
    with gloo_group(rank, world_size, port):
        extracted = []
        unpack = jobs.unpack
        jobs.unpack = lambda archive, into: extracted.append(rank) or unpack(archive, into)
        folder = jobs.model_source(root)
        model, _ = load_model_dir(folder)  # every rank reads the one extracted copy
        everyone: list = [None] * world_size
        dist.all_gather_object(everyone, (extracted, str(folder), model.parameter_count()))
        if rank == 0:
            torch.save(everyone, out)


@pytest.mark.slow
def test_on_a_node_the_first_rank_extracts_and_the_others_wait(tmp_path, tokenizer):
    _archive_channel(tmp_path, tokenizer)
    out = str(tmp_path / "ranks.pt")
    mp.spawn(_worker, args=(2, free_port(), tmp_path, out), nprocs=2, join=True)
    (first, folder, count), (second, other, same) = torch.load(out, weights_only=False)
    assert first == [0] and second == [] and folder == other and count == same == SIZES["debug"].parameters()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{jobs.UNPACKED_MODEL}")] == []
