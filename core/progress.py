"""Stop checks for long jobs: one spelling of "did the user press Stop?".

Every long engine loop takes ``stop: Callable[[], bool] | None`` and calls ``check_stop(stop, ...)``
between units of work (a batch, a row, a layer probe); a true answer raises ``errors.Stopped``.
"""
from __future__ import annotations

from typing import Callable

from .errors import Stopped

StopCheck = Callable[[], bool]


def check_stop(stop: StopCheck | None, message: str = "The job was stopped.") -> None:
    """Raise ``Stopped(message)`` when ``stop`` is given and returns true; otherwise do nothing."""
    if stop is not None and stop():
        raise Stopped(message)
