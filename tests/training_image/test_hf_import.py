"""Import of Hugging Face Llama checkpoints: a tiny random LlamaForCausalLM, converted, same logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from training_image.cli import import_hf, main
from training_image.modeldir import load_model_dir
from training_image.tokenizer import train_tokenizer


def _hf_checkpoint(path, tie: bool, corpus) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        rope_theta=50000.0,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so a swapped norm cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    train_tokenizer(corpus[:5], 300).save(str(path / "tokenizer.json"))
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_converted_llama_gives_the_same_logits(tmp_path, corpus, tie):
    hf = _hf_checkpoint(tmp_path / "hf", tie, corpus)
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours, tokenizer = load_model_dir(tmp_path / "ours")
    assert ours.parameter_count() == sum(p.numel() for p in hf.parameters())
    assert ours.config.tie_embeddings is tie and ours.config.rope_theta == 50000.0
    tokens = torch.tensor([tokenizer.encode("def grow(model, config):\n    return model, config").ids[:40]])
    with torch.no_grad():
        expected = hf(tokens).logits
        actual = ours(tokens)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def test_cli_import_refuses_scaled_rope_with_a_reason(tmp_path, corpus):
    _hf_checkpoint(tmp_path / "hf", False, corpus)
    config = json.loads((tmp_path / "hf/config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    (tmp_path / "hf/config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope scaling 'llama3' is not supported"):
        main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")])
