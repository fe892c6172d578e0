"""Following a job from the command line: a live bar of its progress, and its end in words.

Shared by the CLI's commands, the demo and `fusion tune`; it imports none of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from local.client import ApiError, Client
from local.output import duration, money
from shared import contracts
from shared.lifecycle import END_STATUSES
from shared.responses import Job


def loss_words(loss: float) -> str:
    """Three decimals for a training loss; three significant digits for a small one (a healing
    step's distillation loss is near 1e-5, which three decimals would show as 0.000)."""
    return f"{loss:.3f}" if abs(loss) >= 0.1 or loss == 0 else f"{loss:.3g}"


def progress_line(p: contracts.Progress, narrow: bool = False) -> str:
    """Where a run is; `narrow` keeps what fits an 80-column terminal beside the bar."""
    parts = [] if narrow else [f"turn {p.turn}/{p.turns}", f"cycle {p.cycle}/{p.cycles}"]
    parts.append(f"step {p.step}/{p.total_steps}")
    if p.loss is not None:
        parts.append(f"loss {loss_words(p.loss)}")
    if p.perplexity is not None and not narrow:
        parts.append(f"ppl {p.perplexity:.1f}")
    parts.append(f"eta {duration(p.eta_seconds)}")
    return " · ".join(parts)


# --- following a job ---------------------------------------------------------------------------


class StoppedFollowing(Exception):
    """Ctrl-C while following a job: the job goes on; only the following stops."""

    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.job_id = job_id

    def line(self) -> str:
        return (f"stopped following job {self.job_id}; the job goes on. Follow it again with "
                f"`fusion jobs wait {self.job_id}`, or stop it with `fusion jobs cancel {self.job_id}`")


NARROW_COLUMNS = 100  # below this the bar's line leaves out turn, cycle and perplexity


def follow(client: Client, job_id: str, console: Console, *, interval: float = 1.0, timeout: float | None = None,
           show: bool = True) -> Job:
    """Poll a job until it ends, with a live bar of its progress.json (none when not `show`);
    returns the final job. Ctrl-C raises StoppedFollowing: the job itself goes on."""
    try:
        if not show:
            return _poll_until_end(client, job_id, interval, timeout, lambda job: None)
        return _follow_with_bar(client, job_id, console, interval, timeout)
    except KeyboardInterrupt:
        raise StoppedFollowing(job_id) from None


def _poll_until_end(client: Client, job_id: str, interval: float, timeout: float | None,
                    seen: Callable[[Job], None]) -> Job:
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        job = client.call("GET", f"/jobs/{job_id}", Job)
        seen(job)
        if job.status in END_STATUSES:
            return job
        if deadline and time.monotonic() > deadline:
            raise ApiError(f"job {job_id} is still {job.status} after {duration(timeout)}")
        time.sleep(interval)


def _follow_with_bar(client: Client, job_id: str, console: Console, interval: float, timeout: float | None) -> Job:
    narrow = console.width < NARROW_COLUMNS
    columns = [TextColumn("{task.fields[status]:<10}"), BarColumn(bar_width=12 if narrow else 30),
               TextColumn("{task.percentage:>3.0f}%"), TextColumn("{task.fields[detail]}"), TimeElapsedColumn()]
    printed: tuple[int, int] | None = None
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(job_id, total=None, status="queued", detail="")

        def seen(job: Job) -> None:
            nonlocal printed
            p = job.progress
            if p and p.total_steps:
                bar.update(task, total=p.total_steps, completed=p.step)
            bar.update(task, status=job.status, detail=_detail(job, narrow))
            if job.status == "completed":  # the last progress.json may predate the last steps
                total = bar.tasks[0].total or 1
                bar.update(task, total=total, completed=total)
            if not console.is_terminal and p and (p.turn, p.cycle) != printed and job.status not in END_STATUSES:
                printed = (p.turn, p.cycle)  # a log gets one line per cycle, not a redrawn bar
                console.print(f"  {job.status}: {progress_line(p)}")

        return _poll_until_end(client, job_id, interval, timeout, seen)


def _detail(job: Job, narrow: bool) -> str:
    """The words beside the bar: where the run is, or, once it ended, what happened."""
    p = job.progress
    if job.status == "completed":
        done = f"all {p.total_steps} steps" if p and p.total_steps else "done"
        return done + (f" · loss {loss_words(p.loss)}" if p and p.loss is not None else "")
    if job.status in ("cancelled", "failed"):
        return f"{job.status} at step {p.step}/{p.total_steps}" if p and p.total_steps else job.status
    return progress_line(p, narrow) if p else _waiting(job.status)


def _waiting(status: str) -> str:
    return {"queued": "waiting for a launch slot", "launching": "starting the training job",
            "running": "loading data and model", "cancelling": "stopping"}.get(status, "")


def report_end(job: Job, console: Console) -> int:
    if job.status == "completed" and job.type == "evaluate":  # no model: its table is on the job
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
