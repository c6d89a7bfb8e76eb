"""What the tab builders share: the services, the components other tabs read as inputs, the status
line every action refreshes, and the Stop wiring."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import gradio as gr

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
        """The criterion knobs (self_distill τ and α, entropy+ce w), in ``criterion_params`` order."""
        return [self[n] for n in ("temperature", "alpha", "weight")]

    def after(self, event) -> None:
        """Refresh the status line (and show pending notices) once ``event`` has finished, however it ended."""
        if "status_line" in self.components:
            event.then(make_refresh(self.services), None, self["status_line"], api_visibility="private",
                       concurrency_limit=None, show_progress="hidden")  # queued: its toasts need the event stream


def criterion_params(temperature: float, alpha: float, weight: float) -> dict:
    """Form values → the engine's criterion parameters (each criterion uses only its own)."""
    return {"temperature": float(temperature), "alpha": float(alpha), "weight": float(weight)}


def make_stop(services: Services, what: str = "job"):
    """Stop handler: set the session's job flag (the engine checks it after every window, batch, probe
    or repeat), then wait until the work has really ended and say so."""
    def stop(request: gr.Request = None):
        sid = session_id(request)
        services.sessions.get(sid).stop.set()
        if not ACTIVITY.busy(sid):
            yield f"Nothing was running; the {what} is idle."
            return
        yield f"Stopping the {what}…"
        started = time.monotonic()
        if ACTIVITY.wait_idle(sid, STOP_WAIT_S):
            yield (f"Stopped the {what} ({time.monotonic() - started:.1f} s after the click). Results that were "
                   "not finished were not stored; rows already shown stay.")
        else:
            yield f"Still stopping after {STOP_WAIT_S:.0f} s: the engine has not reached its next stop check yet."
    return stop


def stop_on_click(services: Services, button: gr.Button, status: gr.components.Component, events: list,
                  api_name: str | None = None, what: str = "job") -> None:
    """Wire a Stop button: cancel ``events`` that are still waiting in the queue, set the session's
    job flag so the running computation itself ends (nothing half-done is stored), and report in
    ``status`` when it really has ended."""
    extra = {"api_name": api_name} if api_name else {"api_visibility": "private"}
    button.click(make_stop(services, what), None, status, cancels=events, concurrency_limit=None,
                 show_progress="hidden", **extra)


def model_events() -> dict:
    """Event kwargs for handlers that run a model: queued, one at a time, shared slot."""
    return {"concurrency_limit": 1, "concurrency_id": MODEL_QUEUE}
