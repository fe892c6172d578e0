"""How the command line shows things: numbers, durations, money, tables, and where an answer goes
(a rendered table, or one JSON document with --json)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

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
