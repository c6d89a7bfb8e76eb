"""The dashboard reaches the engine through one door (``hfprune_ui/services.py``): no tab takes the model
lock or imports an engine function that runs a model; what moved below the UI — the stability verdict,
rebuilding a model from a stored run, the tabs' model calls — behaves as it did in the tabs."""
from __future__ import annotations

import ast
import importlib
import threading
from pathlib import Path

import pytest
import torch

from core.measure.outputs import next_token_menus
from core.models.adapters import mlp_widths
from core.studies.report import rebuild_run_model
from core.studies.stability import Agreement, StabilityOptions, StabilityResult, stability_verdict
from hfprune_ui.tabs.inspect import draw_stability

ROOT = Path(__file__).resolve().parents[1]
TABS = sorted((ROOT / "hfprune_ui" / "tabs").glob("*.py"))
# engine packages whose functions mostly run a model; a tab may import their classes and constants, and these
# functions, which only compute on numbers or text
ENGINE = ("core.measure", "core.studies", "core.methods")
PURE = {"neuron_at_rank", "stability_verdict", "check_sweep_draws", "parse_ratios", "scoring_seconds",
        "sweep_seconds", "speed_seconds", "budgeted_speed_seconds", "zeroshot_seconds", "resolvable_difference",
        "separates",
        "describe_order", "row_label", "heal_seconds", "heal_parts", "heal_claims", "draw_claims", "draw_rows", "single_draw_claim"}
# the Vision tab still runs its encoders itself, under its own lock and cache (a separate change)
NOT_YET = {"vision.py"}


def test_no_tab_takes_the_model_lock():
    found = [f"{p.relative_to(ROOT)}:{n}" for p in TABS for n, line in enumerate(p.read_text().splitlines(), 1)
             if "model_lock" in line]
    assert not found, f"tabs that name the model lock (call a Services method instead): {found}"


def test_tabs_import_no_engine_function_that_runs_a_model():
    bad = []
    for path in TABS:
        if path.name in NOT_YET:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(ENGINE)):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                value = getattr(module, alias.name)
                if callable(value) and not isinstance(value, type) and alias.name not in PURE:
                    bad.append(f"{path.name}: {node.module}.{alias.name}")
    assert not bad, f"tabs calling the engine past Services: {bad}"


def _agreement(rho: float, layers: int = 2) -> Agreement:
    return Agreement(pairs=1, rho=[rho] * layers, rho_min=[rho] * layers, rho_max=[rho] * layers,
                     overlap={"0.2": [0.5] * layers}, overlap_min={"0.2": [0.5] * layers}, mean_rho=rho,
                     mean_overlap={"0.2": 0.5})


def _result(within: dict[str, float], across: dict[str, float]) -> StabilityResult:
    return StabilityResult(list(within), 3, [0.2], 2, {k: _agreement(v) for k, v in within.items()},
                           {k: _agreement(v) for k, v in across.items()}, {"model": "tiny"})


def test_stability_verdict_judges_criteria_against_draw_noise():
    apart = stability_verdict(_result({"entropy": 0.9, "cross_entropy": 0.8}, {"entropy|cross_entropy": 0.5}))
    assert apart.noise == 0.8 and apart.closest == 0.5 and apart.beyond_noise
    assert apart.sentence() == "the criteria differ more than two draws of one criterion do."
    close = stability_verdict(_result({"entropy": 0.9, "cross_entropy": 0.8}, {"entropy|cross_entropy": 0.85}))
    assert not close.beyond_noise
    assert close.sentence("**") == ("the criteria differ **no more** than two calibration draws do: their "
                                    "difference is within calibration noise.")
    assert stability_verdict(_result({"entropy": 0.9}, {})) is None  # one criterion: nothing to judge


def test_stability_result_round_trips_and_the_tab_shows_the_verdict():
    result = _result({"entropy": 0.9, "cross_entropy": 0.8}, {"entropy|cross_entropy": 0.5})
    stored = {**result.to_dict(), "summary": result.summary(), "run_id": "r1"}
    assert StabilityResult.from_dict(stored) == result
    status = draw_stability(stored, "0.2")[0]
    assert "→ the criteria differ **more** than two draws of one criterion do." in status
    assert status.endswith("(3 disjoint draws; run `r1`)")


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("compensate", [0, 2])
def test_a_stored_prune_run_rebuilds_the_pruned_model(tiny_services, compensate):
    services, session, folder = tiny_services
    variant, _ = services.prune(session, "entropy", 0.25, "uniform", 1, "cut", compensate_windows=compensate)
    run = services.runs.load(variant.run_id)
    rebuilt = rebuild_run_model(run, services.model(str(folder)), services.runs, progress=False)
    assert mlp_widths(rebuilt) == variant.widths
    torch.testing.assert_close(_logits(rebuilt), _logits(variant.model))
    assert services.load_run(session, variant.run_id).startswith("Loaded pruned variant 'cut'")


def test_the_services_door_takes_the_lock_and_gives_the_tabs_results(tiny_services):
    services, session, folder = tiny_services
    services.prune(session, "entropy", 0.25, "uniform", 1, "cut")
    lock_free = []

    def probe():  # another thread can take the lock once a door method has returned
        lock_free.append(services.model_lock.acquire(timeout=5))
        services.model_lock.release()

    menu = services.menus(session, ["cut"], "The history of", 5)
    loaded = services.model(str(folder))
    direct = next_token_menus(services.models_for(session, ["cut"]), loaded.tokenizer, "The history of", 5)
    assert menu.tokens == direct.tokens and menu.probs == direct.probs
    kl = services.token_kl(session, "cut", "The history of the city")
    assert len(kl.kl) == len(kl.tokens) and kl.mean >= 0 and kl.kl[0] is None
    report = services.neuron(session, str(folder), session.data, 0, 3, top_k=2)
    assert (report.layer, report.index) == (0, 3) and [r.criterion for r in report.criteria] == ["entropy"]
    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    assert lock_free == [True]


def test_stability_through_services_stores_a_run(tiny_services):
    services, session, folder = tiny_services
    data = services.data_spec("wiki", None, 2, 16, 0)
    options = StabilityOptions(draws=2, samples=2, seq_len=16, seed=0, source=data.source, batch_size=2)
    out = services.stability(session, str(folder), data, ["entropy", "magnitude"], options, ratios=[0.2])
    run = services.runs.load(out["run_id"])
    assert run.kind == "stability" and run.config["criteria"] == ["entropy", "magnitude"]
    assert run.config["session"] == session.session_id and StabilityResult.from_dict(out).draws == 2
