"""Hugging Face checkpoints in and out, per family: tiny random models built with transformers'
own config classes, saved sharded, imported, compared with transformers (logits and greedy tokens),
exported back and loaded by transformers again."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from shared.hf import UnsupportedCheckpoint
from training_image.cli import main
from training_image.export import export_hf
from training_image.generate import generate
from training_image.hf import import_hf
from training_image.modeldir import load_model_dir
from training_image.tokenizer import train_tokenizer

VOCAB = 300
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.1,
)
FAMILIES = {
    # Llama 3.2: llama3 rope scaling (every band present: original context 64, head dim 16) and tied embeddings.
    "llama3": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": lambda: MistralConfig(**COMMON, rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
    "qwen2": lambda: Qwen2Config(**COMMON, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # Qwen3: a head dim that is not hidden / heads, and the per-head q/k norms.
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
}


def hf_checkpoint(path, family: str, corpus, dtype=torch.float32):
    """A random transformers model of the family, saved in shards with an index, plus a tokenizer."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a swapped or dropped one cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    model = model.to(dtype)
    model.save_pretrained(path, max_shard_size="40KB")
    train_tokenizer(corpus[:5], VOCAB).save(str(path / "tokenizer.json"))
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_imports_with_the_logits_and_greedy_tokens_of_transformers(tmp_path, corpus, family):
    hf = hf_checkpoint(tmp_path / "hf", family, corpus)
    assert (tmp_path / "hf/model.safetensors.index.json").is_file()  # sharded
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours, _ = load_model_dir(tmp_path / "ours")
    assert ours.config.family == hf.config.model_type and ours.config.dtype == "float32"
    assert ours.parameter_count() == ours.config.parameters() == hf.num_parameters()
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = hf(tokens).logits, ours(tokens)
    assert (actual - expected).abs().max() < 1e-4
    prompt = tokens[0, :8]
    assert generate(ours, prompt.tolist(), 20) == hf_greedy(hf, prompt.tolist(), 20)


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_an_untouched_bf16_model_round_trips_to_identical_tensors(tmp_path, corpus, family):
    hf_checkpoint(tmp_path / "hf", family, corpus, dtype=torch.bfloat16)
    import_hf(tmp_path / "hf", tmp_path / "ours")
    assert json.loads((tmp_path / "ours/config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "ours/model.safetensors").values())
    model, tokenizer = load_model_dir(tmp_path / "ours")
    export_hf(model, tokenizer, tmp_path / "out", shard_bytes=40_000)
    source = _tensors(tmp_path / "hf")
    exported = _tensors(tmp_path / "out")
    assert source.keys() == exported.keys()
    assert all(torch.equal(source[name], exported[name]) and exported[name].dtype == torch.bfloat16 for name in source)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(again).__name__ == json.loads((tmp_path / "hf/config.json").read_text())["architectures"][0]


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_a_folder_loads_in_place_as_its_import_does_and_writes_nothing(tmp_path, corpus, family, monkeypatch):
    """A tenant's own folder is read where it lies (renamed on the way in): the same fp32 weights
    as importing it first, and no temporary copy left behind (tied embeddings in llama3)."""
    hf_checkpoint(tmp_path / "hf", family, corpus, dtype=torch.bfloat16)
    import_hf(tmp_path / "hf", tmp_path / "ours")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)
    in_place, tokenizer = load_model_dir(tmp_path / "hf")
    imported, _ = load_model_dir(tmp_path / "ours")
    assert list(scratch.iterdir()) == []
    assert in_place.config == imported.config and in_place.config.dtype == "bfloat16"
    for (name, a), (_, b) in zip(in_place.state_dict().items(), imported.state_dict().items(), strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b), name  # bf16 widened exactly, both ways
    assert tokenizer.get_vocab_size() <= VOCAB


def hf_greedy(hf, prompt: list[int], count: int) -> list[int]:
    """transformers' own greedy decoding (its KV cache), never stopping early."""
    hf.generation_config.eos_token_id = None
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=count, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_a_bf16_artifact_is_half_the_size_of_an_fp32_one(tmp_path, corpus):
    sizes = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        hf_checkpoint(tmp_path / f"hf-{name}", "qwen2", corpus, dtype=dtype)
        import_hf(tmp_path / f"hf-{name}", tmp_path / name)
        sizes[name] = (tmp_path / name / "model.safetensors").stat().st_size
    assert 0.49 < sizes["bfloat16"] / sizes["float32"] < 0.51


@pytest.mark.parametrize("change, reason", [
    ({"model_type": "mixtral", "num_local_experts": 8}, "mixture-of-experts"),
    ({"model_type": "gemma"}, "model type 'gemma' is not supported"),
    ({"hidden_act": "gelu"}, "activation 'gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope scaling 'yarn'"),
    ({"sliding_window": 64}, r"sliding-window attention \(64 tokens\) shorter than the context \(128\)"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_import_refuses_what_the_decoder_does_not_compute_naming_it(tmp_path, corpus, change, reason):
    hf_checkpoint(tmp_path / "hf", "mistral", corpus)
    config = json.loads((tmp_path / "hf/config.json").read_text())
    config.update(change)
    if change.get("attention_bias"):
        config["model_type"] = "llama"
    (tmp_path / "hf/config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedCheckpoint, match=reason):
        main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")])
    assert not (tmp_path / "ours").exists()


def test_import_refuses_misshaped_tensors(tmp_path, corpus):
    hf_checkpoint(tmp_path / "hf", "qwen2", corpus)
    config = json.loads((tmp_path / "hf/config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "hf/config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedCheckpoint, match=r"mlp.gate_proj.weight has shape \[96, 64\], expected \[128, 64\]"):
        import_hf(tmp_path / "hf", tmp_path / "ours")
