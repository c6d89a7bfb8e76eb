"""What the tab builders share: the services and the components other tabs read as inputs."""
from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr

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


def model_events() -> dict:
    """Event kwargs for handlers that run a model: queued, one at a time, shared slot."""
    return {"concurrency_limit": 1, "concurrency_id": MODEL_QUEUE}
