"""Token shards: a dataset tokenized once into compact arrays on disk, read memory-mapped.

A Python list of token ids costs about 168 bytes a token; the dataset cap (5 GiB of text, about
1.6e9 tokens) would need some 270 GB of RAM in every rank. Here the text is streamed through the
tokenizer a batch at a time (memory bounded whatever the dataset size) into shards of uint16
tokens (uint32 for vocabularies over 65,536), 2 or 4 bytes a token, and training reads windows
out of memory-mapped shards: a rank holds in memory only the pages of the windows it reads.

Work is split into tasks of about TASK_BYTES of one file (cut at line ends), so the ranks of a
host tokenize in parallel, each its share of the tasks (the tokenizer parallelises each batch
over the cores as well). Every host tokenizes its own copy of the channel into its own
/opt/ml/tokens. JSONL lines are documents; a .txt file is one document, read in pieces cut at
line ends (tokens at a cut can differ from tokenizing the file whole). Each document is followed
by the end-of-text token, as in data.token_windows.

The held-out split is fixed when tokenizing: manifest.json, written last (a tokenizing killed
half-way is done again), lists the held-out windows, a seeded sample of them; every rank and
every restart reads the same list. The manifest also records what the shards were made from, so
a changed dataset, tokenizer or window length is tokenized afresh.

A conversation dataset (JSONL of conversations, shared.conversations) is rendered with the
model's chat template and packed whole into windows (pack(): best fit over a few open windows,
each conversation into the open window it fills most; what no conversation fills is padding, no
loss, a document of its own), and one longer than a window is cut to it (counted in the
manifest's "chat" figures).
Beside each shard a flags file holds a byte a token (data.NOT_TARGET, data.DOCUMENT_START), and
every task's shard is a whole number of windows, so windows line up with the packing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer

from shared.conversations import CHAT, TEXT, ConversationError, conversation, record_kind
from training_image.data import (
    DOCUMENT_START,
    FLAG_SHIFT,
    HELDOUT_MAX_TOKENS,
    NOT_TARGET,
    dataset_files,
    jsonl_text,
    no_text_error,
)
from training_image.tokenizer import as_text_tokenizer

FORMAT = 3
MANIFEST = "manifest.json"
TASK_BYTES = 16 << 20  # text per task: enough tasks for every rank of a host, shards of a few MB
BATCH_CHARS = 1 << 20  # text per tokenizer call: what bounds memory while tokenizing
HELDOUT_FRACTION = 0.05
OPEN_WINDOWS = 16  # windows pack() keeps open: best fit over more saved nothing on conversations


@dataclass(frozen=True)
class Task:
    number: int
    file: Path
    start: int  # the task owns the lines that begin in [start, end)
    end: int
    ends_document: bool  # a .txt file's last piece: its document ends here


def tasks(files: list[Path]) -> list[Task]:
    out: list[Task] = []
    for file in files:
        size = file.stat().st_size
        cuts = list(range(0, size, TASK_BYTES)) or [0]
        for i, start in enumerate(cuts):
            end = cuts[i + 1] if i + 1 < len(cuts) else size
            out.append(Task(len(out), file, start, end, ends_document=i + 1 == len(cuts)))
    return out


def _lines(task: Task) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of every line that begins in [task.start, task.end)."""
    with open(task.file, "rb") as file:
        position = task.start
        if position > 0:
            file.seek(position - 1)
            position += len(file.readline()) - 1  # the rest of a line begun in the task before
        while position < task.end:
            line = file.readline()
            if not line:
                return
            yield position, line
            position += len(line)


def _documents(task: Task) -> Iterator[tuple[str, bool, bool]]:
    """(text, whether a document starts with it, whether one ends after it) in the task's lines:
    a JSONL line is a document; a text file is one, in pieces."""
    if task.file.suffix == ".jsonl":
        for offset, line in _lines(task):
            if line.strip():
                number = lambda offset=offset: _line_number(task.file, offset)  # noqa: E731 (only for errors)
                text = jsonl_text(task.file, number, line.decode("utf-8", errors="replace"))
                if text:
                    yield text, True, True
        return
    piece: list[bytes] = []
    size = 0
    first = task.start == 0
    for _, line in _lines(task):
        piece.append(line)
        size += len(line)
        if size >= BATCH_CHARS:
            yield b"".join(piece).decode("utf-8", errors="replace"), first, False
            piece, size, first = [], 0, False
    if piece:
        yield b"".join(piece).decode("utf-8", errors="replace"), first, False
        first = False
    if task.ends_document and task.file.stat().st_size:
        yield "", first, True


