"""Stop checks for long jobs (one spelling of "did the user press Stop?") and terminal hygiene.

Every long engine loop takes ``stop: Callable[[], bool] | None`` and calls ``check_stop(stop, ...)``
between units of work (a batch, a row, a layer probe); a true answer raises ``errors.Stopped``.
"""
from __future__ import annotations

import logging
from typing import Callable

from core.errors import Stopped

StopCheck = Callable[[], bool]

# Third-party loggers whose messages say nothing a user can act on: torchao's optional CUDA kernels
# that cannot load on this machine ("Failed to load …_C_mxfp8…"; transformers imports torchao whenever
# it is installed, even to load a plain model) and the torch.utils._pytree deprecation notices that
# torchao's import triggers.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def check_stop(stop: StopCheck | None, message: str = "The job was stopped.") -> None:
    """Raise ``Stopped(message)`` when ``stop`` is given and returns true; otherwise do nothing."""
    if stop is not None and stop():
        raise Stopped(message)


def quiet_third_party(progress_bars: bool = True) -> None:
    """Silence the ``QUIET_LOGGERS`` below errors; ``progress_bars=False`` also hides transformers'
    own bars ("Loading weights …"). Called by the CLI and the dashboard entry point."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if not progress_bars:
        from transformers.utils import logging as hf_logging  # heavy; only when asked

        hf_logging.disable_progress_bar()
