"""Lambda SnapStart's runtime hooks: what a function prepares before its snapshot, and what it
renews after each restore.

With SnapStart (template.yaml: the API, launcher and events functions), a new execution
environment resumes from a snapshot taken after the handler module was imported, so the imports
and module-level set-up cost a request nothing. Before the snapshot each function builds the AWS
clients its requests use, which parses their service models once, into the snapshot. After each
restore it renews what the snapshot would otherwise share between every environment restored from
it: the clients (their connections and the credentials they resolved) and the random generator's
state. New clients come from `session()`, whose service models are the ones already parsed, so a
restored environment's first request builds its clients in a fraction of the time.

The hooks come from the Snapshot Restore for Python library that Lambda's managed Python runtimes
include; elsewhere (tests, the local stack) nothing is snapshotted or restored, registering does
nothing, and `restored()` / `prepare()` are what a test or a benchmark calls in their place.
"""

from __future__ import annotations

import os
import random
from typing import Any, Callable

_PREPARERS: list[Callable[[], Any]] = []
_RENEWERS: list[Callable[[], None]] = []
_LOADER: Any = None


def session() -> Any:
    """A new boto3 session (its own credentials, connections and clients) whose service models are
    those this process has parsed already: botocore's loader is shared, nothing else."""
    import boto3
    import botocore.session

    global _LOADER
    core = botocore.session.get_session()
    if _LOADER is None:
        _LOADER = core.get_component("data_loader")
    else:
        core.register_component("data_loader", _LOADER)
    return boto3.session.Session(botocore_session=core)


def prepare_before_snapshot(*preparers: Callable[[], Any]) -> None:
    """Run each of `preparers` before the snapshot is taken (building the clients a request uses)."""
    if not _PREPARERS:
        _register("register_before_snapshot", prepare)
    _PREPARERS.extend(preparers)


def renew_after_restore(*renewers: Callable[[], None]) -> None:
    """Run each of `renewers` after every restore, in this order, after the random generator is reseeded."""
    if not _RENEWERS:
        _register("register_after_restore", restored)
    _RENEWERS.extend(renewers)


def prepare() -> None:
    """What a function runs before its snapshot (the before-snapshot hook)."""
    for preparer in _PREPARERS:
        preparer()


def restored() -> None:
    """What a restored environment runs before its first request (the after-restore hook)."""
    random.seed(os.urandom(32))  # else every restored environment draws the same "random" numbers
    for renew in _RENEWERS:
        renew()


def _register(name: str, hook: Callable[[], None]) -> None:
    try:
        import snapshot_restore_py
    except ImportError:  # not in Lambda's managed runtime: nothing is snapshotted or restored
        return
    getattr(snapshot_restore_py, name)(hook)
