"""SIGTERM under SageMaker's rules: StopTrainingJob and spot interruptions send SIGTERM, then
SIGKILL GRACE_SECONDS later.

The entry point runs as PID 1 in the container, and the kernel ignores a signal whose action is
the default for PID 1: without a handler a stop would wait the whole grace for SIGKILL. So
install() runs first thing, and from then on SIGTERM raises TrainingStopped wherever the process
is (loading the model, tokenizing, growing, writing outputs), which unwinds through the usual
`finally` clean-ups and exits promptly.

Inside the training loop a stop must not land mid-step: there `deferred()` turns SIGTERM into a
flag that the loop reads at the end of a step, so that it writes a checkpoint of a whole step
first. A SIGTERM that arrived while deferred and was not acted on (the loop had already ended)
raises when the deferral ends.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Callable, Iterator

GRACE_SECONDS = 120  # SageMaker: SIGTERM, then SIGKILL this much later
# torchrun's own SIGTERM -> SIGKILL delay for its workers: inside the grace, with the margin that
# torchrun needs to reap the workers and exit before SageMaker's SIGKILL.
SHUTDOWN_TIMEOUT = GRACE_SECONDS - 10


class TrainingStopped(BaseException):
    """A stop was requested (SIGTERM). A BaseException, as KeyboardInterrupt is: an `except
    Exception` on the way up must not swallow it."""


_requested = False
_deferring: list[Callable[[], None]] = []  # innermost last: what SIGTERM calls instead of raising


def requested() -> bool:
    """Whether this process has received SIGTERM since install()."""
    return _requested


def install() -> None:
    """Handle SIGTERM from now on (raise TrainingStopped, or the deferral's callback)."""
    global _requested
    _requested = False
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    global _requested
    _requested = True
    if _deferring:
        _deferring[-1]()
        return
    raise TrainingStopped("stopped by SIGTERM")


@contextlib.contextmanager
def deferred(on_stop: Callable[[], None]) -> Iterator[None]:
    """Within the block SIGTERM calls on_stop() (which should set a flag) instead of raising.
    A SIGTERM received in the block that the block did not act on (it ended normally) raises
    TrainingStopped on the way out.

    Installs the handler if it is not in place yet (a trainer used outside the entry point), and
    puts back the one it found on the way out.
    """
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not _on_sigterm:
        signal.signal(signal.SIGTERM, _on_sigterm)
    received = []

    def on_sigterm() -> None:
        received.append(True)
        on_stop()

    _deferring.append(on_sigterm)
    try:
        yield
    finally:
        _deferring.pop()
        if previous is not _on_sigterm:
            signal.signal(signal.SIGTERM, previous)
    if received:
        raise TrainingStopped("stopped by SIGTERM")
