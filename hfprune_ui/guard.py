"""Turn engine errors into one clear notice, know whether a session's job is still running, and find
the caller's session id.

In a browser a user-fixable error becomes a toast (``gr.Warning``; a Stop becomes ``gr.Info``) and
the handler's outputs are left as they were, so no red "Error" box covers a dropdown or a table and
the user can fix the input and press the button again. API clients (``gradio_client`` marks its
requests with ``x-gradio-user: api``) still get an error they can catch.
"""
from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable

import gradio as gr

from core.errors import HFPruneError, Stopped

LOCAL_SESSION = "local"
API_USERS = ("api", "mcp")


def session_id(request: gr.Request | None) -> str:
    """Gradio's per-browser session hash (each gradio_client Client has its own), else 'local'."""
    return getattr(request, "session_hash", None) or LOCAL_SESSION


def is_api(request: gr.Request | None) -> bool:
    """True for programmatic clients (gradio_client, MCP), which want real errors, not toasts."""
    headers = getattr(request, "headers", None) or {}
    try:
        return str(headers.get("x-gradio-user", "")).lower() in API_USERS
    except AttributeError:
        return False


def _stopped(exc: BaseException) -> bool:
    return isinstance(exc, (Stopped, InterruptedError))


def message(exc: BaseException) -> str:
    """The one sentence to show for a user-fixable error; anything else is re-raised (a real bug)."""
    if _stopped(exc):
        text = str(exc).rstrip(".") or "The job was stopped"
        return f"Stopped: {text}. Nothing half-done was stored."
    if isinstance(exc, HFPruneError):
        return str(exc)
    if isinstance(exc, MemoryError) or _is_oom(exc):
        return "Out of memory: lower the number of samples or the sequence length."
    raise exc


def _is_oom(exc: BaseException) -> bool:
    """torch reports allocation failures as RuntimeError (CPU) or torch.OutOfMemoryError (CUDA)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class Activity:
    """How many handler steps of each session are running right now (a Stop waits for zero)."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._changed = threading.Condition()

    def begin(self, sid: str) -> None:
        with self._changed:
            self._counts[sid] = self._counts.get(sid, 0) + 1

    def end(self, sid: str) -> None:
        with self._changed:
            self._counts[sid] = max(0, self._counts.get(sid, 0) - 1)
            if not self._counts[sid]:
                del self._counts[sid]
            self._changed.notify_all()

    def busy(self, sid: str) -> bool:
        with self._changed:
            return self._counts.get(sid, 0) > 0

    def wait_idle(self, sid: str, timeout: float) -> bool:
        """Block until no step of session ``sid`` runs (True) or ``timeout`` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._counts.get(sid, 0) > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True


ACTIVITY = Activity()

_ERRORS = (HFPruneError, InterruptedError, MemoryError, RuntimeError)


def _request(args: tuple, kwargs: dict) -> gr.Request | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, gr.Request):
            return value
    return None


def _notify(exc: BaseException, request: gr.Request | None) -> None:
    """Raise ``gr.Error`` for API clients; show a toast in the browser (the caller then skips its outputs)."""
    text = message(exc)
    if is_api(request):
        raise gr.Error(text, print_exception=False) from exc
    if _stopped(exc):
        gr.Info(text)
    else:
        gr.Warning(text)


def user_errors(fn: Callable) -> Callable:
    """Wrap a handler: user-fixable errors become a toast (browser) or ``gr.Error`` (API), the
    outputs stay as they were (``gr.skip()``), and every step counts as session activity (so Stop
    can say when the work has really ended). Keeps the signature, so Gradio still injects
    ``gr.Request`` / ``gr.Progress``, and keeps generators generators (rows already yielded stay)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            request = _request(args, kwargs)
            sid = session_id(request)
            steps = fn(*args, **kwargs)
            try:
                while True:
                    ACTIVITY.begin(sid)
                    try:
                        item = next(steps)
                    except StopIteration:
                        return
                    except _ERRORS as exc:
                        _notify(exc, request)
                        return
                    finally:
                        ACTIVITY.end(sid)
                    yield item
            finally:
                steps.close()
        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        request = _request(args, kwargs)
        sid = session_id(request)
        ACTIVITY.begin(sid)
        try:
            return fn(*args, **kwargs)
        except _ERRORS as exc:
            _notify(exc, request)
            return gr.skip()
        finally:
            ACTIVITY.end(sid)
    return wrapper
