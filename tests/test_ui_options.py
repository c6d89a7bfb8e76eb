"""The dashboard's criterion controls come from the engine's Params declarations: one control per
knob with the declared range, and handlers receive them as one dict whatever the number of knobs."""
from __future__ import annotations

import inspect

import gradio as gr
from gradio.helpers import special_args

from core.importance.criteria import REGISTRY, parameter_knobs
from hfprune_ui.context import CRITERION_KNOBS, criterion_controls, with_criterion_knobs


def test_one_control_per_declared_knob_with_its_range():
    knobs = parameter_knobs()
    assert ("self_distill", REGISTRY["self_distill"].Params, "temperature") in knobs
    assert ("fisher", REGISTRY["fisher"].Params, "draws") in knobs
    with gr.Blocks():
        controls = criterion_controls()
    assert len(controls) == len(knobs) == len(CRITERION_KNOBS)
    temperature = controls["knob:self_distill.temperature"]
    assert temperature.minimum == 0.05 and temperature.maximum == 1.0 and temperature.value == 0.5
    assert controls["knob:fisher.aggregate"].choices[0][0] == "sq_sum"


def test_handlers_get_one_dict_and_gradio_still_injects_the_request():
    seen = {}

    @with_criterion_knobs
    def handler(criterion: str, criterion_knobs: dict, layers: list | None, request: gr.Request = None):
        seen.update(criterion=criterion, knobs=criterion_knobs, layers=layers, request=request)
        return "ok"

    names = list(inspect.signature(handler).parameters)
    assert names[0] == "criterion" and names[-2:] == ["layers", "request"]
    assert len(names) == 3 + len(CRITERION_KNOBS)
    values = [0.3 if name == "temperature" else None for _c, _cls, name in CRITERION_KNOBS]
    inputs, *_ = special_args(handler, ["entropy", *values, [1]], request="REQ")
    assert handler(*inputs) == "ok"
    assert seen == {"criterion": "entropy", "knobs": {"self_distill": {"temperature": 0.3}}, "layers": [1],
                    "request": "REQ"}
