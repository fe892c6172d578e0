"""Datasets: what a tenant uploads to train on, and the check that admits or rejects it.

A dataset is registered first (`POST /datasets` hands out an upload URL), then its object lands
at s3://DATA/<owner>/datasets/<dataset_id>/data.jsonl|data.txt and the check reads it once:
JSONL whose every record has a string "text" field, or UTF-8 text, within the size limits. The
check streams the object, so its memory does not grow with the dataset.

A JSONL dataset is text records or conversations (shared.conversations), told apart by its
records; one file holds one kind. A conversation is checked (roles, order, empty turns) and
rendered with the default chat template, and the check's answer says how many examples there
are, their tokens, the assistant tokens' share and how long the examples are (CHAT_STATS), so
that a job's estimate can say how many would be cut at its seq_len.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.conversations import CHAT, DEFAULT_CHAT_TEMPLATE, TEXT, ConversationError, conversation, record_kind, rendered_turns
from shared.settings import MAX_SEQ_LEN, NAME_PATTERN, NAME_RULE
from shared.store import Datasets, missing_object, now
from shared.tenancy import data_prefix, owner_of_key

FILE_NAMES = {"jsonl": "data.jsonl", "text": "data.txt"}
FORMAT_OF_FILE = {name: fmt for fmt, name in FILE_NAMES.items()}
DATASET_KEY = re.compile(r"^(?P<tenant>[^/]+)/datasets/(?P<dataset_id>ds-[a-z0-9]{12})/(?P<file>data\.jsonl|data\.txt)$")

# One PUT to a presigned URL carries at most 5 GiB; below MIN_TOKENS there is not even one
# training window plus a held-out split to measure perplexity on.
MAX_BYTES = 5 * 1024**3
MIN_TOKENS = 2_000
UPLOAD_URL_SECONDS = 3600
EMPTY_REASON = "the dataset is empty (0 bytes): the upload carried no content"
# One JSONL record is parsed whole: a longer line is refused before it is held in memory.
MAX_LINE_BYTES = 64 * 1024**2

# A pre-tokenizer's pieces (words, numbers, single punctuation marks): close to what a BPE
# tokenizer counts on prose and the same for every model, so a dataset has one token count.
_PIECES = re.compile(r"\w+|[^\w\s]")


class CreateDatasetRequest(BaseModel):
    """Body of `POST /datasets`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(
        pattern=NAME_PATTERN,
        description=f"A name for the dataset: {NAME_RULE}.",
        examples=["support-tickets"],
    )
    format: Literal["jsonl", "text"] = Field(
        default="jsonl",
        description='"jsonl": one JSON object per line, each with a string "text" field, or each a conversation '
        '({"messages": [...]} or {"prompt", "completion"}); "text": UTF-8 text. '
        f"The check needs at least {MIN_TOKENS:,} tokens.",
    )


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    bytes: int
    tokens: int
    records: int
    reason: str | None = None
    chat: dict[str, Any] | None = None  # a conversation dataset's statistics (chat_stats)


def new_dataset_id() -> str:
    return "ds-" + uuid.uuid4().hex[:12]


def dataset_key(owner: str, dataset_id: str, fmt: str) -> str:
    return f"{data_prefix(owner)}datasets/{dataset_id}/{FILE_NAMES[fmt]}"


def parse_dataset_key(key: str) -> tuple[str, str, str] | None:
    """(owner, dataset_id, format) of an uploaded dataset's object key; None for any other key."""
    match = DATASET_KEY.match(key)
    owner = owner_of_key(key) if match else None
    if owner is None:
        return None
    return owner, match["dataset_id"], FORMAT_OF_FILE[match["file"]]


def max_bytes() -> int:
    return int(os.environ.get("DATASET_MAX_BYTES", MAX_BYTES))


def count_tokens(text: str) -> int:
    return sum(1 for _ in _PIECES.finditer(text))


