"""`fusion-train`: make base model directories.

    fusion-train init --size tiny --out DIR [--seed 0]   a fresh, randomly initialised base model
    fusion-train import-hf SRC --out DIR                 a Hugging Face checkpoint (Llama, Mistral, Qwen2, Qwen3)
    fusion-train export-hf MODEL_DIR --out DIR           a model directory as a folder transformers loads
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.shapes import SIZES
from training_image.data import stdlib_corpus
from training_image.export import export_hf
from training_image.hf import import_hf
from training_image.model import Decoder
from training_image.modeldir import load_model_dir, save_model_dir
from training_image.tokenizer import train_tokenizer

TOKENIZER_CORPUS_BYTES = 4_000_000


def init_model_dir(size: str, out: str | Path, seed: int = 0) -> Path:
    """A base model of a named size: tokenizer trained on the Python standard library, random weights."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; one of {', '.join(SIZES)}")
    config = SIZES[size]
    tokenizer = train_tokenizer(stdlib_corpus(TOKENIZER_CORPUS_BYTES), config.vocab_size)
    model = Decoder(config).init_weights(seed)
    return save_model_dir(out, model, tokenizer)


def export_model_dir(src: str | Path, out: str | Path) -> Path:
    """The transformers folder of a model directory."""
    model, tokenizer = load_model_dir(src)
    return export_hf(model, tokenizer, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusion-train", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="write a fresh base model directory")
    init.add_argument("--size", required=True, choices=sorted(SIZES))
    init.add_argument("--out", required=True)
    init.add_argument("--seed", type=int, default=0)
    imp = commands.add_parser("import-hf", help="convert a Hugging Face checkpoint")
    imp.add_argument("src")
    imp.add_argument("--out", required=True)
    exp = commands.add_parser("export-hf", help="write a model directory as a transformers folder")
    exp.add_argument("src")
    exp.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "init":
        path = init_model_dir(args.size, args.out, args.seed)
    elif args.command == "import-hf":
        path = import_hf(args.src, args.out)
    else:
        path = export_model_dir(args.src, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