def _line_number(file: Path, offset: int) -> int:
    with open(file, "rb") as lines:
        return lines.read(offset).count(b"\n") + 1


def token_dtype(tokenizer: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32)


def tokenize_task(tokenizer: Tokenizer, task: Task, path: Path) -> int:
    """Tokenize one task into the shard at path, a batch of text at a time; the tokens written."""
    text_tokenizer, dtype = as_text_tokenizer(tokenizer), token_dtype(tokenizer)
    written = 0
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as out:

        def flush(batch: list[tuple[str, bool, bool]]) -> None:
            nonlocal written
            texts, starts, ends = (list(column) for column in zip(*batch))
            ids = [i for piece in text_tokenizer.piece_ids(texts, starts, ends) for i in piece]
            np.asarray(ids, dtype=dtype).tofile(out)
            written += len(ids)

        batch: list[tuple[str, bool, bool]] = []
        chars = 0
        for text, starts, ends in _documents(task):
            batch.append((text, starts, ends))
            chars += len(text)
            if chars >= BATCH_CHARS:
                flush(batch)
                batch, chars = [], 0
        if batch:
            flush(batch)
    os.replace(partial, path)
    return written


def _shard(folder: Path, number: int) -> Path:
    return folder / f"shard-{number:06d}.bin"


def _flags(folder: Path, number: int) -> Path:
    return folder / f"flags-{number:06d}.bin"


def _chat_figures(folder: Path, number: int) -> Path:
    return folder / f"chat-{number:06d}.json"


def dataset_kind(files: list[Path]) -> str:
    """TEXT, or CHAT when the dataset's JSONL records are conversations (its first record says,
    in every file; a dataset is one kind)."""
    kinds = set()
    for file in files:
        if file.suffix != ".jsonl":
            kinds.add(TEXT)
            continue
        with open(file, "rb") as lines:
            first = next((line for line in lines if line.strip()), None)
        if first is None:
            continue
        try:
            kinds.add(record_kind(json.loads(first)))
        except (json.JSONDecodeError, UnicodeDecodeError, ConversationError):
            kinds.add(TEXT)  # the text reader words what is wrong with it
    if len(kinds) > 1:
        raise ValueError("the dataset mixes conversations with text: train on one kind at a time")
    return kinds.pop() if kinds else TEXT


def pack(items: Iterable[tuple[list[int], list[int]]], window: int, pad: int,
         open_windows: int = OPEN_WINDOWS) -> Iterator[tuple[list[int], list[int], int]]:
    """Whole conversations into windows of `window` tokens: (token ids, flags, padding) a window.

    `items` are a conversation's token ids and flags (at most a window; the first flagged
    DOCUMENT_START). Best fit: each goes into the open window with the least room that holds it,
    else opens one; when more than `open_windows` are open, the fullest is closed. A closed
    window's rest is padding, flagged NOT_TARGET and DOCUMENT_START so that nothing attends to it.
    Against next fit (a conversation that does not fit starts the next window) it halves the
    padding of short conversations in long windows; the order is deterministic."""
    rows: list[tuple[list[int], list[int]]] = []

    def close(row: tuple[list[int], list[int]]) -> tuple[list[int], list[int], int]:
        ids, flags = row
        missing = window - len(ids)
        if missing:
            ids.extend([pad] * missing)
            flags.extend([NOT_TARGET | DOCUMENT_START] + [NOT_TARGET] * (missing - 1))
        return ids, flags, missing

    for ids, flags in items:
        if len(ids) > window:
            raise ValueError(f"a conversation of {len(ids)} tokens is longer than the window ({window})")
        fits = [row for row in rows if window - len(row[0]) >= len(ids)]
        if fits:
            row = min(fits, key=lambda r: window - len(r[0]))
        else:
            row = ([], [])
            rows.append(row)
        row[0].extend(ids)
        row[1].extend(flags)
        if len(row[0]) == window or len(rows) > open_windows:
            full = row if len(row[0]) == window else max(rows, key=lambda r: len(r[0]))
            rows.remove(full)
            yield close(full)
    for row in rows:
        yield close(row)


