"""Conversation records: what the dataset check admits, what it refuses and why, and the figures
its answer gives (examples, tokens, the assistant's share, lengths), which a job's estimate uses."""

from __future__ import annotations

import json

import pytest

from shared.conversations import DEFAULT_CHAT_TEMPLATE, ConversationError, conversation, render, rendered_turns
from shared.datasets import check_dataset, data_warnings, examples_over


def _jsonl(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _chat(i: int) -> dict:
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": f"What is {i} times two?"},
                         {"role": "assistant", "content": f"{i} times two is {2 * i}."}]}


def test_both_shapes_are_conversations():
    assert conversation({"prompt": "Hi", "completion": "Hello."}) == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    listed = {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello."}]}
    assert conversation(listed) == conversation({"prompt": "Hi", "completion": "Hello."})
    assert conversation(_chat(1))[0]["role"] == "system"


@pytest.mark.parametrize("record, reason", [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]}, "role 'bot'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}, "empty assistant turn"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "assistant turn at position 0"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "user turn at position 1"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "system", "content": "c"}]}, "system message at position 2"),
    ({"messages": [{"role": "user", "content": "a"}]}, "ends with a user turn"),
    ({"messages": [{"role": "system", "content": "a"}]}, "no turns"),
    ({"messages": []}, 'no "messages" list'),
    ({"messages": [{"role": "user", "content": 3}]}, 'no string "content"'),
    ({"messages": [{"role": "user", "content": "a", "name": "x"}]}, "fields other than role and content: name"),
    ({"prompt": "Hi"}, 'no "completion"'),
    ({"prompt": "Hi", "completion": ""}, 'empty "completion"'),
    ({"prompt": "Hi", "completion": ["Hello"]}, "both strings or both lists"),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]}, "assistant turns only"),
])
def test_a_bad_conversation_is_refused_with_its_reason(record, reason):
    with pytest.raises(ConversationError, match=reason):
        conversation(record)
    result = check_dataset([_jsonl(_chat(0), record)], "jsonl", min_tokens=0)
    assert not result.ok and result.reason.startswith("line 2 ") and reason in result.reason


def test_the_check_counts_a_conversation_dataset():
    records = [_chat(i) for i in range(200)] + [{"prompt": "Write a long answer.", "completion": "word " * 300}]
    result = check_dataset([_jsonl(*records)], "jsonl")
    assert result.ok and result.records == 201
    chat = result.chat
    assert chat["examples"] == 201
    # "Assistant:" is the prompt's; " 5 times two is 10.<eos>\n\n" is the answer: 8 pieces of about 27.
    text, spans = rendered_turns(DEFAULT_CHAT_TEMPLATE, conversation(_chat(5)), {"eos_token": "<eos>"})
    assert [text[a:b] for a, b in spans] == [" 5 times two is 10.<eos>\n\n"]
    assert 0.25 < chat["assistant_share"] < 0.6
    assert chat["assistant_tokens"] / result.tokens == pytest.approx(chat["assistant_share"], abs=1e-4)
    assert sum(chat["lengths"].values()) == 201
    assert examples_over(chat, 256) == 1 and examples_over(chat, 1024) == 0
    assert data_warnings({"chat": chat}, 256) == [
        "1 of the 201 conversations are longer than seq_len=256 tokens and would be cut to it "
        "(counted with the default chat template; the model's own may differ by a few tokens)"]
    assert data_warnings({"chat": chat}, 1024) == [] and data_warnings({"tokens": 5}, 16) == []


def test_text_and_conversations_do_not_mix_in_one_file():
    result = check_dataset([_jsonl(_chat(0), {"text": "plain"})], "jsonl", min_tokens=0)
    assert not result.ok and result.reason.startswith("line 2 is a text record in a dataset whose first record is chat")
    result = check_dataset([_jsonl({"text": "plain", "messages": []})], "jsonl", min_tokens=0)
    assert not result.ok and 'both "text" and conversation fields' in result.reason
    text = check_dataset([_jsonl({"text": "plain words " * 1000})], "jsonl")
    assert text.ok and text.chat is None


def test_templates_render_in_a_sandbox():
    with pytest.raises(ConversationError, match="refuses it"):
        render("{{ ''.__class__.__subclasses__() }}", [{"role": "user", "content": "a"}], {})
    with pytest.raises(ConversationError, match="does not compile"):
        render("{% for %}", [{"role": "user", "content": "a"}], {})
