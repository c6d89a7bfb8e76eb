"""What the tab builders share: the services, the components other tabs read as inputs, the status
line every action refreshes, and the Stop wiring."""
from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import gradio as gr

from core.importance.criteria import parameter_knobs

from .guard import ACTIVITY, session_id
from .services import Services
from .status import make_refresh

MODEL_QUEUE = "model"  # one concurrency slot for every event that runs a shared model
STOP_WAIT_S = 120.0  # how long a Stop waits for the engine to reach its next stop check

# Gradio recognises a handler's progress argument by its default value; one shared default is enough
# (Gradio makes a fresh tracker per call). TRACK follows the engine's tqdm bars, PLAIN does not.
TRACK = gr.Progress(track_tqdm=True)
PLAIN = gr.Progress()


@dataclass
class Ctx:
    services: Services
    components: dict[str, gr.components.Component] = field(default_factory=dict)

    def __getitem__(self, name: str) -> gr.components.Component:
        return self.components[name]

    def add(self, **components: gr.components.Component) -> None:
        self.components.update(components)

    @property
    def data_inputs(self) -> list[gr.components.Component]:
        """Model + calibration inputs, in the order ``model_and_data`` expects them."""
        return [self[n] for n in ("model", "source", "upload", "samples", "seq_len", "seed")]

    @property
    def criterion_inputs(self) -> list[gr.components.Component]:
        """Every criterion knob's control, in :data:`CRITERION_KNOBS` order (see :func:`with_criterion_knobs`)."""
        return [self[knob_key(c, name)] for c, _cls, name in CRITERION_KNOBS]

    def after(self, event) -> None:
        """Refresh the status line (and show pending notices) once ``event`` has finished, however it ended."""
        if "status_line" in self.components:
            event.then(make_refresh(self.services), None, self["status_line"], api_visibility="private",
                       concurrency_limit=None, show_progress="hidden")  # queued: its toasts need the event stream


# Every tunable criterion parameter, read from the engine's registry: each criterion declares its knobs
# once on its Params class, and the controls, their ranges and the handlers' values all follow from it.
CRITERION_KNOBS = parameter_knobs()


def knob_key(criterion: str, field: str) -> str:
    return f"knob:{criterion}.{field}"


def criterion_controls() -> dict[str, gr.components.Component]:
    """One control per criterion knob (slider, or dropdown for a choice), range and help from its Params."""
    controls = {}
    for criterion, cls, name in CRITERION_KNOBS:
        spec = cls.ui(name)
        label = f"{criterion}: {name.replace('_', ' ')}"
        if "choices" in spec:
            controls[knob_key(criterion, name)] = gr.Dropdown(label=label, **spec)
        else:
            controls[knob_key(criterion, name)] = gr.Slider(label=label, **spec)
    return controls


def with_criterion_knobs(fn: Callable) -> Callable:
    """Let a handler take every criterion knob as one ``criterion_knobs`` argument, a dict
    {criterion: {field: value}}. Gradio passes inputs positionally, so the function Gradio inspects
    has one positional parameter per knob in that argument's place (wire them with
    ``*ctx.criterion_inputs`` there); adding a knob to a criterion's Params changes no handler."""
    signature = inspect.signature(fn)
    params = list(signature.parameters.values())
    at = [p.name for p in params].index("criterion_knobs")
    # a slot needs a default only where a parameter before it has one (Python's signature rule)
    default = None if any(p.default is not p.empty for p in params[:at]) else inspect.Parameter.empty
    slots = [inspect.Parameter(f"criterion_knob_{i}", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
             for i in range(len(CRITERION_KNOBS))]
    expanded = signature.replace(parameters=[*params[:at], *slots, *params[at + 1:]])

    def pack(args: tuple, kwargs: dict) -> dict:
        bound = expanded.bind(*args, **kwargs)
        values: dict[str, dict] = {}
        for i, (criterion, _cls, name) in enumerate(CRITERION_KNOBS):
            value = bound.arguments.pop(f"criterion_knob_{i}", None)
            if value is not None:
                values.setdefault(criterion, {})[name] = value
        bound.arguments["criterion_knobs"] = values
        return bound.arguments

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            yield from fn(**pack(args, kwargs))
    else:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(**pack(args, kwargs))
    wrapper.__signature__ = expanded
    return wrapper


def make_stop(services: Services, what: str = "job", kept: Callable[[str], str] | None = None):
    """Stop handler: set the session's job flag (the engine checks it after every window, batch, probe
    or repeat), then wait until the work has really ended and say so; ``kept(session id)``, when given,
    adds what stays (e.g. '2 of 4 models were measured; their rows stay in the table.')."""
    def stop(request: gr.Request = None):
        sid = session_id(request)
        services.sessions.get(sid).stop.set()
        if not ACTIVITY.busy(sid):
            yield f"Nothing was running; the {what} is idle."
            return
        yield f"Stopping the {what}…"
        started = time.monotonic()
        if ACTIVITY.wait_idle(sid, STOP_WAIT_S):
            after = kept(sid) if kept is not None else ""
            yield (f"Stopped the {what} ({time.monotonic() - started:.1f} s after the click). Results that were "
                   "not finished were not stored; " + (after or "rows already shown stay."))
        else:
            yield f"Still stopping after {STOP_WAIT_S:.0f} s: the engine has not reached its next stop check yet."
    return stop


def stop_on_click(services: Services, button: gr.Button, status: gr.components.Component, events: list,
                  api_name: str | None = None, what: str = "job", kept: Callable[[str], str] | None = None) -> None:
    """Wire a Stop button: cancel ``events`` that are still waiting in the queue, set the session's
    job flag so the running computation itself ends (nothing half-done is stored), and report in
    ``status`` when it really has ended (with ``kept``'s sentence, see :func:`make_stop`)."""
    extra = {"api_name": api_name} if api_name else {"api_visibility": "private"}
    button.click(make_stop(services, what, kept), None, status, cancels=events, concurrency_limit=None,
                 show_progress="hidden", **extra)


def model_events() -> dict:
    """Event kwargs for handlers that run a model: queued, one at a time, shared slot."""
    return {"concurrency_limit": 1, "concurrency_id": MODEL_QUEUE}
