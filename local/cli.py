"""`fusion`: the command line for Fusion's HTTP API, on this machine or deployed.

    fusion serve                         the whole service on loopback (no AWS account)
    fusion datasets upload FILE          register, upload and check a dataset (list|get|delete)
    fusion estimate train --model base-tiny --dataset ds-... --turns 2
    fusion jobs create train ... --wait  submit, then follow it with a live progress bar
    fusion jobs list|get|wait|cancel     follow and control jobs
    fusion models list|show|delete       the catalog (a deleted model stays in its children's lineage)
    fusion models evaluate M1 M2 --dataset ds-...   both on the same windows, side by side
    fusion models download MODEL --out DIR   its transformers folder (config.json, safetensors, tokenizer)
    fusion models generate MODEL --prompt TEXT   sample from it on this machine
    fusion models deploy MODEL --instance-type ml.g5.xlarge   serve it from a SageMaker endpoint
    fusion models undeploy ENDPOINT      delete that endpoint, its config and its model
    fusion models register DIR --name N  upload a Hugging Face folder here as a base model of yours

Against a deployed stack: --api-url (or FUSION_API_URL) and --token (or FUSION_TOKEN, a JWT
your identity provider issued). The job settings' flags are generated from the same pydantic
models the API validates with, so their names, defaults and help are the API's own.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, get_args

import requests
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from local.client import DEFAULT_API_URL, Answer, ApiError, Client
from local.deploy import COMMANDS as DEPLOY_COMMANDS, add_parsers as deploy_parsers
from local.evaluate import add_parsers as evaluate_parsers, evaluation_request, evaluation_table, windows_cell, windows_words
from local.follow import (NARROW_COLUMNS, StoppedFollowing, _follow_with_bar, _waiting, follow, loss_words,  # noqa: F401
                          progress_line, report_end)
from local.output import Output, _pairs, _table, duration, human, money, number
from shared import contracts
from shared.responses import (
    CatalogModel,
    Dataset,
    DatasetList,
    Job,
    JobList,
    ModelList,
    Quote,
    RegisteredDataset,
)
from shared.settings import NAME_CHARACTERS, NAME_MAX_LENGTH, ContractSettings, EvaluateSettings, TrainSettings
from shared.lifecycle import END_STATUSES
from shared.shapes import SIZES


# --- tables ------------------------------------------------------------------------------------


def models_table(models: list[CatalogModel]) -> Table:
    table = _table("MODEL", "NAME", "KIND", "PARAMETERS", "DEPTH", "PERPLEXITY", "MEASURED ON", "COST", "PARENT",
                   right=("PARAMETERS", "DEPTH", "PERPLEXITY", "COST"))
    for m in models:
        table.add_row(m.model_id, m.name or "-", m.kind, human(m.parameters), str(m.depth or "-"),
                      number(m.perplexity), windows_cell(m.perplexity_on), money(m.cost), m.parent_id or "-")
    return table


def jobs_table(jobs: list[Job]) -> Table:
    table = _table("JOB", "TYPE", "STATUS", "MODEL", "OUTPUT", "ESTIMATE", "BILL", "CREATED",
                   right=("ESTIMATE", "BILL"))
    for j in jobs:
        table.add_row(j.job_id, j.type, j.status, j.model or "-", j.output_model_id or "-", money(j.estimate.total),
                      money(j.bill), j.created_at[:19].replace("T", " "))
    return table


def datasets_table(datasets: list[Dataset]) -> Table:
    table = _table("DATASET", "NAME", "STATUS", "BYTES", "TOKENS", "CREATED", "REASON", right=("BYTES", "TOKENS"))
    for d in datasets:
        table.add_row(d.dataset_id, d.name, d.status, human(d.bytes), human(d.tokens),
                      d.created_at[:19].replace("T", " "), d.reason or "")
    return table


def what_runs(job_type: str, settings: dict[str, Any], estimate: Any = None) -> str:
    """The run the settings make, in words: turns, cycles and steps as the trainer will take them."""
    try:
        if job_type == "train":
            train = TrainSettings.model_validate(settings)
            cycles = train.cycle_steps()
            steps = (f"{len(cycles)} cycle{'s' * (len(cycles) > 1)} of {cycles[0]:,} steps" if len(set(cycles)) == 1
                     else f"{len(cycles)} cycles of {min(cycles):,}-{max(cycles):,} steps")
            run = f"{train.turns} turn{'s' * (train.turns > 1)} x {steps}, seq_len {train.seq_len}, lr {train.lr:g}"
        elif job_type == "evaluate":
            evaluate = EvaluateSettings.model_validate(settings)
            models = len(evaluate.model_ids)
            run = (f"{models} model{'s' * (models > 1)} on at most {evaluate.max_windows:,} windows of "
                   f"{evaluate.seq_len} tokens ({evaluate.source}), forward passes only")
        else:
            contract = ContractSettings.model_validate(settings)
            run = (f"prune {contract.contraction_ratio:g} of {contract.num_layers_to_contract} blocks, "
                   f"then {contract.train_steps:,} healing steps")
    except ValueError:  # settings of another shape (an older record): as they are
        return json.dumps(settings, separators=(", ", "=")).strip("{}").replace('"', "")
    if estimate is not None and estimate.sequences_per_step and job_type != "evaluate":
        run += f", {estimate.sequences_per_step} sequences a step"
    return run


def tokens_rows(e: Any) -> list[tuple[str, str]]:
    """Billed tokens (the price's count) and trained tokens (what the model sees), named apart."""
    if e.evaluated_tokens:
        return [("evaluated tokens", f"{e.evaluated_tokens:,} at most (models x max_windows x seq_len; billed for "
                                     "those evaluated)")]
    rows = [("billed tokens", f"{e.training_tokens:,} (turns x steps x seq_len)")]
    if e.trained_tokens is not None:
        rows.append(("trained tokens", f"{e.trained_tokens:,} (billed tokens x {e.sequences_per_step} sequences a step)"))
    return rows


def estimate_table(quote: Quote) -> Table:
    """The API's estimate, so that it adds up: exact parts, their sum, then the total charged."""
    e = quote.estimate
    if e.evaluated_tokens:  # an evaluation: forward tokens only, each model at its own tier's rate
        parts = [("evaluation cost", e.evaluation_cost,
                  f"{human(e.evaluated_tokens)} forward tokens, each model's at its tier's rate per 1M evaluated")]
    else:
        parts = [("training cost", e.training_cost,
                  f"{human(e.training_tokens)} billed tokens at ${e.usd_per_million_tokens} per 1M (tier {e.tier}, "
                  f"{human(e.parameters)} parameters)")]
    if e.growth_parameters:
        parts.append(("growth fee", e.growth_fee, f"{human(e.growth_parameters)} parameters added"))
    if e.contraction_fee:
        parts.append(("contraction fee", e.contraction_fee, f"flat, tier {e.tier}"))
    exact = sum((amount for _, amount, _ in parts), Decimal(0))
    of = quote.model or ", ".join(quote.settings.get("model_ids", []))
    rows = [("job", f"{quote.type} of {of} on {quote.dataset or '-'}"),
            ("runs", what_runs(quote.type, quote.settings, e)), *tokens_rows(e)]
    rows += [(name, f"{money(amount)}  {note}") for name, amount, note in parts]
    rows.append(("sum", money(exact)))
    if e.minimum_charge:
        rows.append(("minimum charge", f"{money(e.minimum_charge)} (the least any job pays)"))
    rounded = exact.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    why = "the minimum charge" if e.total > rounded else "the sum rounded to cents"
    rows.append(("total", f"[bold]{money(e.total)}[/bold] ({why})"))
    rows.append(("eta on AWS", eta_words(e)))
    rows += [("warning", w) for w in quote.warnings]
    return _pairs(rows)


def eta_words(e: Any) -> str:
    """The estimate's ETA is a SageMaker run's: on a local stack the job runs on this machine instead."""
    launch = f", {duration(e.launch_seconds)} of it starting the instance" if e.launch_seconds else ""
    return f"{duration(e.eta_seconds)} on {e.instance_count} x {e.instance_type}{launch}"


def job_table(job: Job) -> Table:
    rows = [("job", job.job_id), ("type", job.type), ("status", job.status), ("model", job.model or "-"),
            ("dataset", job.dataset or "-"), ("estimate", money(job.estimate.total)), ("bill", money(job.bill)),
            ("output model", job.output_model_id or "-"), ("training job", job.training_job_name or "-"),
            ("runs", what_runs(job.type, job.settings, job.estimate)), *tokens_rows(job.estimate),
            ("eta on AWS", eta_words(job.estimate)), ("created", job.created_at), ("updated", job.updated_at)]
    if job.failure_reason:
        rows.append(("failure", job.failure_reason))
    if job.progress:
        rows.append(("progress", progress_line(job.progress)))
    if job.models:
        rows.append(("models", ", ".join(job.models)))
    if job.evaluation:
        first = job.evaluation.rows[0].perplexity_on if job.evaluation.rows else None
        rows += [(row.model_id, f"perplexity {number(row.perplexity)} on {windows_words(row.perplexity_on)}"
                                + ("" if row.perplexity_on.compares_with(first) else " (other windows)"))
                 for row in job.evaluation.rows]
    rows.append(("settings", json.dumps(job.settings, separators=(", ", "=")).strip("{}").replace('"', "")))
    rows += [("warning", w) for w in job.warnings]
    return _pairs(rows)


def model_table(model: CatalogModel, parent: CatalogModel | None = None) -> Table:
    """One model; with its parent, the parent's state and the differences from it."""
    parent_words = model.parent_id or "-"
    if parent is not None:
        parent_words += " (deleted)" if parent.status == "deleted" else ""
        if parent.parameters and model.parameters:
            parent_words += f", parameters {(model.parameters / parent.parameters - 1):+.0%}"
        # A contracted model's parent measured on its own windows (parent_perplexity); else the parent's
        # catalog figure, which compares only when measured on the same windows.
        theirs = model.parent_perplexity
        if theirs is None and model.perplexity_on is not None and model.perplexity_on.compares_with(parent.perplexity_on):
            theirs = parent.perplexity
        if theirs and model.perplexity:
            parent_words += f", perplexity {(model.perplexity / theirs - 1):+.1%}"
        elif parent.perplexity and model.perplexity:
            parent_words += ", perplexity on other windows"
    rows = [("model", model.model_id), ("name", model.name or "-"), ("kind", model.kind), ("owner", model.owner),
            ("parent", parent_words), ("job", model.job_id or "-"),
            ("parameters", f"{human(model.parameters)} ({model.parameters or 0:,})"),
            ("depth", str(model.depth or "-")), ("perplexity", _perplexity(model)), ("cost", money(model.cost)),
            ("dataset", model.dataset or "-"), ("artifact", model.artifact_uri or "-"), ("created", model.created_at)]
    if model.status != "ready":
        rows.append((model.status, model.reason or model.deleted_at or "-"))
    config = model.config
    if config:
        shapes = sorted({(layer.n_heads, layer.n_kv_heads, layer.mlp_hidden) for layer in config.layers})
        rows.append(("shape", f"dim {config.dim}, vocab {config.vocab_size}, context {config.context_length}, "
                              "layers (heads/kv/mlp): " + ", ".join(f"{h}/{k}/{m}" for h, k, m in shapes)))
    return _pairs(rows)


def _perplexity(model: CatalogModel) -> str:
    """The model's perplexity with the windows it was measured on, and its parent's on the same ones."""
    text = number(model.perplexity)
    if model.perplexity_on is not None:
        text += f" on {windows_words(model.perplexity_on)}"
    if model.parent_perplexity is not None:
        text += f"; its parent {number(model.parent_perplexity)} on the same windows"
    return text


# --- arguments ---------------------------------------------------------------------------------


def _settings_flags(parser: argparse.ArgumentParser, model: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per setting, from the pydantic model the API validates with."""
    group = parser.add_argument_group("settings (omitted ones take the API's defaults)")
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        kinds = [t for t in (get_args(field.annotation) or (field.annotation,)) if t is not type(None)]
        kind = kinds[0] if kinds and kinds[0] in (int, float) else str
        default = "required" if field.is_required() else "API default" if field.default is None else f"default {field.default}"
        group.add_argument("--" + name.replace("_", "-"), dest="hp_" + name, type=kind, default=None,
                           metavar=kind.__name__.upper(), help=f"{field.description} ({default}{_range(field)})")


def _range(field: Any) -> str:
    """The bounds a setting declares, in words: ', range 1-10' or ', above 0 up to 1'."""
    bounds = {key: getattr(m, key) for m in field.metadata for key in ("ge", "gt", "le") if hasattr(m, key)}
    if "le" not in bounds:
        return ""
    low = f"{bounds['ge']:,}-" if "ge" in bounds else f"above {bounds['gt']} up to " if "gt" in bounds else "up to "
    return f", range {low}{bounds['le']:,}"


def _job_parsers(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text)
    kinds = parser.add_subparsers(dest="job_type", required=True, metavar="{train,contract}")
    train = kinds.add_parser("train", help="grow a base model and train it on a dataset")
    train.add_argument("--model", required=True, help="base model id, e.g. base-tiny")
    train.add_argument("--dataset", required=True, help="a ready dataset id (ds-...) or an s3:// URI under your prefix")
    _settings_flags(train, TrainSettings)
    contract = kinds.add_parser("contract", help="prune a trained model into a smaller one")
    contract.add_argument("--model", "--source-model-id", dest="hp_source_model_id", required=True, metavar="MODEL",
                          help="the trained model to contract, e.g. m-... (the API's source_model_id)")
    contract.add_argument("--dataset", help="calibration data (default: the source model's dataset)")
    _settings_flags(contract, ContractSettings, skip=("source_model_id",))
    for p in (train, contract):
        if name == "create":
            p.add_argument("--wait", action="store_true", help="follow the job with a live progress bar until it ends")
    return parser


def _job_request(args: argparse.Namespace) -> dict[str, Any]:
    hyperparams = {k[3:]: v for k, v in vars(args).items() if k.startswith("hp_") and v is not None}
    body: dict[str, Any] = {"type": args.job_type, "hyperparams": hyperparams}
    if getattr(args, "model", None):
        body["model"] = args.model
    if getattr(args, "dataset", None):
        body["dataset"] = args.dataset
    return body


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion", description="Grow, train and contract language models.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api-url", default=os.environ.get("FUSION_API_URL", DEFAULT_API_URL),
                        help="the Fusion HTTP API (env FUSION_API_URL; default %(default)s)")
    parser.add_argument("--token", default=os.environ.get("FUSION_TOKEN"),
                        help="bearer JWT for a deployed API (env FUSION_TOKEN); the local stack needs none")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (the API's answer) instead of tables; may come anywhere")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the whole service on this machine (moto, local SageMaker, HTTP API)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--sizes", default="debug,tiny",
                       help="the random base models to make and register, as base-<size> (of "
                            f"{', '.join(SIZES)}; default %(default)s)")
    serve.add_argument("--verbose", action="store_true", help="log the functions and AWS calls")

    _job_parsers(sub, "estimate", "price a job without creating it")

    jobs = sub.add_parser("jobs", help="create, follow and cancel jobs").add_subparsers(dest="action", required=True)
    _job_parsers(jobs, "create", "submit a train or contract job")
    jobs.add_parser("list", help="your jobs, newest first")
    for action, text in (("get", "one job, with its live progress"), ("cancel", "stop a job; it pays for what it trained"),
                         ("wait", "follow a job with a live progress bar until it ends")):
        p = jobs.add_parser(action, help=text)
        p.add_argument("job_id")
        if action == "wait":
            p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")

    models = sub.add_parser("models", help="the catalog").add_subparsers(dest="action", required=True)
    models.add_parser("list", help="base models and yours")
    models.add_parser("show", help="one model in detail").add_argument("model_id")
    models.add_parser("delete", help="delete one of your models (its children keep their lineage)").add_argument("model_id")
    download = models.add_parser("download", help="write a model's transformers folder to a directory")
    download.add_argument("model_id")
    download.add_argument("--out", required=True, type=Path, help="a new or empty directory")
    generate = models.add_parser("generate", help="sample text from a model on this machine (KV cache)")
    generate.add_argument("model_id", help="a catalog model id, or a model directory / model.tar.gz here")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-tokens", type=int, default=64, help="new tokens at most (default %(default)s)")
    generate.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default %(default)s)")
    generate.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default %(default)s)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--chat", action="store_true",
                          help="answer --prompt as the user's turn of a conversation, rendered with the model's chat template")
    generate.add_argument("--system", help="with --chat: a system message before the user's turn")
    from local.register import add_parsers as register_parsers

    deploy_parsers(models)
    register_parsers(models)
    evaluate_parsers(models)
    from local.admin import add_parsers as admin_parsers

    admin_parsers(sub)
    from local.tune import add_parsers as tune_parsers

    tune_parsers(sub)

    datasets = sub.add_parser("datasets", help="training data").add_subparsers(dest="action", required=True)
    upload = datasets.add_parser("upload", help="register, upload and check a dataset")
    upload.add_argument("file", type=Path)
    upload.add_argument("--name", help="dataset name (default: the file's name)")
    upload.add_argument("--format", choices=("jsonl", "text"),
                        help="default: from the content (JSON lines or a JSON array are JSONL, else text)")
    upload.add_argument("--no-wait", action="store_true", help="return once uploaded, before the check")
    datasets.add_parser("list", help="your datasets")
    datasets.add_parser("get", help="one dataset").add_argument("dataset_id")
    datasets.add_parser("delete", help="delete one of your datasets and its data").add_argument("dataset_id")
    return parser


# --- commands ----------------------------------------------------------------------------------


def dataset_name(file: Path) -> str:
    """A valid dataset name from a file's: its stem, each character a name may not hold made "-"."""
    return re.sub(f"[^{NAME_CHARACTERS}]", "-", file.stem)[:NAME_MAX_LENGTH] or "dataset"


DETECT_BYTES = 1 << 16  # what format detection reads of a file's start


def detect_format(file: Path) -> tuple[str, str]:
    """(the API's format, why) from the file's content, the name only breaking a tie: a .json file
    of JSON lines is JSONL, a JSON array is records, anything else is plain text."""
    with file.open("rb") as handle:
        head = handle.read(DETECT_BYTES).decode("utf-8", errors="replace")
    start = head.lstrip()
    if start.startswith("["):
        return "array", "a JSON array: each element one record, uploaded as JSONL"
    if start.startswith("{"):
        first = start.split("\n", 1)[0]
        try:
            json.loads(first)
        except ValueError:
            if file.suffix in (".jsonl", ".json"):
                return "jsonl", f"the name says JSON ({file.suffix}); the check reports a line that is not"
            return "text", "plain text (its first line is not a JSON object)"
        return "jsonl", "one JSON object a line"
    if file.suffix == ".jsonl":
        return "jsonl", "the name says JSONL, though it does not start with {"
    return "text", "plain text"


def _array_as_jsonl(file: Path, into: Path) -> Path:
    """A JSON array's elements, one a line: objects as they are, strings as {"text": ...}."""
    try:
        records = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ApiError(f"{file} starts like a JSON array but is not one: {error}") from None
    if not isinstance(records, list):
        raise ApiError(f"{file} is not a JSON array")
    target = into / (file.stem + ".jsonl")
    with target.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps({"text": record} if isinstance(record, str) else record) + "\n")
    return target


def upload_dataset(client: Client, file: Path, *, name: str | None = None, fmt: str | None = None,
                   wait: bool = True, timeout: float = 300, said: Callable[[str], None] = lambda line: None) -> Dataset:
    """Register, upload and (with `wait`) check a dataset; `said` hears the format chosen and why."""
    if not file.is_file():
        raise ApiError(f"no such file: {file}")
    if fmt is None:
        fmt, why = detect_format(file)
        said(f"format: {'jsonl' if fmt == 'array' else fmt} ({why}); --format overrides it")
    if fmt == "array":
        with tempfile.TemporaryDirectory(prefix="fusion-upload-") as work:
            return upload_dataset(client, _array_as_jsonl(file, Path(work)), name=name or dataset_name(file),
                                  fmt="jsonl", wait=wait, timeout=timeout)
    name = name or dataset_name(file)
    registered = client.call("POST", "/datasets", RegisteredDataset, {"name": name, "format": fmt})
    with file.open("rb") as body:
        put = requests.put(registered.upload_url, data=body, timeout=600)
    if put.status_code >= 300:
        raise ApiError(f"uploading {file} failed: HTTP {put.status_code} {put.text[:200]}")
    dataset = Dataset.model_validate(registered.model_dump(exclude={"upload_url"}))
    deadline = time.monotonic() + timeout
    while wait and dataset.status == "pending":
        if time.monotonic() > deadline:
            raise ApiError(f"dataset {dataset.dataset_id} is still being checked after {duration(timeout)}")
        time.sleep(0.5)
        dataset = client.call("GET", f"/datasets/{dataset.dataset_id}", Dataset)
    return dataset


def estimate(args: argparse.Namespace, client: Client, out: Output) -> int:
    out.show(client.call("POST", "/jobs/estimate", Quote, _job_request(args)), estimate_table)
    return 0


def jobs_create(args: argparse.Namespace, client: Client, out: Output) -> int:
    job = client.call("POST", "/jobs", Job, _job_request(args))
    if out.as_json:  # one document: the job as created, or as it ended
        job = follow(client, job.job_id, out.console, show=False) if args.wait else job
        out.show(job, job_table)
        return _exit_code(job) if args.wait else 0
    out.console.print(f"job [bold]{job.job_id}[/bold] {job.status}: estimate "
                      f"{money(job.estimate.total)}, eta on AWS {duration(job.estimate.eta_seconds)}")
    for warning in job.warnings:
        out.console.print(f"[yellow]warning[/yellow]: {warning}")
    return report_end(follow(client, job.job_id, out.console), out.console) if args.wait else 0


def models_evaluate(args: argparse.Namespace, client: Client, out: Output) -> int:
    """Price, or submit and follow, an evaluate job; print its table."""
    body = evaluation_request(args)
    if args.estimate:
        out.show(client.call("POST", "/jobs/estimate", Quote, body), estimate_table)
        return 0
    job = client.call("POST", "/jobs", Job, body)
    if args.no_wait:
        out.show(job, lambda j: f"job {j.job_id} {j.status}: estimate {money(j.estimate.total)}")
        return 0
    if not out.as_json:
        out.console.print(f"job {job.job_id} queued: estimate {money(job.estimate.total)}")
        for warning in job.warnings:
            out.console.print(f"[yellow]warning[/yellow]: {warning}")
    job = follow(client, job.job_id, out.console, show=not out.as_json)
    if job.status != "completed":
        return report_end(job, out.console)
    out.show(job, evaluation_table)
    return 0


def _exit_code(job: Job) -> int:
    return 0 if job.status == "completed" else 1


Command = Callable[[argparse.Namespace, "Client", "Output"], int]


def _reader(path: str, answer: type[Answer], render: Callable[[Any], Any], items: str | None = None) -> Command:
    """A command that GETs path (filled from the arguments) and shows the answer, or its list of items."""
    def command(args: argparse.Namespace, client: Client, out: Output) -> int:
        body = client.call("GET", path.format(**vars(args)), answer)
        out.show(getattr(body, items) if items else body, render)
        return 0
    return command


jobs_list = _reader("/jobs", JobList, jobs_table, items="jobs")
jobs_get = _reader("/jobs/{job_id}", Job, job_table)
models_list = _reader("/models", ModelList, models_table, items="models")


def models_show(args: argparse.Namespace, client: Client, out: Output) -> int:
    model = client.call("GET", f"/models/{args.model_id}", CatalogModel)
    parent = None
    if model.parent_id and not out.as_json:
        try:
            parent = client.call("GET", f"/models/{model.parent_id}", CatalogModel)
        except ApiError:
            pass
    out.show(model, lambda m: model_table(m, parent))
    return 0


def models_delete(args: argparse.Namespace, client: Client, out: Output) -> int:
    model = client.call("DELETE", f"/models/{args.model_id}", CatalogModel)
    out.show(model, lambda m: f"model {m.model_id} deleted; models made from it still name it as their parent")
    return 0


def datasets_delete(args: argparse.Namespace, client: Client, out: Output) -> int:
    dataset = client.call("DELETE", f"/datasets/{args.dataset_id}", Dataset)
    out.show(dataset, lambda d: f"dataset {d.dataset_id} ({d.name}) deleted, with its data")
    return 0


def jobs_cancel(args: argparse.Namespace, client: Client, out: Output) -> int:
    job = client.call("POST", f"/jobs/{args.job_id}/cancel", Job)
    out.show(job, lambda j: f"job {j.job_id} {j.status}" + (f", billed {money(j.bill)}" if j.bill is not None else ""))
    return 0


def jobs_wait(args: argparse.Namespace, client: Client, out: Output) -> int:
    if out.as_json:
        job = follow(client, args.job_id, out.console, timeout=args.timeout, show=False)
        out.show(job, job_table)
        return _exit_code(job)
    return report_end(follow(client, args.job_id, out.console, timeout=args.timeout), out.console)


def models_download(args: argparse.Namespace, client: Client, out: Output) -> int:
    from local.models import download

    path = download(client, args.model_id, args.out)
    out.show({"model_id": args.model_id, "path": str(path)},
             lambda d: f"model {d['model_id']} written to {d['path']} (load it with transformers' from_pretrained)")
    return 0


def models_generate(args: argparse.Namespace, client: Client, out: Output) -> int:
    from local.models import generate_text

    if args.max_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ApiError("--max-tokens must be at least 1, --temperature at least 0, --top-p in (0, 1]")
    if args.system is not None and not args.chat:
        raise ApiError("--system goes with --chat")
    chat = None
    if args.chat:
        chat = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    text = generate_text(client, args.model_id, args.prompt, max_tokens=args.max_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed, chat=chat)
    if chat is None:
        if out.as_json:
            out.show({"model_id": args.model_id, "prompt": args.prompt, "text": text}, str)
        else:
            out.console.print(args.prompt + text, markup=False)
        return 0
    answer = {"role": "assistant", "content": text.strip()}
    out.show({"messages": chat + [answer]}, lambda _: Text(f"assistant: {answer['content']}"))
    return 0


def datasets_upload(args: argparse.Namespace, client: Client, out: Output) -> int:
    dataset = upload_dataset(client, args.file, name=args.name, fmt=args.format, wait=not args.no_wait,
                             said=lambda line: None if out.as_json else out.console.print(line, markup=False))
    out.show(dataset, lambda d: datasets_table([d]))
    if dataset.status == "rejected":
        raise ApiError(f"dataset {dataset.dataset_id} was rejected: {dataset.reason}")
    return 0


def datasets_list(args: argparse.Namespace, client: Client, out: Output) -> int:
    out.show(client.call("GET", "/datasets", DatasetList).datasets, datasets_table)
    return 0


def datasets_get(args: argparse.Namespace, client: Client, out: Output) -> int:
    out.show(client.call("GET", f"/datasets/{args.dataset_id}", Dataset), lambda d: datasets_table([d]))
    return 0


COMMANDS: dict[tuple[str, str | None], Callable[[argparse.Namespace, Client, Output], int]] = {
    ("estimate", None): estimate,
    ("jobs", "create"): jobs_create,
    ("jobs", "list"): jobs_list,
    ("jobs", "get"): jobs_get,
    ("jobs", "cancel"): jobs_cancel,
    ("jobs", "wait"): jobs_wait,
    ("models", "list"): models_list,
    ("models", "show"): models_show,
    ("models", "evaluate"): models_evaluate,
    ("models", "delete"): models_delete,
    ("models", "download"): models_download,
    ("models", "generate"): models_generate,
    ("datasets", "upload"): datasets_upload,
    ("datasets", "list"): datasets_list,
    ("datasets", "get"): datasets_get,
    ("datasets", "delete"): datasets_delete,
}


def run(args: argparse.Namespace, console: Console) -> int:
    if args.command == "serve":
        return _serve(args, console)
    from local.admin import COMMANDS as ADMIN_COMMANDS
    from local.register import COMMANDS as REGISTER_COMMANDS
    from local.tune import COMMANDS as TUNE_COMMANDS

    command = {**COMMANDS, **DEPLOY_COMMANDS, **ADMIN_COMMANDS, **REGISTER_COMMANDS, **TUNE_COMMANDS}[
        (args.command, getattr(args, "action", None))]
    return command(args, Client(args.api_url, args.token), Output(console, args.json))


def job_event_line(job: dict[str, Any]) -> str:
    """One line for a job's new status, as `fusion serve` prints it (a job record of any tenant)."""
    status = job.get("status", "?")
    line = (f"{time.strftime('%H:%M:%S')} job {job['job_id']} ({job.get('type')} of {job.get('model') or '-'}, "
            f"tenant {job.get('owner')}): {status}")
    if status == "queued":
        line += f", estimate {money((job.get('estimate') or {}).get('total'))}"
    elif status == "completed":
        line += f" -> model {job.get('output_model_id')}, billed {money(job.get('bill'))}"
    elif status == "cancelled":
        line += f", billed {money(job.get('bill'))}"
    elif status == "failed":
        line += f": {job.get('failure_reason') or 'no reason given'}"
    return line


def _serve(args: argparse.Namespace, console: Console) -> int:
    from local.stack import serve

    sizes = tuple(s for s in args.sizes.split(",") if s)
    console.print(f"starting Fusion on http://{args.host}:{args.port} (base models: {', '.join(sizes)}) ...")

    def ready(stack) -> None:
        console.print(f"[green]ready[/green]: API at [bold]{stack.api_url}[/bold] (Ctrl-C stops everything)\n"
                      f"  console: [bold]{stack.console_url}[/bold]\n"
                      f"  fusion --api-url {stack.api_url} models list\n"
                      f"  curl -s {stack.api_url}/models")

    try:
        serve(args.host, args.port, base_sizes=sizes, on_ready=ready, verbose=args.verbose,
              on_job=lambda job: console.print(job_event_line(job), markup=False))
    except OSError as error:  # typically the port is taken by another `fusion serve`
        raise ApiError(f"cannot serve on {args.host}:{args.port}: {error.strerror or error}") from None
    console.print("stopped")
    return 0


# --- errors in the command line's words -----------------------------------------------------------


def flag_of(field: str) -> str | None:
    """The flag that sets an API field: hyperparams.seq_len -> --seq-len."""
    name = field.removeprefix("hyperparams.")
    if name == "source_model_id":
        return "--model"
    if name.split(".")[0] == "model_ids":  # `fusion models evaluate`'s MODEL arguments, counted from 1
        index = name.split(".")[1:]
        return f"MODEL {int(index[0]) + 1}" if index and index[0].isdigit() else "MODEL"
    if field.startswith("hyperparams.") or name in ("model", "dataset", "name"):
        return "--" + name.replace("_", "-")
    return None


def explain(error: ApiError, args: argparse.Namespace, client: Client | None) -> str:
    """The API's refusal in the CLI's words: each field as the flag that sets it, and the fix."""
    flagged = [(flag_of(d.get("field", "")), d.get("message", "")) for d in error.details]
    if flagged and all(flag for flag, _ in flagged):
        line = "; ".join(f"{flag}: {message}" for flag, message in flagged)
    else:
        line = error.line()
    return line + "".join(f"\n  {hint}" for hint in _hints(error, args, client))


def _hints(error: ApiError, args: argparse.Namespace, client: Client | None) -> list[str]:
    fields = {d.get("field") for d in error.details}
    if error.code == "model_not_found" and client is not None:
        wanted = getattr(args, "model", None) or getattr(args, "hp_source_model_id", None) or getattr(args, "model_id", "")
        try:
            known = [m.model_id for m in client.call("GET", "/models", ModelList).models]
        except ApiError:
            known = []
        close = difflib.get_close_matches(wanted, known, n=3, cutoff=0.5) or [k for k in known if k.endswith("-" + wanted)]
        return [f"did you mean {' or '.join(close)}?" if close else "`fusion models list` shows the model ids"]
    if error.code == "dataset_not_found" and "dataset" in fields:
        given = getattr(args, "dataset", None) or ""
        if Path(given).is_file() or not given.startswith(("ds-", "s3://")):
            return [f"--dataset takes a dataset id: upload the file first with `fusion datasets upload {given}`, "
                    "then pass the ds-... id it prints"]
        return ["`fusion datasets list` shows your dataset ids"]
    return []


GLOBAL_FLAGS = {"--json": False, "--api-url": True, "--token": True}  # flag: takes a value


def _globals_first(argv: list[str]) -> list[str]:
    """The line with its global flags (--json, --api-url, --token) moved in front of the command,
    so that they may come anywhere (before a `--`)."""
    end = argv.index("--") if "--" in argv else len(argv)
    front, rest, i = [], [], 0
    while i < end:
        name = argv[i].split("=", 1)[0]
        if name in GLOBAL_FLAGS:
            takes = GLOBAL_FLAGS[name] and "=" not in argv[i]
            front += argv[i:i + 1 + takes]
            i += 1 + takes
        else:
            rest.append(argv[i])
            i += 1
    return front + rest + argv[end:]


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command the line names, deepest first: its usage is the one to show."""
    for key in ("command", "action", "job_type"):
        chosen = getattr(args, key, None)
        subparsers = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if chosen is None or subparsers is None or chosen not in subparsers.choices:
            break
        parser = subparsers.choices[chosen]
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The arguments, or exit 2 with the usage of the command at fault and the flag it likely meant."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(_globals_first(argv))
    if unknown:
        command = _command_parser(parser, args)
        flags = [o for a in command._actions for o in a.option_strings] + list(GLOBAL_FLAGS)
        wrong = next((u for u in unknown if u.startswith("-")), unknown[0])
        close = difflib.get_close_matches(wrong.split("=")[0], flags, n=1, cutoff=0.6)
        command.error(f"unrecognized argument {wrong}" + (f": did you mean {close[0]}?" if close else
                      f" (`{command.prog} --help` lists the flags)"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    errors = Console(stderr=True, highlight=False, width=200)
    try:
        return run(args, console)
    except ApiError as error:
        client = Client(args.api_url, args.token) if args.command != "serve" else None
        errors.print(f"[red]error[/red]: {explain(error, args, client)}", soft_wrap=True)
        return 1
    except StoppedFollowing as stopped:
        errors.print(stopped.line(), soft_wrap=True, markup=False)
        return 130
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
