"""The family features (q/k/v biases, per-head q/k norms, llama3 rope, tied embeddings) through
growth, contraction, export of a contracted model, the tokenizer rules and a train job."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM

from shared.shapes import LayerShape, ModelConfig, RopeScaling
from training_image import entry
from training_image.contract import contract_blocks
from training_image.data import token_windows
from training_image.export import export_hf
from training_image.generate import generate
from training_image.growth import grow
from training_image.hf import import_hf
from training_image.model import Decoder
from training_image.modeldir import load_model_dir
from training_image.tokenizer import TextTokenizer, load_tokenizer

from .conftest import write_hyperparameters
from .test_hf_import import hf_checkpoint, hf_greedy

LAYER = LayerShape(n_heads=8, n_kv_heads=4, mlp_hidden=48)
FEATURES = {
    "llama3": dict(rope_scaling=RopeScaling(type="llama3", factor=8.0, original_context_length=32), tie_embeddings=True),
    "qwen2": dict(qkv_bias=True, family="qwen2", rope_theta=1e6),
    "qwen3": dict(qk_norm=True, family="qwen3", head_dim=12),
}


def family_model(name: str, seed: int = 0) -> Decoder:
    config = ModelConfig(**{"vocab_size": 200, "dim": 32, "head_dim": 8, "context_length": 64, "layers": [LAYER] * 4,
                            **FEATURES[name]})
    model = Decoder(config).init_weights(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # biases and norms that matter, so one dropped or misplaced shows
        for pname, p in model.named_parameters():
            if pname.endswith(".bias") or "norm" in pname:
                p.copy_((0.5 if "norm" in pname else 0.0) + torch.rand(p.shape, generator=generator))
    return model


def tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_growth_preserves_the_function_of_each_family(name):
    base = family_model(name)
    grown, config = grow(base, base.config)
    x = tokens(base.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(grown(x), base(x), atol=1e-5, rtol=0)
    assert grown.parameter_count() == config.parameters()
    new = grown.blocks["3_1"]
    assert torch.count_nonzero(new.attn.o_proj.weight) == 0 and torch.count_nonzero(new.mlp.down_proj.weight) == 0


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_contraction_prunes_biases_and_keeps_norms_with_their_heads(name, windows):
    model = family_model(name)
    train, _ = windows
    calibration = train[:4] % model.config.vocab_size
    new, config = contract_blocks(model, model.config, calibration, 0.5, ["1", "2"], method="magnitude", refit=False)
    assert new.parameter_count() == config.parameters() < model.parameter_count()
    # Without the refit, the contracted model is the source with the removed query heads' and
    # units' output columns zeroed: so every kept bias and norm must have followed its head.
    reference = family_model(name)
    D = model.config.head_dim
    with torch.no_grad():
        for bid in ("1", "2"):
            old, kept = reference.blocks[bid], new.blocks[bid]
            kept_heads = {_row_index(old.attn.q_proj.weight.view(-1, D, old.attn.q_proj.in_features), q)
                          for q in kept.attn.q_proj.weight.view(-1, D, kept.attn.q_proj.in_features)}
            for h in set(range(old.attn.n_heads)) - kept_heads:
                old.attn.o_proj.weight[:, h * D:(h + 1) * D] = 0
            kept_units = {_row_index(old.mlp.up_proj.weight, row) for row in kept.mlp.up_proj.weight}
            for u in set(range(old.mlp.up_proj.out_features)) - kept_units:
                old.mlp.down_proj.weight[:, u] = 0
        x = tokens(model.config.vocab_size)
        torch.testing.assert_close(new(x), reference(x), atol=1e-5, rtol=1e-5)


def _row_index(rows: torch.Tensor, row: torch.Tensor) -> int:
    return next(i for i in range(len(rows)) if torch.equal(rows[i], row))


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_a_contracted_model_exports_padded_with_the_same_logits_in_transformers(tmp_path, corpus, windows, family):
    hf_checkpoint(tmp_path / "hf", family, corpus)
    import_hf(tmp_path / "hf", tmp_path / "ours")
    model, tokenizer = load_model_dir(tmp_path / "ours")
    train, _ = windows
    small, config = contract_blocks(model, model.config, train[:4] % 300, 0.5, ["1"])
    assert config.layers[1] != config.layers[0]  # per-layer shapes
    export_hf(small, tokenizer, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = tokens(300)
    with torch.no_grad():
        assert (hf(x).logits - small(x)).abs().max() < 1e-4
    hf_config = json.loads((tmp_path / "out/config.json").read_text())
    assert hf_config["num_key_value_heads"] == 2 and hf_config["intermediate_size"] == 96  # the widest layer


# ----------------------------------------------------------------------------- tokenizer rules


def tiny_tokenizer(corpus, specials: list[str], bos: str | None) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus[:5], trainer)
    if bos is not None:  # what Llama's tokenizer.json does: BOS in front of every encoding
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer


def test_documents_start_with_bos_where_the_family_puts_it_and_end_with_eos(corpus):
    texts = ["def a():\n    pass\n", "x = 1\n"]
    # Llama 3: the tokenizer.json post-processor adds BOS; Llama 2 / Mistral: add_bos_token says so.
    llama3 = TextTokenizer(tiny_tokenizer(corpus, ["<|begin_of_text|>", "<|end_of_text|>"], "<|begin_of_text|>"),
                           {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    llama2 = TextTokenizer(tiny_tokenizer(corpus, ["<s>", "</s>"], None),
                           {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    qwen = TextTokenizer(tiny_tokenizer(corpus, ["<|endoftext|>"], None), {"bos_token": None, "eos_token": "<|endoftext|>"})
    for tokenizer, bos in ((llama3, "<|begin_of_text|>"), (llama2, "<s>"), (qwen, None)):
        plain = [tokenizer.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
        head = [tokenizer.token_to_id(bos)] if bos else []
        expected = [head + ids + [tokenizer.eos_id] for ids in plain]
        assert tokenizer.document_ids(texts) == expected
        train, _ = token_windows(tokenizer, texts * 20, 8, heldout_fraction=0.0)
        stream = sum(expected * 20, [])
        windows = [stream[i * 9:(i + 1) * 9] for i in range(len(stream) // 9)]
        assert sorted(train.tolist()) == sorted(windows)  # the windows are shuffled


def test_the_source_tokenizer_files_travel_through_import_and_export(tmp_path, corpus):
    hf_checkpoint(tmp_path / "hf", "mistral", corpus)
    tiny_tokenizer(corpus, ["<s>", "</s>"], "<s>").save(str(tmp_path / "hf/tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    (tmp_path / "hf/tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    generation = {"bos_token_id": 0, "eos_token_id": [1, 2], "temperature": 0.7, "do_sample": True}
    (tmp_path / "hf/generation_config.json").write_text(json.dumps(generation))
    import_hf(tmp_path / "hf", tmp_path / "ours")
    loaded = load_tokenizer(tmp_path / "ours/tokenizer.json")
    # The template is kept as chat_template.jinja (as transformers 5 saves it) and exported in both places.
    assert loaded.config == {k: v for k, v in tokenizer_config.items() if k != "chat_template"}
    assert loaded.chat_template == tokenizer_config["chat_template"] and loaded.bos_id == 0 and loaded.eos_id == 1
    assert (tmp_path / "ours/chat_template.jinja").read_text() == tokenizer_config["chat_template"]
    model, tokenizer = load_model_dir(tmp_path / "ours")
    export_hf(model, tokenizer, tmp_path / "out")
    assert json.loads((tmp_path / "out/tokenizer_config.json").read_text()) == tokenizer_config
    exported = json.loads((tmp_path / "out/config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (0, [1, 2])
    assert json.loads((tmp_path / "out/generation_config.json").read_text()) == generation
    assert (tmp_path / "out/chat_template.jinja").read_text() == tokenizer_config["chat_template"]


def test_a_train_job_on_a_hugging_face_folder_writes_a_loadable_export(tmp_path, corpus, monkeypatch):
    root = tmp_path / "ml"
    hf_checkpoint(root / "input/data/model", "qwen3", corpus)  # the folder as a tenant registered it
    (root / "input/data/training").mkdir(parents=True)
    (root / "input/data/training/a.txt").write_text("\n".join(corpus[:3]))
    write_hyperparameters(root, job_type="train", job_id="job-1", turns="1", cycles="1", steps_per_cycle="2",
                          seq_len="32", lr="0.003")
    monkeypatch.setenv("FUSION_ML_ROOT", str(root))
    assert entry.main() == 0
    model, tokenizer = load_model_dir(root / "model")
    assert model.config.family == "qwen3" and model.config.qk_norm and model.config.n_layers == 4
    hf = AutoModelForCausalLM.from_pretrained(root / "model/hf").eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    x = tokens(300)
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() < 1e-4
    prompt = x[0, :6].tolist()
    assert generate(model, prompt, 10) == hf_greedy(hf, prompt, 10)


def test_sampling_with_the_kv_cache_follows_temperature_top_p_and_stops_at_eos():
    model = family_model("qwen3")
    prompt = [5, 17, 3]
    greedy = generate(model, prompt, 12)
    with torch.no_grad():  # the cache gives what recomputing the whole sequence gives
        ids = list(prompt)
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy == ids[len(prompt):]
    assert generate(model, prompt, 12, temperature=1.0, top_p=1e-6, seed=4) == greedy  # only the top token left
    sampled = [generate(model, prompt, 12, temperature=1.5, seed=s) for s in range(3)]
    assert len({tuple(s) for s in sampled}) > 1 and generate(model, prompt, 12, temperature=1.5, seed=1) == sampled[1]
    stop = greedy[4]
    assert generate(model, prompt, 12, stop={stop}) == greedy[: greedy.index(stop) + 1]
