"""`fusion`: the command line for Fusion's HTTP API, on this machine or deployed.

    fusion serve                         the whole service on loopback (no AWS account)
    fusion datasets upload FILE          register, upload and check a dataset
    fusion estimate train --model base-tiny --dataset ds-... --turns 2
    fusion jobs create train ... --wait  submit, then follow it with a live progress bar
    fusion jobs list|get|wait|cancel     follow and control jobs
    fusion models list|show              the catalog
    fusion models evaluate M1 M2 --dataset ds-...   both on the same windows, side by side
    fusion models download MODEL --out DIR   its transformers folder (config.json, safetensors, tokenizer)
    fusion models generate MODEL --prompt TEXT   sample from it on this machine
    fusion models deploy MODEL --instance-type ml.g5.xlarge   serve it from a SageMaker endpoint
    fusion models undeploy ENDPOINT      delete that endpoint, its config and its model

Against a deployed stack: --api-url (or FUSION_API_URL) and --token (or FUSION_TOKEN, a JWT
your identity provider issued). The job settings' flags are generated from the same pydantic
models the API validates with, so their names, defaults and help are the API's own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, get_args

import requests
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared import contracts
from shared.responses import (
    CatalogModel,
    Dataset,
    DatasetList,
    ErrorResponse,
    Job,
    JobList,
    ModelList,
    Quote,
    RegisteredDataset,
)
from shared.settings import NAME_CHARACTERS, NAME_MAX_LENGTH, ContractSettings, TrainSettings
from shared.lifecycle import END_STATUSES

DEFAULT_API_URL = "http://127.0.0.1:8080"
TIMEOUT_S = 30
Answer = TypeVar("Answer", bound=BaseModel)


class ApiError(Exception):
    """The API's refusal ({"error": {"code", "message", "details"}}) or an unreachable API."""

    def __init__(self, message: str, code: str = "", details: list[dict[str, str]] | None = None, status: int = 0):
        super().__init__(message)
        self.message, self.code, self.details, self.status = message, code, details or [], status

    def line(self) -> str:
        fields = "; ".join(d.get("field", "") if d.get("message", "") in self.message else
                           f"{d.get('field')}: {d.get('message')}" for d in self.details)
        return f"{self.message}" + (f" ({fields})" if fields else "")


