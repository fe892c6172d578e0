"""Data at real sizes: memory and speed of the token shards against the list[int] path.

    .venv/bin/python bench/data.py [--gb 1.0] [--small-mb 16]

1. Writes a synthetic JSONL dataset of --gb GB (documents of 1-8 KB cut from the Python standard
   library's sources) into a temporary folder, deleted at the end.
2. Token shards (tokens.prepare): peak RSS and tokens/s of the process tokenizing it.
3. A rank at training start over those shards: peak RSS of a process that opens them, builds the
   Trainer (debug model) and runs one step, against the same over the small dataset of 4.
4. On --small-mb MB of the same kind of data, in processes of their own: peak RSS of the list[int]
   path (data.read_texts + token_windows, what every rank did before) and of the shards, the
   list path's bytes a token, and what it would take for the --gb dataset at that rate.

Every figure is measured in a fresh child process (ru_maxrss), next to the RSS of a child that
only imports the same modules, so the figures above that baseline are the data's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from pathlib import Path

SEQ_LEN = 512


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_dataset(folder: Path, size: int, files: int = 8) -> int:
    """JSONL files under folder, about `size` bytes in all; the bytes written."""
    from training_image.data import stdlib_corpus

    source = "\n".join(stdlib_corpus(8_000_000))
    folder.mkdir(parents=True, exist_ok=True)
    written, document = 0, 0
    for number in range(files):
        with open(folder / f"part-{number:03d}.jsonl", "w", encoding="utf-8") as out:
            while written < size * (number + 1) // files:
                length = 1000 + (document * 2654435761) % 7000
                start = (document * 7919 * 104729) % (len(source) - length)
                line = json.dumps({"text": source[start : start + length]}) + "\n"
                out.write(line)
                written += len(line.encode())
                document += 1
    return written


def _tokenizer_file(folder: Path) -> Path:
    from shared.shapes import SIZES
    from training_image.data import stdlib_corpus
    from training_image.tokenizer import save_tokenizer, train_tokenizer

    path = folder / "tokenizer.json"
    save_tokenizer(train_tokenizer(stdlib_corpus(1_000_000), SIZES["tiny"].vocab_size), path)
    return path


# ---- what the children run ---------------------------------------------------------------------


def _imports_only(tokenizer_path: str, queue) -> None:
    import torch  # noqa: F401

    from training_image import data, tokens, train  # noqa: F401
    from training_image.tokenizer import load_tokenizer

    load_tokenizer(tokenizer_path)
    queue.put({"rss_mb": _peak_rss_mb()})


def _prepare(tokenizer_path: str, source: str, folder: str, queue) -> None:
    from training_image import tokens
    from training_image.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    started = time.perf_counter()
    data = tokens.prepare(tokenizer, source, folder, SEQ_LEN)
    seconds = time.perf_counter() - started
    queue.put({"rss_mb": _peak_rss_mb(), "tokens": data.tokens, "seconds": seconds})


def _list_path(tokenizer_path: str, source: str, queue) -> None:
    from training_image.data import read_texts, token_windows
    from training_image.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    started = time.perf_counter()
    train, heldout = token_windows(tokenizer, read_texts(source), SEQ_LEN)
    seconds = time.perf_counter() - started
    queue.put({"rss_mb": _peak_rss_mb(), "tokens": (len(train) + len(heldout)) * (SEQ_LEN + 1), "seconds": seconds})


def _training_start(folder: str, queue) -> None:
    import torch

    from shared.shapes import SIZES
    from training_image.model import Decoder
    from training_image.tokens import TokenData
    from training_image.train import Trainer, TrainPlan

    torch.set_num_threads(1)
    data = TokenData(folder)
    train, heldout = data.train_windows(), data.heldout_windows()
    plan = TrainPlan(turns=1, cycle_steps=[1], lr=1e-3, seq_len=SEQ_LEN, batch_size=8)
    config = SIZES["debug"].model_copy(update={"vocab_size": SIZES["tiny"].vocab_size})
    trainer = Trainer(Decoder(config).init_weights(0), train, heldout, plan, log=None)
    trainer.run()
    queue.put({"rss_mb": _peak_rss_mb(), "windows": len(train)})


def _child(target, *args) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    if process.exitcode:
        raise RuntimeError(f"{target.__name__} exited with {process.exitcode}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--small-mb", type=float, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fusion-bench-data-"))
    try:
        tokenizer = str(_tokenizer_file(work))
        baseline = _child(_imports_only, tokenizer)["rss_mb"]
        print(f"baseline (imports and tokenizer only): peak RSS {baseline:.0f} MB")

        small = work / "small"
        size = write_dataset(small, int(args.small_mb * 1e6), files=2)
        listed = _child(_list_path, tokenizer, str(small))
        sharded = _child(_prepare, tokenizer, str(small), str(work / "small-tokens"))
        per_token = (listed["rss_mb"] - baseline) * 2**20 / listed["tokens"]
        print(
            f"{size / 1e6:.0f} MB, {listed['tokens']:,} tokens: list[int] path peak RSS {listed['rss_mb']:.0f} MB "
            f"({listed['rss_mb'] - baseline:.0f} above baseline, {per_token:.0f} bytes a token); "
            f"shards {sharded['rss_mb']:.0f} MB ({sharded['rss_mb'] - baseline:.0f} above baseline); "
            f"ratio above baseline {(listed['rss_mb'] - baseline) / max(1.0, sharded['rss_mb'] - baseline):.1f}x"
        )
        shutil.rmtree(small)

        big = work / "big"
        started = time.perf_counter()
        size = write_dataset(big, int(args.gb * 1e9))
        print(f"wrote {size / 1e9:.2f} GB of JSONL in {time.perf_counter() - started:.0f} s")
        prepared = _child(_prepare, tokenizer, str(big), str(work / "big-tokens"))
        shard_bytes = sum(p.stat().st_size for p in (work / "big-tokens").glob("shard-*.bin"))
        print(
            f"token shards of {size / 1e9:.2f} GB: {prepared['tokens']:,} tokens in {prepared['seconds']:.0f} s "
            f"({prepared['tokens'] / prepared['seconds']:,.0f} tokens/s, {size / 1e6 / prepared['seconds']:.1f} MB/s), "
            f"peak RSS {prepared['rss_mb']:.0f} MB ({prepared['rss_mb'] - baseline:.0f} above baseline); "
            f"shards {shard_bytes / 1e9:.2f} GB on disk"
        )
        print(
            f"the list[int] path at {per_token:.0f} bytes a token would need "
            f"{prepared['tokens'] * per_token / 1e9:.0f} GB in every rank for this dataset"
        )
        shutil.rmtree(big)
        for name in ("small-tokens", "big-tokens"):
            start = _child(_training_start, str(work / name))
            print(
                f"a rank at training start over {start['windows']:,} windows of {SEQ_LEN + 1} tokens (debug model, "
                f"one step): peak RSS {start['rss_mb']:.0f} MB ({start['rss_mb'] - baseline:.0f} above baseline)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
