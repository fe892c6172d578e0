"""`fusion-train init`: a fresh base model directory of a named size."""

from __future__ import annotations

import pytest
import torch

from shared.shapes import SIZES
from training_image.cli import main
from training_image.modeldir import load_model_dir


@pytest.mark.slow
def test_init_writes_a_loadable_base_with_a_full_vocabulary(tmp_path, capsys):
    assert main(["init", "--size", "debug", "--out", str(tmp_path / "base"), "--seed", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    model, tokenizer = load_model_dir(tmp_path / "base")
    assert model.config == SIZES["debug"]
    assert tokenizer.get_vocab_size() == SIZES["debug"].vocab_size
    ids = tokenizer.encode("import os\nprint(os.getcwd())").ids
    with torch.no_grad():
        assert model(torch.tensor([ids])).shape == (1, len(ids), SIZES["debug"].vocab_size)
