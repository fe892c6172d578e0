"""`fusion tune ...`: start a tuning, watch it, show its ranked trials and promote the winner.

The commands call the HTTP API (POST/GET /tunings, /tunings/{id}/promote and /cancel) with the
CLI's client and print its answers as tables, or as JSON with --json.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from rich.table import Table

from local.client import ApiError, Client
from local.follow import follow, report_end
from local.output import Output, duration, money, number
from shared.responses import Job, Tuning, TuningList, TuningQuote
from shared.tunings import TUNABLE

ENDED = ("completed", "failed", "cancelled")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    tune = sub.add_parser("tune", help="search a train job's settings with cheap proxy trials, then promote the best")
    actions = tune.add_subparsers(dest="action", required=True)
    start = actions.add_parser("start", help="start a tuning (or price it with --dry-run)")
    start.add_argument("--model", required=True, help="base model id")
    start.add_argument("--dataset", required=True, help="dataset id or S3 URI under your data prefix")
    for name in TUNABLE:
        start.add_argument(f"--{name.replace('_', '-')}", metavar="MIN:MAX", dest=f"range_{name}",
                           help=f"search {name} over this range" + (" (log scale)" if name == "lr" else ""))
    start.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                       help="a fixed setting of every trial (repeatable), e.g. --set seq_len=512")
    start.add_argument("--max-trials", type=int)
    start.add_argument("--parallel", type=int, dest="max_parallel_trials", help="trials at a time")
    start.add_argument("--proxy-fraction", type=float, help="the share of each full run a trial trains")
    start.add_argument("--budget", type=float, dest="budget_usd", help="the most this tuning may cost (USD)")
    start.add_argument("--dry-run", action="store_true", help="price it; create nothing")
    start.add_argument("--wait", action="store_true", help="follow it until it ends, then show its trials")
    actions.add_parser("list", help="your tunings")
    for action, text in (("show", "one tuning and its ranked trials"), ("cancel", "stop a tuning and its trials"),
                         ("wait", "follow a tuning until it ends")):
        actions.add_parser(action, help=text).add_argument("tuning_id")
    promote = actions.add_parser("promote", help="create the full train job with the best trial's settings")
    promote.add_argument("tuning_id")
    promote.add_argument("--trial", help="the trial to promote (default: the best)")
    promote.add_argument("--output-name", help="the new model's catalog name")
    promote.add_argument("--wait", action="store_true", help="follow the job until it ends")


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def tuning_request(args: argparse.Namespace) -> dict[str, Any]:
    ranges = {}
    for name in TUNABLE:
        given = getattr(args, f"range_{name}")
        if given is None:
            continue
        low, sep, high = given.partition(":")
        if not sep:
            raise ApiError(f"--{name.replace('_', '-')} takes MIN:MAX, not {given!r}")
        ranges[name] = {"min": _value(low), "max": _value(high)}
    settings = {}
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ApiError(f"--set takes NAME=VALUE, not {pair!r}")
        settings[key] = _value(value)
    body: dict[str, Any] = {"model": args.model, "dataset": args.dataset, "settings": settings}
    if ranges:
        body["ranges"] = ranges
    for key in ("max_trials", "max_parallel_trials", "proxy_fraction", "budget_usd"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    return body


def tuning_table(tuning: Tuning) -> Table:
    searched = ", ".join(f"{k} {number(r['min'], 3)}..{number(r['max'], 3)}" for k, r in tuning.ranges.items())
    table = Table(title=f"tuning {tuning.tuning_id}: {tuning.status}; {searched}; {tuning.max_trials} trials at "
                        f"{tuning.proxy_fraction:.0%} of the run; estimate {money(tuning.estimate.total)}"
                        + (f", billed {money(tuning.bill)}" if tuning.bill is not None else ""))
    for column in ("#", "trial", *tuning.ranges, "perplexity", "curve", "status", "cost", "full run", "eta"):
        table.add_column(column, justify="right" if column not in ("trial", "status", "curve") else "left")
    for trial in tuning.trials:
        curve = " ".join(f"{p:.1f}" for p in trial.curve or [])
        table.add_row(str(trial.rank), trial.name.rsplit("-", 2)[-2], *(number(trial.settings[k], 4) for k in tuning.ranges),
                      number(trial.perplexity) if trial.perplexity is not None else "-", curve,
                      trial.status + (" early" if trial.early_stopped else ""), money(trial.cost),
                      money(trial.full_run.total) if trial.full_run else "-",
                      duration(trial.full_run.eta_seconds) if trial.full_run else "-")
    return table


def tunings_table(tunings: list[Tuning]) -> Table:
    table = Table()
    for column in ("tuning", "status", "model", "trials", "best", "estimate", "bill", "created"):
        table.add_column(column)
    for t in tunings:
        best = next((x for x in t.trials if x.name == t.best_trial), None)
        table.add_row(t.tuning_id, t.status, t.model, str(len(t.trials)) + f"/{t.max_trials}",
                      number(best.perplexity) if best else "-", money(t.estimate.total),
                      money(t.bill) if t.bill is not None else "-", t.created_at)
    return table


def wait_tuning(client: Client, tuning_id: str, out: Output, timeout: float | None = None) -> Tuning:
    deadline = None if timeout is None else time.monotonic() + timeout
    tuning = client.call("GET", f"/tunings/{tuning_id}", Tuning)
    with out.console.status(f"tuning {tuning_id} {tuning.status} ...") as status:
        while tuning.status not in ENDED:
            if deadline is not None and time.monotonic() > deadline:
                raise ApiError(f"tuning {tuning_id} is still {tuning.status}")
            time.sleep(1.0)
            tuning = client.call("GET", f"/tunings/{tuning_id}", Tuning)
            status.update(f"tuning {tuning_id} {tuning.status} ...")
    return tuning


def tune_start(args: argparse.Namespace, client: Client, out: Output) -> int:
    body = tuning_request(args)
    if args.dry_run:
        quote = client.call("POST", "/tunings?dry_run=true", TuningQuote, body)
        out.show(quote, lambda q: f"{q.tuning['max_trials']} trials of {q.model} at {q.tuning['proxy_fraction']:.0%} "
                                  f"of the run: at most {money(q.estimate.total)}, eta {duration(q.estimate.eta_seconds)}"
                                  + ("" if q.allowed_to_proceed else f"; over budget ({money(q.budget.remaining)} left)"))
        return 0
    tuning = client.call("POST", "/tunings", Tuning, body)
    if not args.wait:
        out.show(tuning, lambda t: f"tuning [bold]{t.tuning_id}[/bold] {t.status}: at most {money(t.estimate.total)}, "
                                   f"eta {duration(t.estimate.eta_seconds)}")
        return 0
    tuning = wait_tuning(client, tuning.tuning_id, out)
    out.show(tuning, tuning_table)
    return 0 if tuning.status == "completed" else 1


def tune_list(args: argparse.Namespace, client: Client, out: Output) -> int:
    out.show(client.call("GET", "/tunings", TuningList).tunings, tunings_table)
    return 0


def tune_show(args: argparse.Namespace, client: Client, out: Output) -> int:
    out.show(client.call("GET", f"/tunings/{args.tuning_id}", Tuning), tuning_table)
    return 0


def tune_wait(args: argparse.Namespace, client: Client, out: Output) -> int:
    tuning = wait_tuning(client, args.tuning_id, out)
    out.show(tuning, tuning_table)
    return 0 if tuning.status == "completed" else 1


def tune_cancel(args: argparse.Namespace, client: Client, out: Output) -> int:
    tuning = client.call("POST", f"/tunings/{args.tuning_id}/cancel", Tuning)
    out.show(tuning, lambda t: f"tuning {t.tuning_id} {t.status}" + (f", billed {money(t.bill)}" if t.bill is not None else ""))
    return 0


def tune_promote(args: argparse.Namespace, client: Client, out: Output) -> int:
    body = {k: v for k, v in (("trial", args.trial), ("output_name", args.output_name)) if v is not None}
    job = client.call("POST", f"/tunings/{args.tuning_id}/promote", Job, body)
    if out.as_json and not args.wait:
        out.show(job, lambda j: j)
        return 0
    settings = ", ".join(f"{k}={job.settings[k]}" for k in TUNABLE if k in job.settings)
    out.console.print(f"job [bold]{job.job_id}[/bold] {job.status} ({settings}): estimate "
                      f"{money(job.estimate.total)}, eta {duration(job.estimate.eta_seconds)}")
    return report_end(follow(client, job.job_id, out.console), out.console) if args.wait else 0


COMMANDS = {("tune", "start"): tune_start, ("tune", "list"): tune_list, ("tune", "show"): tune_show,
            ("tune", "wait"): tune_wait, ("tune", "cancel"): tune_cancel, ("tune", "promote"): tune_promote}
