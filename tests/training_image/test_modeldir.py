"""Model directories round-trip exactly, also through model.tar.gz and over an existing directory."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch

from shared.shapes import SIZES
from training_image.model import Decoder
from training_image.modeldir import load_model_dir, save_model_dir


def _logits(model: Decoder) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(12).view(1, 12))


def test_round_trip_keeps_config_weights_tokenizer_and_metrics(tmp_path, debug_model, tokenizer):
    path = save_model_dir(tmp_path / "m", debug_model, tokenizer, {"final_perplexity": 12.5})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "metrics.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((path / "config.json").read_text()) == json.loads(debug_model.config.model_dump_json())
    model, loaded_tokenizer = load_model_dir(path)
    assert torch.equal(_logits(model), _logits(debug_model))
    assert loaded_tokenizer.to_str() == tokenizer.to_str()
    assert json.loads((path / "metrics.json").read_text()) == {"final_perplexity": 12.5}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_loads_from_a_model_tar_gz_and_ties_embeddings(tmp_path, tokenizer):
    tied = Decoder(SIZES["debug"].model_copy(update={"tie_embeddings": True})).init_weights(1)
    save_model_dir(tmp_path / "m", tied, tokenizer)
    channel = tmp_path / "channel"
    channel.mkdir()
    with tarfile.open(channel / "model.tar.gz", "w:gz") as tar:
        for file in (tmp_path / "m").iterdir():
            tar.add(file, arcname=file.name)
    model, _ = load_model_dir(channel)
    assert model.lm_head.weight is model.embed.weight
    assert torch.equal(_logits(model), _logits(tied))


def test_saving_over_an_existing_directory_replaces_its_files(tmp_path, debug_model, tokenizer):
    target = tmp_path / "model"
    target.mkdir()
    (target / "model.safetensors").write_text("stale")
    save_model_dir(target, debug_model, tokenizer)
    model, _ = load_model_dir(target)
    assert torch.equal(_logits(model), _logits(debug_model))


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_model_dir(tmp_path)


def test_an_unpacked_archive_is_removed_when_the_process_ends(tmp_path, debug_model, tokenizer):
    """Loading a model.tar.gz unpacks it into a temporary folder that the process removes at exit."""
    import os
    import subprocess
    import sys

    save_model_dir(tmp_path / "m", debug_model, tokenizer)
    with tarfile.open(tmp_path / "model.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "m", arcname=".")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    script = ("from training_image.modeldir import load_model_dir, find_model_dir\n"
              f"print(find_model_dir({str(tmp_path / 'model.tar.gz')!r}))\n"
              f"load_model_dir({str(tmp_path)!r})\n")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TMPDIR": str(scratch)},
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip().startswith(str(scratch / "fusion-model-"))
    assert list(scratch.iterdir()) == []
