"""Reading datasets, tokenizing, packing windows, and the held-out split."""

from __future__ import annotations

import json

import pytest
import torch

from training_image.data import read_texts, stdlib_corpus, token_windows
from training_image.tokenizer import END_OF_TEXT, load_tokenizer, save_tokenizer, train_tokenizer


def test_read_texts_finds_jsonl_and_txt_in_nested_directories(tmp_path):
    (tmp_path / "a/b").mkdir(parents=True)
    (tmp_path / "a/b/part.jsonl").write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    (tmp_path / "z.txt").write_text("third")
    (tmp_path / "notes.md").write_text("ignored")
    assert read_texts(tmp_path) == ["first", "second", "third"]


@pytest.mark.parametrize(
    "content, message",
    [("{not json\n", "line 1 is not JSON"), ('{"body": "x"}\n', 'line 1 has no string "text" field')],
)
def test_read_texts_names_the_bad_line(tmp_path, content, message):
    (tmp_path / "data.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        read_texts(tmp_path)


def test_read_texts_refuses_an_empty_channel(tmp_path):
    with pytest.raises(ValueError, match="no text found"):
        read_texts(tmp_path)


def test_stdlib_corpus_is_deterministic_and_bounded():
    texts = stdlib_corpus(50_000)
    assert texts == stdlib_corpus(50_000)
    assert 0 < sum(map(len, texts)) <= 50_000


def test_tokenizer_training_is_deterministic_and_round_trips(corpus, tokenizer, tmp_path):
    again = train_tokenizer(corpus, 512)
    assert again.to_str() == tokenizer.to_str()
    assert tokenizer.get_vocab_size() == 512 and tokenizer.token_to_id(END_OF_TEXT) == 0
    save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    text = "def f(x):\n    return x ** 2  # ünïcode ✓"
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.decode(loaded.encode(text).ids) == text


def test_windows_are_packed_split_and_reproducible(tokenizer, corpus):
    train, heldout = token_windows(tokenizer, corpus[:20], 16, heldout_fraction=0.1, seed=3)
    assert train.dtype == torch.long and train.shape[1] == heldout.shape[1] == 17
    total = len(train) + len(heldout)
    assert len(heldout) == round(total * 0.1)
    again_train, again_heldout = token_windows(tokenizer, corpus[:20], 16, heldout_fraction=0.1, seed=3)
    assert torch.equal(train, again_train) and torch.equal(heldout, again_heldout)
    everything, none = token_windows(tokenizer, corpus[:20], 16, heldout_fraction=0.0)
    assert len(none) == 0
    assert sorted(train.tolist() + heldout.tolist()) == sorted(everything.tolist())


def test_too_little_text_for_two_windows_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="too few for two windows"):
        token_windows(tokenizer, ["tiny"], 64)
