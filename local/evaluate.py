"""`fusion models evaluate`: measure models side by side on the same windows of one dataset.

    fusion models evaluate m-abc m-def base-tiny --dataset ds-... --seq-len 256

submits an evaluate job (priced per forward token, like any job before it runs), follows it, and
prints its table: each model's perplexity and loss on the very same windows (on chat data, the
loss on the assistant's tokens). Rows whose windows differ from the first row's (another
tokenizer or chat template) are marked: their figures do not compare with the others'.

The command itself is local.cli's (it prices and follows the job as every job command does);
this module holds its flags, its request and its table.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from local.output import _table, human, money, number
from shared.contracts import HeldOut
from shared.responses import Job
from shared.settings import EvaluateSettings


def add_parsers(models: argparse._SubParsersAction) -> None:
    fields = EvaluateSettings.model_fields
    parser = models.add_parser("evaluate", help="measure models side by side on the same windows of one dataset")
    parser.add_argument("model_ids", nargs="+", metavar="MODEL", help=fields["model_ids"].description)
    parser.add_argument("--dataset", required=True, help="a ready dataset id (ds-...) or an s3:// URI under your prefix")
    parser.add_argument("--seq-len", type=int, help=f"{fields['seq_len'].description} (default {fields['seq_len'].default})")
    parser.add_argument("--source", choices=("split", "dataset"),
                        help=f"{fields['source'].description} (default {fields['source'].default})")
    parser.add_argument("--max-windows", type=int,
                        help=f"{fields['max_windows'].description} (default {fields['max_windows'].default})")
    parser.add_argument("--estimate", action="store_true", help="price it without creating the job")
    parser.add_argument("--no-wait", action="store_true", help="return once the job is queued")


def evaluation_request(args: argparse.Namespace) -> dict[str, Any]:
    hyperparams = {"model_ids": args.model_ids}
    for name in ("seq_len", "source", "max_windows"):
        if getattr(args, name) is not None:
            hyperparams[name] = getattr(args, name)
    return {"type": "evaluate", "dataset": args.dataset, "hyperparams": hyperparams}


def windows_words(on: HeldOut) -> str:
    """In a sentence: which windows, of which dataset, at which seq_len, scoring which tokens."""
    which = {"validation": "validation windows", "split": "held-out windows", "dataset": "windows sampled from all"}
    scored = ", the assistant's tokens scored" if on.tokens == "assistant" else ""
    digest = f" (sha256 {on.sha256[:12]})" if on.sha256 else ""
    return f"{on.windows} {which[on.source]} of {on.seq_len} tokens of {on.dataset or '-'}{scored}{digest}"


def windows_cell(on: HeldOut | None) -> str:
    """In a table cell: `<source> <windows>x<seq_len> <dataset>`."""
    if on is None:
        return "-"
    return f"{on.source} {on.windows}x{on.seq_len}{' assistant' if on.tokens == 'assistant' else ''} {on.dataset or '-'}"


def evaluation_table(job: Job) -> Table | str:
    """The job's models side by side; the caption names the windows the first row was measured on."""
    table = job.evaluation
    if table is None or not table.rows:
        return f"job {job.job_id} is {job.status}: no evaluation yet"
    first = table.rows[0].perplexity_on
    chat = any(row.perplexity_on.tokens == "assistant" for row in table.rows)
    loss = "ASSISTANT LOSS" if chat else "LOSS"
    out = _table("MODEL", "PARAMETERS", "PERPLEXITY", loss, "TOKENS SCORED", "WINDOWS",
                 right=("PARAMETERS", "PERPLEXITY", loss, "TOKENS SCORED"))
    for row in table.rows:
        on = row.perplexity_on
        out.add_row(row.model_id, human(row.parameters), number(row.perplexity), number(row.loss, 4),
                    f"{row.target_tokens:,}",
                    (on.sha256 or "-")[:12] + ("" if on.compares_with(first) else " (other windows)"))
    out.caption = (f"{windows_words(first)}; {table.evaluated_tokens:,} tokens evaluated, billed {money(job.bill)}")
    return out
