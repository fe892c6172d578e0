"""`make demo`: Fusion end to end on this machine, through the same handlers and trainer as in AWS.

Starts the local stack, builds a dataset from the Python standard library's sources, uploads it
through the API, prices a train job, trains the base model with live progress, contracts the
result, prints the catalog, and ends with a sample from the trained and the contracted model. Everything it started is stopped when it ends, fails or is
interrupted.

The defaults fit a 2-core machine in a few minutes; FUSION_DEMO_SIZE, FUSION_DEMO_STEPS and
FUSION_DEMO_HEAL_STEPS change them.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import time
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from local.cli import ApiError, Client, estimate_table, follow, models_table, datasets_table, duration, money, upload_dataset
from local.models import generate_text
from local.stack import REPO, LocalStack, interrupt_on_signals
from shared.responses import Job, ModelList, Quote
from shared.shapes import SIZES

SIZE = os.environ.get("FUSION_DEMO_SIZE", "tiny")
TRAIN_STEPS = int(os.environ.get("FUSION_DEMO_STEPS", "240"))
HEAL_STEPS = int(os.environ.get("FUSION_DEMO_HEAL_STEPS", "40"))
DATASET_BYTES = 2_000_000
SAMPLE_PROMPT = "def "


def build_dataset(path: Path, max_bytes: int = DATASET_BYTES) -> Path:
    """JSONL of Python standard-library modules: real text that every machine running this has."""
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with path.open("w") as out:
        for source in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
            text = source.read_text(errors="replace")
            out.write(json.dumps({"text": text}) + "\n")
            written += len(text)
            if written >= max_bytes:
                break
    return path


def run_demo(console: Console) -> int:
    started = time.monotonic()
    depth = SIZES[SIZE].n_layers
    train = {"type": "train", "model": f"base-{SIZE}",
             "hyperparams": {"turns": 1, "cycles": 4, "train_steps": TRAIN_STEPS, "seq_len": 128, "lr": 1e-3,
                             "output_name": f"stdlib-{SIZE}"}}

    console.print(Rule("Fusion, end to end on this machine"))
    console.print(f"starting the local stack (moto, local SageMaker, HTTP API; base model {SIZE}) ...")
    with LocalStack(base_sizes=(SIZE,)) as stack:
        client = Client(stack.api_url)
        console.print(f"API at {stack.api_url}  ({time.monotonic() - started:.0f} s); console at {stack.console_url}\n")

        console.print(Rule("1. dataset"))
        data = build_dataset(REPO / ".fusion" / "demo" / "stdlib.jsonl")
        dataset = upload_dataset(client, data, name="python-stdlib")
        console.print(datasets_table([dataset]))
        if dataset.status != "ready":
            raise ApiError(f"the demo dataset was rejected: {dataset.reason}")
        train["dataset"] = dataset.dataset_id

        console.print(Rule("2. estimate"))
        console.print(estimate_table(client.call("POST", "/jobs/estimate", Quote, train)))

        console.print(Rule(f"3. train base-{SIZE}: grow it, then {TRAIN_STEPS} steps"))
        job = client.call("POST", "/jobs", Job, train)
        console.print(f"job {job.job_id} queued")
        job = follow(client, job.job_id, console)
        if job.status != "completed":
            raise ApiError(f"training {job.status}: {job.failure_reason}")
        trained = job.output_model_id
        console.print(f"-> {trained}, billed {money(job.bill)}\n")

        console.print(Rule(f"4. contract {trained}"))
        contract = {"type": "contract", "hyperparams": {
            "source_model_id": trained, "contraction_ratio": 0.5, "num_layers_to_contract": min(8, depth // 2),
            "train_steps": HEAL_STEPS, "output_name": f"stdlib-{SIZE}-contracted"}}
        job = client.call("POST", "/jobs", Job, contract)
        console.print(f"job {job.job_id} queued: estimate {money(job.estimate.total)}")
        job = follow(client, job.job_id, console)
        if job.status != "completed":
            raise ApiError(f"contraction {job.status}: {job.failure_reason}")
        console.print(f"-> {job.output_model_id}, billed {money(job.bill)}\n")

        console.print(Rule("5. catalog"))
        models = client.call("GET", "/models", ModelList).models
        lineage = [f"base-{SIZE}", trained, job.output_model_id]
        by_id = {m.model_id: m for m in models}
        console.print(models_table([by_id[model_id] for model_id in lineage]))
        console.print(f"\n(the other base models: {', '.join(m.model_id for m in models if m.kind == 'base' and m.model_id not in lineage)})")

        console.print(Rule("6. samples (fusion models generate MODEL --prompt ...)"))
        for model_id in lineage[1:]:
            text = generate_text(client, model_id, SAMPLE_PROMPT, max_tokens=48, temperature=0.7, top_p=0.9, seed=0)
            console.print(f"[bold]{model_id}[/bold]:")
            console.print(SAMPLE_PROMPT + text, markup=False)
    console.print(f"\ndemo finished in {duration(time.monotonic() - started)}; everything it started is stopped.")
    return 0


def main() -> int:
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    interrupt_on_signals()
    try:
        return run_demo(console)
    except ApiError as error:
        Console(stderr=True, highlight=False).print(f"[red]demo failed[/red]: {error.line()}")
        return 1
    except KeyboardInterrupt:
        console.print("\ninterrupted: the local stack is stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