class Client:
    """The HTTP API, with the caller's bearer token."""

    def __init__(self, api_url: str, token: str | None = None):
        self.api_url = api_url.rstrip("/")
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, answer: type[Answer], body: dict[str, Any] | None = None) -> Answer:
        """The API's answer read with its response model; a refusal raises ApiError."""
        payload = self._send(method, path, body)
        try:
            return answer.model_validate(payload)
        except ValidationError as error:
            problem = error.errors()[0]
            where = ".".join(str(p) for p in problem["loc"]) or "body"
            raise ApiError(f"the API answered {method} {path} with a body that is not a {answer.__name__} "
                           f"({where}: {problem['msg']}): is it a Fusion API?") from None

    def _send(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        try:
            response = self.session.request(method, self.api_url + path, json=body, timeout=TIMEOUT_S)
        except requests.ConnectionError:
            raise ApiError(f"cannot reach the Fusion API at {self.api_url}: start it with `fusion serve` "
                           "or pass --api-url") from None
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        if response.status_code >= 400:
            try:
                error = ErrorResponse.model_validate(payload).error
            except ValidationError:
                error = None
            if error is not None:
                raise ApiError(error.message or response.reason, error.code,
                               [d.model_dump() for d in error.details], response.status_code)
            message = payload.get("message") if isinstance(payload, dict) else None  # API Gateway's own refusals
            raise ApiError(f"HTTP {response.status_code}: {message or response.reason}", status=response.status_code)
        return payload


# --- formatting --------------------------------------------------------------------------------


def human(n: Any) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def duration(seconds: Any) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(float(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def money(value: Any) -> str:
    """Totals come in cents; components keep their exact sub-cent value (shown without trailing zeros)."""
    if value in (None, ""):
        return "-"
    text = str(value)
    if "." in text and len(text.split(".")[1]) > 2:
        text = text.rstrip("0")
    return f"${text}"


def number(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def _table(*columns: str, right: tuple[str, ...] = ()) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left", no_wrap=True)
    return table


def _pairs(rows: list[tuple[str, str]]) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def models_table(models: list[CatalogModel]) -> Table:
    table = _table("MODEL", "NAME", "KIND", "PARAMETERS", "DEPTH", "PERPLEXITY", "MEASURED ON", "COST", "PARENT",
                   right=("PARAMETERS", "DEPTH", "PERPLEXITY", "COST"))
    for m in models:
        on = m.perplexity_measured_on
        table.add_row(m.model_id, m.name or "-", m.kind, human(m.parameters), str(m.depth or "-"),
                      number(m.perplexity), on.short() if on else "-", money(m.cost), m.parent_id or "-")
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


def estimate_table(quote: Quote) -> Table:
    e = quote.estimate
    if e.evaluated_tokens:  # an evaluation: forward tokens only, each model at its own tier's rate
        models = ", ".join(quote.settings.get("model_ids", []))
        rows = [("job", f"evaluate {models} on {quote.dataset or '-'}"),
                ("evaluated tokens", f"{e.evaluated_tokens:,} (at most; billed for those evaluated)"),
                ("evaluation cost", money(e.evaluation_cost))]
    else:
        rows = [
            ("job", f"{quote.type} of {quote.model} on {quote.dataset or '-'}"),
            ("training tokens", f"{e.training_tokens:,}"),
            ("parameters", f"{human(e.parameters)} (tier {e.tier}, ${e.usd_per_million_tokens} per 1M tokens)"),
            ("training cost", money(e.training_cost)),
        ]
    if e.growth_parameters:
        rows.append(("growth fee", f"{money(e.growth_fee)} for {human(e.growth_parameters)} parameters added"))
    if e.contraction_fee:
        rows.append(("contraction fee", money(e.contraction_fee)))
    rows += [("total", f"[bold]{money(e.total)}[/bold]"),
             ("eta", f"{duration(e.eta_seconds)} on {e.instance_count} x {e.instance_type}")]
    rows += [("warning", w) for w in quote.warnings]
    return _pairs(rows)


def job_table(job: Job) -> Table:
    rows = [("job", job.job_id), ("type", job.type), ("status", job.status), ("model", job.model or "-"),
            ("dataset", job.dataset or "-"), ("estimate", money(job.estimate.total)), ("bill", money(job.bill)),
            ("output model", job.output_model_id or "-"), ("training job", job.training_job_name or "-"),
            ("created", job.created_at), ("updated", job.updated_at)]
    if job.failure_reason:
        rows.append(("failure", job.failure_reason))
    if job.progress:
        rows.append(("progress", progress_line(job.progress)))
    if job.models:
        rows.append(("models", ", ".join(job.models)))
    if job.evaluation:
        rows += [(row.model_id, f"perplexity {number(row.perplexity)} on {job.evaluation.seq_len}-token windows "
                                f"({row.windows.windows} {row.windows.split}, sha256 {row.windows.sha256[:12]})")
                 for row in job.evaluation.rows]
    rows.append(("settings", json.dumps(job.settings, separators=(", ", "=")).strip("{}").replace('"', "")))
    rows += [("warning", w) for w in job.warnings]
    return _pairs(rows)


def model_table(model: CatalogModel) -> Table:
    rows = [("model", model.model_id), ("name", model.name or "-"), ("kind", model.kind), ("owner", model.owner),
            ("parent", model.parent_id or "-"), ("job", model.job_id or "-"),
            ("parameters", f"{human(model.parameters)} ({model.parameters or 0:,})"),
            ("depth", str(model.depth or "-")), ("perplexity", _perplexity(model)), ("cost", money(model.cost)),
            ("dataset", model.dataset or "-"), ("artifact", model.artifact_uri or "-"), ("created", model.created_at)]
    if model.status != "ready":
        rows.append((model.status, model.reason or "-"))
    config = model.config
    if config:
        shapes = sorted({(layer.n_heads, layer.n_kv_heads, layer.mlp_hidden) for layer in config.layers})
        rows.append(("shape", f"dim {config.dim}, vocab {config.vocab_size}, context {config.context_length}, "
                              "layers (heads/kv/mlp): " + ", ".join(f"{h}/{k}/{m}" for h, k, m in shapes)))
    return _pairs(rows)


def _perplexity(model: CatalogModel) -> str:
    """The model's perplexity with the windows it was measured on, and its parent's on the same ones."""
    text = number(model.perplexity)
    if model.perplexity_measured_on is not None:
        text += f" on {model.perplexity_measured_on.describe()}"
    if model.parent_perplexity is not None:
        text += f"; its parent {number(model.parent_perplexity)} on the same windows"
    return text


def progress_line(p: contracts.Progress) -> str:
    parts = [f"turn {p.turn}/{p.turns}", f"cycle {p.cycle}/{p.cycles}", f"step {p.step}/{p.total_steps}"]
    if p.loss is not None:
        parts.append(f"loss {p.loss:.3f}")
    if p.perplexity is not None:
        parts.append(f"ppl {p.perplexity:.1f}")
    parts.append(f"eta {duration(p.eta_seconds)}")
    return " · ".join(parts)


# --- following a job ---------------------------------------------------------------------------


def follow(client: Client, job_id: str, console: Console, *, interval: float = 1.0, timeout: float | None = None) -> Job:
    """Poll a job until it ends, with a live bar of its progress.json; returns the final job."""
    deadline = time.monotonic() + timeout if timeout else None
    columns = [TextColumn("{task.fields[status]:<10}"), BarColumn(bar_width=30),
               TextColumn("{task.percentage:>3.0f}%"), TextColumn("{task.fields[detail]}"), TimeElapsedColumn()]
    last_line, printed = "", ""
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(job_id, total=None, status="queued", detail="")
        while True:
            job = client.call("GET", f"/jobs/{job_id}", Job)
            p = job.progress
            if p and p.total_steps:
                bar.update(task, total=p.total_steps, completed=p.step)
                last_line = progress_line(p)
            if job.status == "completed":
                bar.update(task, total=bar.tasks[0].total or 1, completed=bar.tasks[0].total or 1)
            bar.update(task, status=job.status, detail=last_line or _waiting(job.status))
            if not console.is_terminal and p and (p.turn, p.cycle) != printed:
                printed = (p.turn, p.cycle)  # a log gets one line per cycle, not a redrawn bar
                console.print(f"  {job.status}: {last_line}")
            if job.status in END_STATUSES:
                return job
            if deadline and time.monotonic() > deadline:
                raise ApiError(f"job {job_id} is still {job.status} after {duration(timeout)}")
            time.sleep(interval)


def _waiting(status: str) -> str:
    return {"queued": "waiting for a launch slot", "launching": "starting the training job",
            "running": "loading data and model", "cancelling": "stopping"}.get(status, "")


def report_end(job: Job, console: Console) -> int:
    if job.status == "completed" and job.type == "evaluate":
        console.print(f"[green]completed[/green]: {len(job.models or [])} models evaluated, billed {money(job.bill)} "
                      f"(fusion jobs get {job.job_id})")
        return 0
    if job.status == "completed":
        console.print(f"[green]completed[/green]: model [bold]{job.output_model_id}[/bold], billed {money(job.bill)}")
        return 0
    if job.status == "cancelled":
        console.print(f"cancelled: billed {money(job.bill)} for what it trained")
        return 1
    raise ApiError(f"job {job.job_id} failed: {job.failure_reason or 'no reason given'}")


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
    contract.add_argument("--dataset", help="calibration data (default: the source model's dataset)")
    _settings_flags(contract, ContractSettings)
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
    parser.add_argument("--json", action="store_true", help="print the API's JSON instead of tables")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the whole service on this machine (moto, local SageMaker, HTTP API)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--sizes", default="debug,tiny", help="base model sizes to provide (default %(default)s)")
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
    from local.deploy import add_parsers as deploy_parsers  # here: local.deploy imports this module

    deploy_parsers(models)
    from local.evaluate import add_parsers as evaluate_parsers  # here: local.evaluate imports this module

    evaluate_parsers(models)

    datasets = sub.add_parser("datasets", help="training data").add_subparsers(dest="action", required=True)
    upload = datasets.add_parser("upload", help="register, upload and check a dataset")
    upload.add_argument("file", type=Path)
    upload.add_argument("--name", help="dataset name (default: the file's name)")
    upload.add_argument("--format", choices=("jsonl", "text"), help="default: jsonl for .jsonl files, text otherwise")
    upload.add_argument("--no-wait", action="store_true", help="return once uploaded, before the check")
    datasets.add_parser("list", help="your datasets")
    datasets.add_parser("get", help="one dataset").add_argument("dataset_id")
    return parser


# --- commands ----------------------------------------------------------------------------------


def dataset_name(file: Path) -> str:
    """A valid dataset name from a file's: its stem, each character a name may not hold made "-"."""
    return re.sub(f"[^{NAME_CHARACTERS}]", "-", file.stem)[:NAME_MAX_LENGTH] or "dataset"


def upload_dataset(client: Client, file: Path, *, name: str | None = None, fmt: str | None = None,
                   wait: bool = True, timeout: float = 300) -> Dataset:
    if not file.is_file():
        raise ApiError(f"no such file: {file}")
    fmt = fmt or ("jsonl" if file.suffix == ".jsonl" else "text")
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


class Output:
    """Where a command's answer goes: a rendered table, or the API's JSON with --json."""

    def __init__(self, console: Console, as_json: bool):
        self.console, self.as_json = console, as_json

    def show(self, data: BaseModel | list[BaseModel] | dict[str, Any], render: Callable[[Any], Any]) -> None:
        """An API answer (a model or a list of them) or a command's own result (a plain dict)."""
        if self.as_json:
            plain = [d.model_dump(mode="json") for d in data] if isinstance(data, list) else (
                data.model_dump(mode="json") if isinstance(data, BaseModel) else data)
            self.console.print_json(json.dumps(plain))
        else:
            self.console.print(render(data))


def estimate(args: argparse.Namespace, client: Client, out: Output) -> int:
    out.show(client.call("POST", "/jobs/estimate", Quote, _job_request(args)), estimate_table)
    return 0


def jobs_create(args: argparse.Namespace, client: Client, out: Output) -> int:
    job = client.call("POST", "/jobs", Job, _job_request(args))
    if out.as_json and not args.wait:
        out.show(job, job_table)
        return 0
    out.console.print(f"job [bold]{job.job_id}[/bold] {job.status}: estimate "
                      f"{money(job.estimate.total)}, eta {duration(job.estimate.eta_seconds)}")
    for warning in job.warnings:
        out.console.print(f"[yellow]warning[/yellow]: {warning}")
    return report_end(follow(client, job.job_id, out.console), out.console) if args.wait else 0


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
models_show = _reader("/models/{model_id}", CatalogModel, model_table)


def jobs_cancel(args: argparse.Namespace, client: Client, out: Output) -> int:
    job = client.call("POST", f"/jobs/{args.job_id}/cancel", Job)
    out.show(job, lambda j: f"job {j.job_id} {j.status}" + (f", billed {money(j.bill)}" if j.bill is not None else ""))
    return 0


def jobs_wait(args: argparse.Namespace, client: Client, out: Output) -> int:
    return report_end(follow(client, args.job_id, out.console, timeout=args.timeout), out.console)


def models_download(args: argparse.Namespace, client: Client, out: Output) -> int:
    from local.models import download

    path = download(client, args.model_id, args.out)
    out.console.print(f"model {args.model_id} written to {path} (load it with transformers' from_pretrained)")
    return 0


def models_generate(args: argparse.Namespace, client: Client, out: Output) -> int:
    from local.models import generate_text

    if args.max_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ApiError("--max-tokens must be at least 1, --temperature at least 0, --top-p in (0, 1]")
    text = generate_text(client, args.model_id, args.prompt, max_tokens=args.max_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    out.console.print(args.prompt + text, markup=False)
    return 0


def datasets_upload(args: argparse.Namespace, client: Client, out: Output) -> int:
    dataset = upload_dataset(client, args.file, name=args.name, fmt=args.format, wait=not args.no_wait)
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
    ("models", "download"): models_download,
    ("models", "generate"): models_generate,
    ("datasets", "upload"): datasets_upload,
    ("datasets", "list"): datasets_list,
    ("datasets", "get"): datasets_get,
}


def run(args: argparse.Namespace, console: Console) -> int:
    if args.command == "serve":
        return _serve(args, console)
    from local.deploy import COMMANDS as DEPLOY_COMMANDS
    from local.evaluate import COMMANDS as EVALUATE_COMMANDS

    command = {**COMMANDS, **DEPLOY_COMMANDS, **EVALUATE_COMMANDS}[(args.command, getattr(args, "action", None))]
    return command(args, Client(args.api_url, args.token), Output(console, args.json))


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
        serve(args.host, args.port, base_sizes=sizes, on_ready=ready, verbose=args.verbose)
    except OSError as error:  # typically the port is taken by another `fusion serve`
        raise ApiError(f"cannot serve on {args.host}:{args.port}: {error.strerror or error}") from None
    console.print("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    try:
        return run(args, console)
    except ApiError as error:
        Console(stderr=True, highlight=False, width=200).print(f"[red]error[/red]: {error.line()}", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
