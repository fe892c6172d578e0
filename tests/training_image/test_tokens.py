"""Token shards: streamed tokenizing in tasks, shared between processes, the fixed held-out split,
memory-mapped windows, and the reasons a dataset is refused."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from training_image import tokens
from training_image.data import read_texts
from training_image.tokenizer import end_of_text_id

SEQ_LEN = 16


@pytest.fixture
def small_tasks(monkeypatch):
    """Tasks and tokenizer batches of a few KB, so that a small dataset crosses their edges."""
    monkeypatch.setattr(tokens, "TASK_BYTES", 4096)
    monkeypatch.setattr(tokens, "BATCH_CHARS", 1000)


@pytest.fixture
def dataset(tmp_path, corpus):
    root = tmp_path / "training"
    (root / "nested").mkdir(parents=True)
    text = "".join(corpus)
    lines = [json.dumps({"text": text[i : i + 700]}) for i in range(0, 40 * 700, 700)]
    lines.insert(5, "")  # blank lines are skipped
    lines.insert(9, json.dumps({"text": ""}))  # so are empty documents
    (root / "nested/part-0.jsonl").write_text("\n".join(lines) + "\n")
    (root / "small.txt").write_text(text[-900:])
    return root


def _stream(tokenizer, texts) -> list[int]:
    eot = end_of_text_id(tokenizer)
    return [i for encoding in tokenizer.encode_batch(texts) for i in encoding.ids + [eot]]


def test_the_shards_hold_the_documents_tokens_each_followed_by_end_of_text(small_tasks, tokenizer, dataset, tmp_path):
    data = tokens.prepare(tokenizer, dataset, tmp_path / "tokens", SEQ_LEN)
    assert len(list((tmp_path / "tokens").glob("shard-*.bin"))) > 3  # the jsonl file spans several tasks
    assert data.read(0, data.tokens).tolist() == _stream(tokenizer, read_texts(dataset))
    assert data._shards[0].dtype == np.uint16 and data.count == data.tokens // (SEQ_LEN + 1)


def test_processes_sharing_the_work_make_the_same_shards_as_one(small_tasks, tokenizer, dataset, tmp_path):
    one = tokens.prepare(tokenizer, dataset, tmp_path / "one", SEQ_LEN)
    barrier = threading.Barrier(2, timeout=60)
    errors = []

    def share(index: int) -> None:
        try:
            tokens.prepare(tokenizer, dataset, tmp_path / "two", SEQ_LEN, share=(index, 2), wait=barrier.wait)
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=share, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    two = tokens.TokenData(tmp_path / "two")
    assert two.read(0, two.tokens).tolist() == one.read(0, one.tokens).tolist()
    assert two.heldout.tolist() == one.heldout.tolist()


def test_the_heldout_split_is_fixed_in_the_manifest_and_disjoint_from_training(tokenizer, dataset, tmp_path):
    data = tokens.prepare(tokenizer, dataset, tmp_path / "tokens", SEQ_LEN)
    train, heldout = data.train_windows(), data.heldout_windows()
    assert len(heldout) == round(data.count * tokens.HELDOUT_FRACTION) and len(train) + len(heldout) == data.count
    everything = data.windows(range(data.count))
    assert torch.equal(heldout, everything[data.heldout])
    kept = np.setdiff1d(np.arange(data.count), data.heldout)
    assert torch.equal(train[:], everything[kept])
    assert torch.equal(train[torch.tensor([len(train) - 1, 0])], everything[kept[[-1, 0]]])
    with pytest.raises(IndexError):
        train[torch.tensor([len(train)])]
    assert torch.equal(train.sample(5, seed=1), train.sample(5, seed=1)) and len(train.sample(10**6)) == len(train)
    again = tokens.TokenData(tmp_path / "tokens")  # another rank, or a restart
    assert again.heldout.tolist() == data.heldout.tolist()


def test_heldout_is_capped_and_never_everything():
    window = SEQ_LEN + 1
    assert len(tokens.heldout_ids(10**9, window, 0)) == tokens.HELDOUT_MAX_TOKENS // window
    assert len(tokens.heldout_ids(2, window, 0)) == 1
    assert tokens.heldout_ids(10**6, window, 3) == tokens.heldout_ids(10**6, window, 3)


def test_a_prepared_folder_is_reused_until_the_data_changes(tokenizer, dataset, tmp_path, monkeypatch):
    tokens.prepare(tokenizer, dataset, tmp_path / "tokens", SEQ_LEN)
    calls = []
    tokenize = tokens.tokenize_task
    monkeypatch.setattr(tokens, "tokenize_task", lambda *args: (calls.append(args[1]), tokenize(*args))[1])
    tokens.prepare(tokenizer, dataset, tmp_path / "tokens", SEQ_LEN)
    assert calls == []
    (dataset / "more.txt").write_text("def more():\n    return 1\n" * 20)
    data = tokens.prepare(tokenizer, dataset, tmp_path / "tokens", SEQ_LEN)
    assert calls and data.read(0, data.tokens).tolist() == _stream(tokenizer, read_texts(dataset))
    calls.clear()
    tokens.prepare(tokenizer, dataset, tmp_path / "tokens", SEQ_LEN + 1)  # other windows: another split
    assert calls


def test_a_bad_line_in_a_later_task_is_named_by_its_line_number(small_tasks, tokenizer, tmp_path):
    lines = [json.dumps({"text": f"line {i} " * 20}) for i in range(200)]
    lines[150] = '{"body": "x"}'
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match='data.jsonl line 151 has no string "text" field'):
        tokens.prepare(tokenizer, tmp_path / "data.jsonl", tmp_path / "tokens", SEQ_LEN)


@pytest.mark.parametrize(
    "content, message",
    [("", "no text found under"), (json.dumps({"text": "tiny"}) + "\n", "too few for two windows")],
)
def test_too_little_text_is_refused_with_its_reason(tokenizer, tmp_path, content, message):
    (tmp_path / "data").mkdir()
    (tmp_path / "data/part.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        tokens.prepare(tokenizer, tmp_path / "data", tmp_path / "tokens", SEQ_LEN)


def test_the_shards_put_bos_and_eos_where_the_family_does(small_tasks, dataset, tmp_path, corpus):
    from tests.training_image.test_families import tiny_tokenizer
    from training_image.tokenizer import TextTokenizer

    # Llama 3: tokenizer.json's post-processor puts BOS in front; one per document, also for a
    # text file read in several pieces, and never in front of a piece inside a document.
    llama3 = TextTokenizer(tiny_tokenizer(corpus, ["<|begin_of_text|>", "<|end_of_text|>"], "<|begin_of_text|>"),
                           {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    (dataset / "small.txt").write_text("".join(corpus)[:3000])  # three tokenizer batches of 1000
    data = tokens.prepare(llama3, dataset, tmp_path / "tokens", SEQ_LEN)
    expected = [i for ids in llama3.document_ids(read_texts(dataset)) for i in ids]
    assert data.read(0, data.tokens).tolist() == expected
    assert expected.count(llama3.bos_id) == expected.count(llama3.eos_id) == len(read_texts(dataset))
