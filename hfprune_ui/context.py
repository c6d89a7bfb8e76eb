"""What the tab builders share: the services and the components other tabs read as inputs."""
from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr

from .guard import session_id
from .services import Services

MODEL_QUEUE = "model"  # one concurrency slot for every event that runs a shared model


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


def criterion_params(temperature: float, alpha: float, weight: float) -> dict:
    """Form values → the engine's criterion parameters (each criterion uses only its own)."""
    return {"temperature": float(temperature), "alpha": float(alpha), "weight": float(weight)}


def stop_on_click(services: Services, button: gr.Button, status: gr.components.Component, events: list,
                  api_name: str | None = None) -> None:
    """Wire a Stop button: cancel ``events`` and set the session's job flag, which the engine checks
    after every calibration window, so the running computation itself ends (nothing half-done is stored)."""
    def stop(request: gr.Request = None) -> str:
        services.sessions.get(session_id(request)).stop.set()
        return "Stopping… results that were not finished are not stored."

    extra = {"api_name": api_name} if api_name else {"api_visibility": "private"}
    button.click(stop, None, status, cancels=events, queue=False, **extra)


def model_events() -> dict:
    """Event kwargs for handlers that run a model: queued, one at a time, shared slot."""
    return {"concurrency_limit": 1, "concurrency_id": MODEL_QUEUE}
