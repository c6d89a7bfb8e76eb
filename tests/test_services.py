"""The dashboard's service layer on a tiny local model: the allocation choices map onto the engine
(AMP's sequential adaptive search included), and the adaptive trace and options are recorded."""
from __future__ import annotations

import pytest

from hfprune_ui.services import SEQUENTIAL, allocations, engine_allocation


def test_allocation_choices_map_onto_the_engine():
    values = [value for _label, value in allocations()]
    assert values == ["uniform", "global", "adaptive", SEQUENTIAL]
    assert engine_allocation(SEQUENTIAL)[0] == "adaptive" and engine_allocation(SEQUENTIAL)[1].mode == "sequential"
    assert engine_allocation("adaptive")[1].mode == "independent"
    assert engine_allocation("global")[0] == "global"


@pytest.mark.parametrize("choice,mode", [("adaptive", "independent"), (SEQUENTIAL, "sequential")])
def test_dashboard_adaptive_prune_runs_the_chosen_search(tiny_services, choice, mode):
    services, session, folder = tiny_services
    assert services.plan(services.model(str(folder)), 0.5, choice, 1, None) is None  # the search runs on Prune
    variant, _ = services.prune(session, "entropy", 0.5, choice, 1, f"ad-{mode}")
    assert variant.meta["allocation"] == "adaptive" and variant.meta["adaptive"]["mode"] == mode
    assert variant.meta["allocation_options"]["mode"] == mode
    assert abs(1 - sum(variant.widths) / 128 - 0.5) <= 0.005
    assert len(variant.meta["adaptive"]["trace"]) == 2
    run = services.runs.load(variant.run_id)
    assert run.config["allocation"] == choice
