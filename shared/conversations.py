"""Conversations: chat records as users bring them, checked, and rendered with a chat template.

Two record shapes, one JSON object a line (docs/data.md):

- `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`: an
  optional system message first, then user and assistant turns alternating, starting with a
  user turn and ending with an assistant turn; no turn empty.
- `{"prompt": ..., "completion": ...}`: two strings (a user turn and the assistant's answer),
  or two lists of messages (the completion only assistant turns).

A conversation is rendered to text by a chat template: the Jinja template a Hugging Face model
ships (`chat_template` in tokenizer_config.json, or chat_template.jinja beside it), rendered in
Jinja's immutable sandbox with the globals transformers gives it (`raise_exception`,
`strftime_now`, a `tojson` that does not escape HTML), or DEFAULT_CHAT_TEMPLATE for a model
that has none. The loss is on the assistant's text: each assistant turn is the part of the
rendering that turn adds after the prompt that asks for it (the conversation up to it rendered
with `add_generation_prompt`), so the end-of-turn marker the template writes after an answer is
trained too, and the header that announces the answer is not. A template that renders earlier
turns differently once later ones follow cannot be split so, and is refused with that reason.

jinja2 is imported when a template is first compiled, so the module costs nothing to import.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

ROLES = ("system", "user", "assistant")
TEXT, CHAT = "text", "chat"

# For a model whose tokenizer brings no chat template: a role header before each turn, the
# model's end-of-text token after each answer (so generation stops there), a blank line between
# turns. `eos_token` is the tokenizer's own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ConversationError(ValueError):
    """A record that is no conversation we can train on, or a template that cannot render it."""


Message = dict[str, str]


def record_kind(record: Any) -> str:
    """TEXT for a {"text"} record, CHAT for a conversation; ConversationError for anything else."""
    if not isinstance(record, dict):
        raise ConversationError('has no string "text" field')
    has_text = "text" in record
    has_chat = "messages" in record or "prompt" in record or "completion" in record
    if has_text and has_chat:
        raise ConversationError('has both "text" and conversation fields: give one or the other')
    if has_chat:
        return CHAT
    if isinstance(record.get("text"), str):
        return TEXT
    raise ConversationError('has no string "text" field')  # nor a conversation's fields (docs/data.md)


def conversation(record: Any) -> list[Message]:
    """The checked messages of a chat record (see the module's doc for the rules)."""
    if not isinstance(record, dict):
        raise ConversationError("is not a JSON object")
    if "messages" in record:
        if "prompt" in record or "completion" in record:
            raise ConversationError('has "messages" and "prompt"/"completion": give one shape')
        messages = _messages(record["messages"], "messages")
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            for message, name in zip(messages, ("prompt", "completion")):
                if not message["content"].strip():
                    raise ConversationError(f'has an empty "{name}"')
        elif isinstance(prompt, list) and isinstance(completion, list):
            head, tail = _messages(prompt, "prompt"), _messages(completion, "completion")
            if not tail or any(m["role"] != "assistant" for m in tail):
                raise ConversationError('has a "completion" that is not assistant turns only')
            messages = head + tail
        else:
            raise ConversationError('needs "prompt" and "completion" both strings or both lists of messages')
    else:
        missing = "completion" if "prompt" in record else "prompt"
        raise ConversationError(f'has no "{missing}"')
    _check_order(messages)
    return messages


def _messages(value: Any, field: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise ConversationError(f'has no "{field}" list of messages')
    out = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise ConversationError(f"{where} is not an object")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise ConversationError(f"{where} has fields other than role and content: {', '.join(extra)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ConversationError(f"{where} has role {role!r}: expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ConversationError(f'{where} has no string "content"')
        if not content.strip():
            raise ConversationError(f"{where} is an empty {role} turn")
        out.append({"role": role, "content": content})
    return out


def _check_order(messages: list[Message]) -> None:
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        raise ConversationError("has a system message and no turns")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            position = i + len(messages) - len(turns)
            if message["role"] == "system":
                raise ConversationError(f"has a system message at position {position}: only the first may be one")
            raise ConversationError(
                f"has a {message['role']} turn at position {position} where a {expected} turn belongs "
                "(user and assistant alternate, starting with user)"
            )
    if turns[-1]["role"] != "assistant":
        raise ConversationError("ends with a user turn: the last turn must be the assistant's")


# ---- rendering ----------------------------------------------------------------------------


@lru_cache(maxsize=8)
def compile_template(source: str):
    """The compiled template, in the environment transformers renders chat templates in."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %}, which marks assistant text for transformers'
        return_assistant_tokens_mask: rendered as its body (the turns are found as for any template)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    try:
        return environment.from_string(source)
    except jinja2.exceptions.TemplateError as error:
        raise ConversationError(f"the chat template does not compile: {error}") from None


def render(template: str, messages: list[Message], special_tokens: dict[str, str | None], *,
           add_generation_prompt: bool = False) -> str:
    """The conversation as text, as transformers' apply_chat_template(tokenize=False) renders it."""
    import jinja2

    try:
        return compile_template(template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
            **{name: value for name, value in special_tokens.items() if value is not None},
        )
    except jinja2.exceptions.TemplateError as error:
        raise ConversationError(f"the chat template refuses it: {error}") from None
    except (TypeError, ValueError, LookupError, AttributeError) as error:
        raise ConversationError(f"the chat template fails on it: {type(error).__name__}: {error}") from None


def rendered_turns(template: str, messages: list[Message], special_tokens: dict[str, str | None]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the [start, end) character spans of its assistant turns)."""
    text = render(template, messages, special_tokens)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(template, messages[:i], special_tokens, add_generation_prompt=True)
        upto = render(template, messages[: i + 1], special_tokens)
        if not (upto.startswith(prompt) and text.startswith(upto)) or len(upto) == len(prompt):
            raise ConversationError(
                f"the chat template renders turn {i} differently once later turns follow "
                "(or renders no text for it): its assistant turns cannot be told apart"
            )
        spans.append((len(prompt), len(upto)))
    return text, spans


def assistant_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token (its [start, end) characters in the rendering): whether it starts inside an
    assistant turn's span. Spans are sorted and disjoint."""
    out, i = [], 0
    for start, end in offsets:
        while i < len(spans) and spans[i][1] <= start:
            i += 1
        out.append(i < len(spans) and spans[i][0] <= start < spans[i][1] and end > start)
    return out