def tokenize_chat_task(tokenizer: Tokenizer, task: Task, folder: Path, window: int) -> int:
    """Render and tokenize one task's conversations, packed whole into windows (pack()), into
    its shard and flags file, and its figures beside them; the tokens written."""
    text_tokenizer, dtype = as_text_tokenizer(tokenizer), token_dtype(tokenizer)
    pad = text_tokenizer.special_id("pad_token")
    pad = text_tokenizer.eos_id if pad is None else pad
    ids: list[int] = []
    flags: list[int] = []
    figures = {"examples": 0, "examples_cut": 0, "tokens": 0, "assistant_tokens": 0, "padding_tokens": 0}

    def conversations() -> Iterator[tuple[list[int], list[int]]]:
        for offset, line in _lines(task):
            if not line.strip():
                continue
            try:
                messages = conversation(json.loads(line))
                tokens, assistant = text_tokenizer.conversation_ids(messages)
            except (json.JSONDecodeError, UnicodeDecodeError, ConversationError) as error:
                raise ValueError(f"{task.file.name} line {_line_number(task.file, offset)} {_worded(error)}") from None
            if len(tokens) > window:
                tokens, assistant = tokens[:window], assistant[:window]
                figures["examples_cut"] += 1
            figures["examples"] += 1
            figures["tokens"] += len(tokens)
            figures["assistant_tokens"] += sum(assistant)
            yield tokens, [(0 if mine else NOT_TARGET) | (DOCUMENT_START if i == 0 else 0) for i, mine in enumerate(assistant)]

    for row_ids, row_flags, padding in pack(conversations(), window, pad):
        ids.extend(row_ids)
        flags.extend(row_flags)
        figures["padding_tokens"] += padding
    for target, values, kind in ((_shard(folder, task.number), ids, dtype), (_flags(folder, task.number), flags, np.uint8)):
        partial = target.with_name(target.name + ".partial")
        np.asarray(values, dtype=kind).tofile(partial)
        os.replace(partial, target)
    _chat_figures(folder, task.number).write_text(json.dumps(figures))
    return len(ids)