def check_dataset(chunks: Iterable[bytes], fmt: str, *, limit: int | None = None, min_tokens: int = MIN_TOKENS) -> CheckResult:
    """Read a dataset object once and say whether it can be trained on, and if not, why.

    It always ends with a verdict: whatever the bytes hold (numbers of any length, nesting of any
    depth, any encoding) they are either admitted or rejected with the first reason found."""
    limit = max_bytes() if limit is None else limit
    state: dict[str, Any] = {"bytes": 0, "tokens": 0, "records": 0}

    def counted(stream: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in stream:
            state["bytes"] += len(chunk)
            if state["bytes"] > limit:
                raise _Rejected(f"the dataset is larger than the {limit}-byte limit")
            yield chunk

    try:
        if fmt == "jsonl":
            _check_jsonl(counted(chunks), state)
        elif fmt == "text":
            _check_text(counted(chunks), state)
        else:
            raise _Rejected(f"unknown dataset format {fmt!r}")
        if state["tokens"] < min_tokens:
            raise _Rejected(f"the dataset holds {state['tokens']} tokens; training needs at least {min_tokens}")
    except _Rejected as rejected:
        reason = str(rejected) if state["bytes"] else EMPTY_REASON
        return CheckResult(False, state["bytes"], state["tokens"], state["records"], reason)
    return CheckResult(True, state["bytes"], state["tokens"], state["records"], chat=chat_stats(state))


class _Rejected(Exception):
    pass


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The file's lines, without their newline; a line longer than MAX_LINE_BYTES is rejected
    before it is held whole."""
    pending = b""
    number = 0
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            number += 1
            yield _short(line, number)
        _short(pending, number + 1)
    if pending:
        yield pending


def _short(line: bytes, number: int) -> bytes:
    if len(line) > MAX_LINE_BYTES:
        raise _Rejected(f"line {number} is longer than {MAX_LINE_BYTES} bytes")
    return line


def decoded_lines(chunks: Iterable[bytes]) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line, decoded as strict UTF-8 (no UTF-16/32, no
    encoded surrogates; a byte-order mark at the very start is allowed and dropped)."""
    for number, raw in enumerate(_lines(chunks), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _Rejected(f"line {number} is not UTF-8 (byte {error.start} of the line)") from None
        if "\x00" in text:  # valid UTF-8, but what UTF-16/32 text of ASCII looks like (JSON never holds a raw NUL)
            raise _Rejected(f"line {number} is not UTF-8: it holds NUL bytes (UTF-16 or UTF-32 text, or binary?)")
        if number == 1:
            text = text.removeprefix("\ufeff")
        if text.strip():
            yield number, text


def parse_record(number: int, text: str) -> Any:
    """A line's JSON value; any line json cannot read (malformed, an integer past Python's digit
    limit, nesting deeper than the parser's recursion) is a rejection that names the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise _Rejected(f"line {number} is not JSON: {error.msg}") from None
    except RecursionError:
        raise _Rejected(f"line {number} nests JSON too deeply to read") from None
    except ValueError as error:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise _Rejected(f"line {number} is not JSON we can read: {error}") from None


def text_record(number: int, record: Any) -> str:
    """The training text of one {"text": ...} record."""
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise _Rejected(f'line {number} has no string "text" field')
    return record["text"]


def _check_jsonl(chunks: Iterable[bytes], state: dict[str, Any]) -> None:
    """Every line decoded, parsed, then read as a record of the file's one kind (shared.conversations)."""
    kind = None
    for number, text in decoded_lines(chunks):
        record = parse_record(number, text)
        try:
            this = record_kind(record)
            if kind is not None and this != kind:
                raise ConversationError(f"is a {this} record in a dataset whose first record is {kind}: one kind a file")
            kind = this
            if kind == TEXT:
                state["tokens"] += count_tokens(text_record(number, record))
            else:
                _count_conversation(conversation(record), state)
        except ConversationError as error:
            raise _Rejected(f"line {number} {error}") from None
        state["records"] += 1
    if not state["records"]:
        raise _Rejected("the dataset has no records")


# The default template's special tokens as the check renders them: a marker, counted as one piece.
_CHECK_TOKENS = {"eos_token": "<eos>", "bos_token": "<bos>"}


def _count_conversation(messages: list[dict[str, str]], state: dict[str, Any]) -> None:
    """Render a conversation with the default chat template and count it into state["chat"]."""
    text, spans = rendered_turns(DEFAULT_CHAT_TEMPLATE, messages, _CHECK_TOKENS)
    tokens = count_tokens(text)
    stats = state.setdefault("chat", {"assistant_tokens": 0, "lengths": {}})
    stats["assistant_tokens"] += sum(count_tokens(text[start:end]) for start, end in spans)
    length = min(tokens, MAX_SEQ_LEN + 1)  # any example past the longest seq_len is cut at every one
    stats["lengths"][length] = stats["lengths"].get(length, 0) + 1
    state["tokens"] += tokens


def chat_stats(state: dict[str, Any]) -> dict[str, Any] | None:
    """What the check records about a conversation dataset (None for text): its examples, the
    assistant's tokens (those the loss is on) and their share of all tokens, and lengths,
    {example tokens: examples} (every length above MAX_SEQ_LEN counted at MAX_SEQ_LEN + 1), with
    keys as strings, as JSON keeps them."""
    counted = state.get("chat")
    if counted is None:
        return None
    return {"examples": state["records"], "assistant_tokens": counted["assistant_tokens"],
            "assistant_share": round(counted["assistant_tokens"] / max(1, state["tokens"]), 4),
            "lengths": {str(length): n for length, n in sorted(counted["lengths"].items())}}


def examples_over(chat: dict[str, Any], seq_len: int) -> int:
    """How many of a conversation dataset's examples are longer than a window of seq_len tokens."""
    return sum(int(n) for length, n in chat["lengths"].items() if int(length) > seq_len + 1)


def data_warnings(dataset: dict[str, Any] | None, seq_len: int) -> list[str]:
    """What a job's estimate says about its dataset at its seq_len: conversations that would be cut."""
    chat = (dataset or {}).get("chat")
    if not chat:
        return []
    over = examples_over(chat, seq_len)
    if not over:
        return []
    return [f"{over} of the {chat['examples']} conversations are longer than seq_len={seq_len} tokens and would be cut "
            "to it (counted with the default chat template; the model's own may differ by a few tokens)"]


def _check_text(chunks: Iterable[bytes], state: dict[str, int]) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    tail = ""  # a word cut by a chunk boundary is counted once, with the next chunk
    offset = 0
    for chunk in chunks:
        try:
            text = tail + decoder.decode(chunk)
        except UnicodeDecodeError as error:
            raise _Rejected(f"the text is not UTF-8 (byte {offset + error.start})") from None
        offset += len(chunk)
        if "\x00" in text:
            raise _Rejected("the text holds NUL bytes: is it a binary file?")
        last_space = _LAST_SPACE.search(text)
        boundary = last_space.end() if last_space else (len(text) if len(text) > 1 << 20 else 0)
        state["tokens"] += count_tokens(text[:boundary])
        tail = text[boundary:]
    try:
        tail += decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise _Rejected("the text ends inside a UTF-8 character") from None
    state["tokens"] += count_tokens(tail)
    state["records"] = 1 if state["tokens"] else 0


_LAST_SPACE = re.compile(r"\s(?=\S*$)")


def register(datasets: Datasets, owner: str, request: CreateDatasetRequest, bucket: str) -> dict[str, Any]:
    """Record a new dataset, pending until its object lands and is checked."""
    dataset_id = new_dataset_id()
    dataset = {"dataset_id": dataset_id, "owner": owner, "name": request.name, "status": "pending",
               "s3_uri": f"s3://{bucket}/{dataset_key(owner, dataset_id, request.format)}", "created_at": now()}
    datasets.register(dataset)
    return dataset


def dataset_replaced(s3: Any, job: dict[str, Any]) -> str | None:
    """Why the job's dataset is no longer the object its check admitted, or None when it still is
    (or the job trains on an S3 URI, which no check pinned). A job never trains on bytes nobody
    checked: the launcher refuses it instead."""
    from botocore.exceptions import ClientError

    from shared.outputs import split_s3

    for field in ("dataset", "validation_dataset"):  # the training data, and the validation set if any
        pin = job.get(f"{field}_pin")
        if not pin:
            continue
        bucket, key = split_s3(job[f"{field}_uri"])
        try:
            head = s3.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if missing_object(exc):
                return f"dataset {job[field]!r} was deleted after its check"
            raise
        if head.get("ETag") != pin["etag"] or (pin.get("version_id") and head.get("VersionId") != pin["version_id"]):
            return (f"dataset {job[field]!r} was replaced after its check (a second upload); a job trains only "
                    "on the data that was checked: register the dataset again and upload it once")
    return None
