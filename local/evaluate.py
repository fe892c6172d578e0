"""`fusion models evaluate`: measure models side by side on the same windows of one dataset.

    fusion models evaluate m-abc m-def base-tiny --dataset ds-... --seq-len 256

submits an evaluate job (priced per forward token, like any job before it runs), follows it, and
prints its table: each model's perplexity and loss on the very same windows, and on chat data
the loss on the assistant's tokens. Rows whose windows differ (another tokenizer) are marked.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from local.cli import Client, Output, _table, estimate_table, follow, human, money, number, report_end
from shared.responses import Job, Quote
from shared.settings import EvaluateSettings


def add_parsers(models: argparse._SubParsersAction) -> None:
    fields = EvaluateSettings.model_fields
    parser = models.add_parser("evaluate", help="measure models side by side on the same windows of one dataset")
    parser.add_argument("model_ids", nargs="+", metavar="MODEL", help=fields["model_ids"].description)
    parser.add_argument("--dataset", required=True, help="a ready dataset id (ds-...) or an s3:// URI under your prefix")
    parser.add_argument("--seq-len", type=int, help=f"{fields['seq_len'].description} (default {fields['seq_len'].default})")
    parser.add_argument("--split", choices=("heldout", "all"), help=f"{fields['split'].description} (default heldout)")
    parser.add_argument("--max-windows", type=int,
                        help=f"{fields['max_windows'].description} (default {fields['max_windows'].default})")
    parser.add_argument("--estimate", action="store_true", help="price it without creating the job")
    parser.add_argument("--no-wait", action="store_true", help="return once the job is queued")


def evaluation_request(args: argparse.Namespace) -> dict[str, Any]:
    hyperparams = {"model_ids": args.model_ids}
    for name in ("seq_len", "split", "max_windows"):
        if getattr(args, name) is not None:
            hyperparams[name] = getattr(args, name)
    return {"type": "evaluate", "dataset": args.dataset, "hyperparams": hyperparams}


def evaluation_table(job: Job) -> Table | str:
    """The job's models side by side; the caption names the dataset, the windows and the seq_len."""
    table = job.evaluation
    if table is None:
        return f"job {job.job_id} is {job.status}: no evaluation yet"
    digests = [row.windows.sha256 for row in table.rows]
    common = max(set(digests), key=digests.count)
    windows = table.rows[0].windows.windows if table.rows else 0
    out = _table("MODEL", "PARAMETERS", "PERPLEXITY", "LOSS", "ASSISTANT LOSS", "TOKENS SCORED", "WINDOWS",
                 right=("PARAMETERS", "PERPLEXITY", "LOSS", "ASSISTANT LOSS", "TOKENS SCORED"))
    for row in table.rows:
        out.add_row(row.model_id, human(row.parameters), number(row.perplexity), number(row.loss, 4),
                    number(row.assistant_loss, 4), f"{row.target_tokens:,}",
                    row.windows.sha256[:12] + ("" if row.windows.sha256 == common else " (other tokenizer)"))
    which = "held-out windows" if table.split == "heldout" else "windows sampled from all"
    out.caption = (f"{windows} {which} of {table.seq_len} tokens of {table.dataset}; "
                   f"{table.evaluated_tokens:,} tokens evaluated, billed {money(job.bill)}")
    return out


def models_evaluate(args: argparse.Namespace, client: Client, out: Output) -> int:
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
    job = follow(client, job.job_id, out.console)
    if job.status != "completed":
        return report_end(job, out.console)
    out.show(job, evaluation_table)
    return 0


COMMANDS = {("models", "evaluate"): models_evaluate}
