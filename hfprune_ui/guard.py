"""Turn engine errors into one clear UI message, and find the caller's session id."""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import gradio as gr

from core.errors import HFPruneError, Stopped

LOCAL_SESSION = "local"


def session_id(request: gr.Request | None) -> str:
    """Gradio's per-browser session hash (each gradio_client Client has its own), else 'local'."""
    return getattr(request, "session_hash", None) or LOCAL_SESSION


def _message(exc: BaseException) -> str:
    if isinstance(exc, Stopped):
        return f"Stopped: {exc} Nothing was stored."
    if isinstance(exc, HFPruneError):
        return str(exc)
    if isinstance(exc, MemoryError) or _is_oom(exc):
        return "Out of memory: lower the number of samples or the sequence length."
    raise exc


def _is_oom(exc: BaseException) -> bool:
    """torch reports allocation failures as RuntimeError (CPU) or torch.OutOfMemoryError (CUDA)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def user_errors(fn: Callable) -> Callable:
    """Re-raise user-fixable errors as ``gr.Error`` (shown in the UI); keeps the signature so
    Gradio still injects ``gr.Request`` / ``gr.Progress``, and keeps generators generators."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (HFPruneError, MemoryError, RuntimeError) as exc:
                raise gr.Error(_message(exc), print_exception=False) from exc
        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (HFPruneError, MemoryError, RuntimeError) as exc:
            raise gr.Error(_message(exc), print_exception=False) from exc
    return wrapper
