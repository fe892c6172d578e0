"""Training text in, packed token windows out.

Datasets are JSONL files whose lines carry a "text" field, or plain .txt files, anywhere under
a channel directory. Documents are tokenized (BOS first where the family has one, its EOS after
each), joined and cut into windows of seq_len + 1 tokens (inputs are the first seq_len, targets
the last seq_len); a seeded share of the windows is held out for perplexity.

Conversations (shared.conversations) are rendered with the model's chat template and packed
whole into windows; each token of such a window carries two flags above its id (bits 32 and 33
of the int64): NOT_TARGET (no loss on predicting it: it is not the assistant's) and
DOCUMENT_START (a conversation begins there: nothing before it is attended to). Plain text has
no flags: every target counts and a window is one stream. split_windows takes them apart.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer

from training_image.model import IGNORE_INDEX
from training_image.tokenizer import document_ids

TEXT_SUFFIXES = (".jsonl", ".txt")
# Enough held-out tokens for a perplexity good to about a percent, few enough that evaluating
# at every cycle's end stays a small share of the run.
HELDOUT_MAX_TOKENS = 65_536


FLAG_SHIFT = 32
TOKEN_MASK = (1 << FLAG_SHIFT) - 1
NOT_TARGET, DOCUMENT_START = 1, 2  # the flags, as stored (uint8) and shifted by FLAG_SHIFT in a window


def split_windows(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs (B, T), targets (B, T), starts (B, T) bool or None) of windows (B, T + 1): inputs
    the first T tokens, targets the last T with IGNORE_INDEX where no loss is taken, starts where
    a packed conversation begins among the inputs (None for plain text, which has no flags)."""
    flags = windows >> FLAG_SHIFT
    if not bool(flags.any()):
        return windows[:, :-1], windows[:, 1:], None
    tokens = windows & TOKEN_MASK
    targets = tokens[:, 1:].masked_fill((flags[:, 1:] & NOT_TARGET).bool(), IGNORE_INDEX)
    return tokens[:, :-1], targets, (flags[:, :-1] & DOCUMENT_START).bool()


def dataset_files(path: str | Path) -> list[Path]:
    """The dataset files under `path`: the file itself, or a directory's, searched recursively, in sorted order."""
    root = Path(path)
    if root.is_file():
        return [root]
    if root.is_dir():
        return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    raise FileNotFoundError(f"no training data at {root}")


def no_text_error(path: str | Path) -> ValueError:
    return ValueError(f"no text found under {path}: expected .jsonl lines with a \"text\" field or .txt files")


def read_texts(path: str | Path) -> list[str]:
    """Every document under `path` (a file or a directory searched recursively, in sorted order)."""
    root = Path(path)
    texts: list[str] = []
    for file in dataset_files(root):
        if file.suffix == ".jsonl":
            texts.extend(_jsonl_texts(file))
        else:
            texts.append(file.read_text(encoding="utf-8", errors="replace"))
    texts = [t for t in texts if t]
    if not texts:
        raise no_text_error(root)
    return texts


def _jsonl_texts(file: Path) -> list[str]:
    texts = []
    with file.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                texts.append(jsonl_text(file, number, line))
    return texts


def jsonl_text(file: Path, number: int | Callable[[], int], line: str | bytes) -> str:
    """The "text" of a JSONL line; number is its line number (or what computes it, for errors)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{file.name} line {_number(number)} is not JSON: {error.msg}") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{file.name} line {_number(number)} has no string \"text\" field")
    return record["text"]


def _number(number: int | Callable[[], int]) -> int:
    return number if isinstance(number, int) else number()


def stdlib_corpus(max_bytes: int) -> list[str]:
    """Python standard library sources, in sorted path order, up to about max_bytes of text.

    Text that is on every machine that runs the trainer: tests, benchmarks and fresh base
    tokenizers use it so nothing is downloaded.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for file in sorted(root.rglob("*.py")):
        relative = file.relative_to(root).parts
        if relative[0] in ("site-packages", "dist-packages") or "test" in relative or "tests" in relative:
            continue
        text = file.read_text(encoding="utf-8", errors="replace")
        if not text:
            continue
        texts.append(text[: max_bytes - total])
        total += len(texts[-1])
        if total >= max_bytes:
            break
    return texts


def token_windows(
    tokenizer: Tokenizer,
    texts: list[str],
    seq_len: int,
    heldout_fraction: float = 0.05,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train (N, seq_len + 1), heldout (M, seq_len + 1)) int64 windows of the packed token stream.

    At least one window is held out whenever there are two or more, at most HELDOUT_MAX_TOKENS
    worth of them (beyond one window); the split depends only on
    the seed, so every process and every restart sees the same one.
    """
    stream: list[int] = []
    for ids in document_ids(tokenizer, texts):
        stream.extend(ids)
    window = seq_len + 1
    count = len(stream) // window
    if count < 2:
        raise ValueError(
            f"the data holds {len(stream)} tokens: too few for two windows of seq_len+1={window} tokens "
            "(one to train on, one held out); add data or lower seq_len"
        )
    windows = torch.tensor(stream[: count * window], dtype=torch.long).view(count, window)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    heldout = max(1, round(count * heldout_fraction)) if heldout_fraction > 0 else 0
    heldout = min(heldout, count - 1, max(1, HELDOUT_MAX_TOKENS // window))
    return windows[order[heldout:]], windows[order[:heldout]]
