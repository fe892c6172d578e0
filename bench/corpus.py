"""The benchmarks' English corpus, split by file into train and held-out text.

Debian's `fortunes` package: about 2.4 MB of English prose, quotations, verse and jokes in some
fifty topic files. Held-out text is whole files (every HOLDOUT_EVERY-th by name), so no sentence,
quotation or topic of a held-out file is seen in training, and a benchmark measures what a model
learnt about English rather than what it memorised of neighbouring windows.

The package is installed when missing (as root: `apt-get install -y fortunes`); nothing comes
from a model or dataset hub.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import torch
from tokenizers import Tokenizer

from training_image.data import token_windows

FORTUNES = Path("/usr/share/games/fortunes")
PACKAGE = "fortunes"
HOLDOUT_EVERY = 6  # the 1st, 7th, 13th ... file by name is held out (8 of 50 files, about a sixth)


def ensure_installed() -> None:
    if _files():
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise SystemExit(f"the benchmark corpus needs Debian's {PACKAGE!r} package: run `apt-get install -y {PACKAGE}` as root")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", PACKAGE], env=environment).returncode:
        subprocess.run(["apt-get", "update"], env=environment, check=True)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", PACKAGE], env=environment, check=True)
    if not _files():
        raise SystemExit(f"{PACKAGE} installed but no text files under {FORTUNES}")


def _files() -> list[Path]:
    """The cookie files: plain files without a suffix (`.dat` are indexes, `.u8` links)."""
    if not FORTUNES.is_dir():
        return []
    return sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.is_symlink() and not p.suffix)


def _text(path: Path) -> str:
    # Cookies are separated by lines holding a single '%'; a blank line reads more like prose.
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join("" if line.strip() == "%" else line for line in lines).strip() + "\n"


def english_texts() -> tuple[list[str], list[str]]:
    """(train texts, held-out texts), one text per file, split by file."""
    ensure_installed()
    files = _files()
    train = [_text(p) for i, p in enumerate(files) if i % HOLDOUT_EVERY]
    heldout = [_text(p) for i, p in enumerate(files) if not i % HOLDOUT_EVERY]
    return train, heldout


def english_windows(tokenizer: Tokenizer, seq_len: int, train: list[str], heldout: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(train windows, held-out windows) of seq_len + 1 tokens, each side packed from its own files."""
    train_windows, _ = token_windows(tokenizer, train, seq_len, heldout_fraction=0)
    heldout_windows, _ = token_windows(tokenizer, heldout, seq_len, heldout_fraction=0)
    return train_windows, heldout_windows


def english_corpus(vocab_size: int, seq_len: int, heldout_windows: int) -> tuple[Tokenizer, torch.Tensor, torch.Tensor]:
    """A tokenizer trained on the training files, their windows, and a seeded sample of
    `heldout_windows` held-out windows: the same data for every run of a bench."""
    from training_image.tokenizer import train_tokenizer

    train_texts, heldout_texts = english_texts()
    tokenizer = train_tokenizer(train_texts, vocab_size)
    train, heldout = english_windows(tokenizer, seq_len, train_texts, heldout_texts)
    sample = torch.randperm(len(heldout), generator=torch.Generator().manual_seed(0))[:heldout_windows]
    return tokenizer, train, heldout[sample]