def _worded(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"is not JSON: {error.msg}"
    if isinstance(error, UnicodeDecodeError):
        return "is not UTF-8"
    return str(error)


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    """What a tokenizer does to a dataset: tokenizer.json, how the family places BOS/EOS
    (tokenizer_config.json) and the chat template. Tokenizers with one digest make one dataset's
    windows alike."""
    text = as_text_tokenizer(tokenizer)
    return hashlib.sha256(
        (tokenizer.to_str() + json.dumps(text.config, sort_keys=True) + (text.chat_template or "")).encode()
    ).hexdigest()


def _source_key(tokenizer: Tokenizer, files: list[Path], window: int, seed: int, hold_out: bool = True) -> dict:
    """What the shards and split are made from: a manifest with another key is out of date."""
    return {
        "format": FORMAT,
        "tokenizer": tokenizer_digest(tokenizer),
        "files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "window": window,
        "seed": seed,
        "heldout_fraction": HELDOUT_FRACTION if hold_out else 0,
    }


def heldout_ids(count: int, window: int, seed: int) -> list[int]:
    """The held-out windows of `count`: a seeded sample of HELDOUT_FRACTION of them, at least one
    and at most HELDOUT_MAX_TOKENS worth (beyond one window), never all."""
    heldout = max(1, round(count * HELDOUT_FRACTION))
    heldout = min(heldout, count - 1, max(1, HELDOUT_MAX_TOKENS // window))
    # Generator.choice draws a small sample of a large range without a permutation of the range.
    return sorted(np.random.default_rng(seed).choice(count, size=heldout, replace=False).tolist())


def prepare(
    tokenizer: Tokenizer,
    source: str | Path,
    folder: str | Path,
    seq_len: int,
    *,
    seed: int = 0,
    share: tuple[int, int] = (0, 1),
    wait: Callable[[], None] = lambda: None,
    hold_out: bool = True,
) -> "TokenData":
    """Tokenize the dataset at source into folder (unless it holds it already) and open it.

    share = (this process's index, processes) among those preparing the same folder (the ranks
    of one host); all of them call prepare, and wait() returns once all have reached it.
    hold_out=False holds no window out (a job with a validation set trains on all of its data,
    and the validation set is all held out).
    """
    folder, window = Path(folder), seq_len + 1
    files = dataset_files(source)
    key = _source_key(tokenizer, files, window, seed, hold_out)
    index, processes = share
    if _manifest(folder) is None or _manifest(folder)["key"] != key:
        wait()  # nobody reads the folder any more
        if index == 0:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        wait()
        work = tasks(files)
        kind = dataset_kind(files)
        for task in work[index::processes]:
            if kind == CHAT:
                tokenize_chat_task(tokenizer, task, folder, window)
            else:
                tokenize_task(tokenizer, task, _shard(folder, task.number))
        wait()
        if index == 0:
            shards = [int(_shard(folder, t.number).stat().st_size // token_dtype(tokenizer).itemsize) for t in work]
            total = sum(shards)
            if total == 0:
                raise no_text_error(source)
            count = total // window
            if count < (2 if hold_out else 1):
                raise ValueError(
                    f"the data holds {total} tokens: too few for two windows of seq_len+1={window} tokens "
                    "(one to train on, one held out); add data or lower seq_len"
                )
            manifest = {
                "key": key,
                "dtype": token_dtype(tokenizer).name,
                "shards": shards,
                "heldout": heldout_ids(count, window, seed) if hold_out else [],
                "kind": kind,
            }
            if kind == CHAT:
                figures = [json.loads(_chat_figures(folder, t.number).read_text()) for t in work]
                manifest["chat"] = {name: sum(f[name] for f in figures) for name in figures[0]}
            partial = folder / (MANIFEST + ".partial")
            partial.write_text(json.dumps(manifest))
            os.replace(partial, folder / MANIFEST)
        wait()
    return TokenData(folder)


def _manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class TokenData:
    """A prepared folder: the token stream over its shards, memory-mapped, and its split."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest = _manifest(self.folder)
        if manifest is None:
            raise FileNotFoundError(f"{self.folder} holds no {MANIFEST}: not a prepared token folder")
        self.window = manifest["key"]["window"]
        dtype = np.dtype(manifest["dtype"])
        self._shards = [
            np.memmap(_shard(self.folder, i), dtype=dtype, mode="r") if n else np.zeros(0, dtype)
            for i, n in enumerate(manifest["shards"])
        ]
        self.kind = manifest.get("kind", TEXT)
        self.chat: dict | None = manifest.get("chat")  # a conversation dataset's figures (tokenize_chat_task)
        self._flags = [
            np.memmap(_flags(self.folder, i), dtype=np.uint8, mode="r") if n else np.zeros(0, np.uint8)
            for i, n in enumerate(manifest["shards"])
        ] if self.kind == CHAT else None
        self._starts = np.concatenate(([0], np.cumsum(manifest["shards"], dtype=np.int64)))
        self.tokens = int(self._starts[-1])
        self.count = self.tokens // self.window
        self.heldout = np.asarray(manifest["heldout"], dtype=np.int64)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream (a copy)."""
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < length:
            offset = start + done - int(self._starts[shard])
            piece = self._shards[shard][offset : offset + length - done]
            out[done : done + len(piece)] = piece
            if self._flags is not None:
                out[done : done + len(piece)] |= self._flags[shard][offset : offset + len(piece)].astype(np.int64) << FLAG_SHIFT
            done += len(piece)
            shard += 1
        return out

    def windows(self, ids) -> torch.Tensor:
        """(len(ids), window) int64 tokens of the windows with these ids."""
        rows = np.empty((len(ids), self.window), dtype=np.int64)
        for row, window_id in enumerate(ids):
            rows[row] = self.read(int(window_id) * self.window, self.window)
        return torch.from_numpy(rows)

    def train_windows(self) -> "TrainWindows":
        return TrainWindows(self)

    def heldout_windows(self) -> torch.Tensor:
        return self.windows(self.heldout)

    def sample_windows(self, max_tokens: int = HELDOUT_MAX_TOKENS, seed: int = 0) -> torch.Tensor:
        """All windows, or a seeded sample of them of about max_tokens (at least one window):
        a validation set's held-out windows."""
        n = min(self.count, max(1, max_tokens // self.window))
        return self.windows(np.sort(np.random.default_rng(seed).choice(self.count, size=n, replace=False)))


class TrainWindows:
    """The windows that are not held out, indexed 0..len-1 as a (len, window) tensor would be:
    windows[indices] for a tensor of indices, windows[a:b] for a range."""

    def __init__(self, data: TokenData):
        self.data = data
        self.shape = (data.count - len(data.heldout), data.window)
        # Train index i is window i + (held-out windows at or before it): with h the sorted
        # held-out ids, that count is searchsorted(h - arange(len(h)), i, "right").
        self._skips = data.heldout - np.arange(len(data.heldout))

    def __len__(self) -> int:
        return self.shape[0]

    def window_ids(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"window index out of range 0..{len(self) - 1}")
        return indices + np.searchsorted(self._skips, indices, side="right")

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            indices = np.arange(len(self))[key]
        elif isinstance(key, torch.Tensor):
            indices = key.numpy()
        else:
            indices = np.asarray(key)
        return self.data.windows(self.window_ids(indices.reshape(-1)))

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """n windows drawn at random (seeded), all of them when there are fewer."""
        n = min(n, len(self))
        return self[np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))]
