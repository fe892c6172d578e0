"""What packing conversations costs or saves against padding, on the manual-page conversations.

The same conversations (bench/chat_data.py, rendered with the default chat template), three ways:

- padded: one conversation a row, padded to seq_len (what a trainer without packing runs);
- packed: whole conversations packed into windows, each attending only to itself with its own
  positions (Fusion's layout: training_image.tokens, model.Decoder(starts=...));
- packed, shared attention: the same windows attending across conversations (what the mask costs).

For each: the windows the conversations need, the seconds a forward and backward pass of a batch
takes, and so the seconds to train on all of them once and the real (not padding) tokens a
second. The loss is the same in all three: on the assistant's tokens, padding never counted.

    OMP_NUM_THREADS=2 .venv/bin/python bench/packing.py                 # ~2 CPU minutes
    OMP_NUM_THREADS=2 .venv/bin/python bench/packing.py --seq-len 512 --conversations 4000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_data import manpage_split  # noqa: E402
from shared.conversations import conversation  # noqa: E402
from shared.shapes import SIZES  # noqa: E402
from training_image.data import DOCUMENT_START, FLAG_SHIFT, NOT_TARGET, split_windows  # noqa: E402
from training_image.model import Decoder  # noqa: E402
from training_image.tokenizer import TextTokenizer, train_tokenizer  # noqa: E402
from training_image.tokens import pack  # noqa: E402


def encoded(tokenizer: TextTokenizer, records: list[dict], window: int) -> list[tuple[list[int], list[bool]]]:
    out = []
    for record in records:
        ids, mine = tokenizer.conversation_ids(conversation(record))
        out.append((ids[:window], mine[:window]))
    return out


def _flags(mine: list[bool]) -> list[int]:
    return [(0 if m else NOT_TARGET) | (DOCUMENT_START if i == 0 else 0) for i, m in enumerate(mine)]


def _flagged(ids: list[int], mine: list[bool]) -> list[int]:
    return [t | (f << FLAG_SHIFT) for t, f in zip(ids, _flags(mine))]


def packed_windows(items, window: int, pad: int) -> torch.Tensor:
    """Whole conversations packed into windows by training_image.tokens.pack, as a job lays them out."""
    rows = pack(((ids, _flags(mine)) for ids, mine in items), window, pad)
    return torch.tensor([[t | (f << FLAG_SHIFT) for t, f in zip(ids, flags)] for ids, flags, _ in rows])


def padded_windows(items, window: int, pad: int) -> torch.Tensor:
    """One conversation a row, padded to the window."""
    rows = []
    for ids, mine in items:
        flagged = _flagged(ids, mine)
        rows.append(flagged + [pad | (NOT_TARGET << FLAG_SHIFT)] * (window - len(ids)))
    return torch.tensor(rows)


def step_seconds(model: Decoder, windows: torch.Tensor, batch: int, r: int, mask: bool) -> float:
    rows = windows[(r * batch) % max(1, len(windows) - batch):][:batch]
    inputs, targets, starts = split_windows(rows)
    started = time.perf_counter()
    loss = model(inputs, targets, starts=starts if mask else None)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    args = parser.parse_args()
    torch.manual_seed(0)

    train, _ = manpage_split()
    records = train[:: max(1, len(train) // args.conversations)][: args.conversations]
    texts = [m["content"] for r in records for m in r["messages"]]
    config = SIZES[args.size].model_copy(update={"context_length": max(SIZES[args.size].context_length, args.seq_len + 1)})
    tokenizer = TextTokenizer(train_tokenizer(texts, config.vocab_size))
    window = args.seq_len + 1
    items = encoded(tokenizer, records, window)
    pad = tokenizer.eos_id
    real = sum(len(ids) for ids, _ in items)
    assistant = sum(sum(m) for _, m in items)
    model = Decoder(config).init_weights(0)
    print(f"{len(items)} conversations, {real} tokens ({assistant / real:.1%} the assistant's), mean "
          f"{real / len(items):.1f} tokens; {args.size} model ({config.parameters():,} parameters), seq_len {args.seq_len}, "
          f"batches of {args.batch}, {torch.get_num_threads()} threads, fp32")

    layouts = {"padded": (padded_windows(items, window, pad), False),
               "packed": (packed_windows(items, window, pad), True),
               "packed, shared attention": (packed_windows(items, window, pad), False)}
    # Round robin, a batch of each layout in turn, and the median: a machine others share slows
    # all three alike rather than whichever ran while it was busy.
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for r in range(args.repeats + 1):
        for name, (windows, mask) in layouts.items():
            seconds = step_seconds(model, windows, args.batch, r, mask)
            if r:  # the first round warms up
                times[name].append(seconds)
    results = {}
    for name, (windows, mask) in layouts.items():
        per_batch = statistics.median(times[name])
        total = per_batch * len(windows) / args.batch
        results[name] = total
        print(f"{name:>26}: {len(windows):6d} windows ({real / windows[:, 1:].numel():6.1%} real tokens), "
              f"{per_batch * 1000:8.1f} ms a batch, {total:8.1f} s for all, {real / total:9.0f} real tokens/s")
    print(f"packed / padded time for the same conversations: {results['packed'] / results['padded']:.3f}")
    print(f"the per-conversation mask: packed / packed with shared attention: "
          f"{results['packed'] / results['packed, shared attention']:.3f}")


if __name__ == "__main__":
    main()
