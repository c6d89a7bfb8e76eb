"""The Tour tells the truth: every comparative sentence it shows is generated from the numbers shown
beside it and agrees with them — which criterion's cut is closer, whether the gap is inside the
calibration noise, whether the refit and the recovery helped, whose favourite token is first.

The checkers below recompute each fact from the raw numbers (each draw's KL, each model's KL and
menu), independently of the code that wrote the sentence, and compare it with what the sentence
says — both its structured facts (:class:`core.studies.claims.Claim`) and its words."""
from __future__ import annotations

import importlib
import json
import math
import re
import statistics
import sys
from pathlib import Path

import pytest

from core.studies.claims import Claim, heal_claims, percent, words
from core.studies.stability import draw_claims, draw_rows, load_tour_draws, single_draw_claim, tour_draws

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "tour" / "draws.json"
RESULT = ROOT / "benchmarks" / "results" / "stability.json"
NOISE_WORDS = ("inside the calibration noise", "beyond the calibration noise")


# -- independent checkers -------------------------------------------------------------------------------
def _kl(asset: dict) -> dict[tuple[str, float], list[float]]:
    return {(r["criterion"], r["ratio"]): r["kl_draws"] for r in asset["fidelity"]}


def check_draw_claim(claim: Claim, asset: dict) -> None:
    """A per-ratio sentence: direction of the means, wins per paired draw, ranges overlapping or not."""
    kl = _kl(asset)
    better, worse = kl[(claim.better, claim.ratio)], kl[(claim.worse, claim.ratio)]
    assert statistics.mean(better) < statistics.mean(worse), claim.text
    overlap = not (max(better) < min(worse) or max(worse) < min(better))
    wins = sum(b < w for b, w in zip(better, worse))
    assert claim.inside_noise == overlap and claim.every_draw == (wins == len(better)), claim.text
    assert claim.text.startswith(f"At {percent(claim.ratio)}, {words(claim.better)}'s cut is on average "), claim.text
    gap = (statistics.mean(worse) - statistics.mean(better)) / statistics.mean(worse)
    assert f"{percent(gap, 1)} closer" in claim.text
    assert (NOISE_WORDS[0] in claim.text) == overlap and (NOISE_WORDS[1] in claim.text) == (not overlap)
    if wins < len(better):
        assert f"closer in only {wins} of the {len(better)} draws" in claim.text
    else:
        assert "closer in every one of them" in claim.text


def check_overlap_claim(claim: Claim, asset: dict) -> None:
    shared = asset["overlap"][f"{claim.ratio:g}"]
    across, within = max(shared["criteria"].values()), shared["draws"].values()
    expected = "text" if across > max(within) else "criterion" if across < min(within) else "neither"
    assert claim.values["bigger"] == expected, claim.text
    assert f"remove {percent(across)} of the same neurons" in claim.text
    if expected == "text":
        assert "which text you calibrate on changes the cut more than which of the two criteria" in claim.text


def check_ratio_claim(claim: Claim, asset: dict) -> None:
    kl = _kl(asset)
    low, high = min(asset["ratios"]), max(asset["ratios"])
    a, b = asset["criteria"][:2]
    growth = min(statistics.mean(kl[(n, high)]) / statistics.mean(kl[(n, low)]) for n in (a, b))
    gap = max(abs(statistics.mean(kl[(a, r)]) - statistics.mean(kl[(b, r)]))
              / max(statistics.mean(kl[(a, r)]), statistics.mean(kl[(b, r)])) for r in asset["ratios"])
    more = growth - 1 > gap
    assert claim.values["ratio_more"] == more
    assert ("moves the price far more than" in claim.text) == more, claim.text


def check_single_claim(claim: Claim, live: dict[str, float], asset: dict) -> None:
    """The live one-draw sentence: its direction is the live table's; 'opposite' exactly when the draws'
    average points the other way; 'inside the noise' only where the draws overlap."""
    better = min(live, key=live.get)
    assert claim.better == better, claim.text
    assert re.search(rf"\) {re.escape(words(better))}'s cut came out closer", claim.text), claim.text
    kl = _kl(asset)
    a, b = asset["criteria"][:2]
    mean_better = a if statistics.mean(kl[(a, claim.ratio)]) < statistics.mean(kl[(b, claim.ratio)]) else b
    agrees = better == mean_better
    assert claim.values["agrees"] == agrees
    assert ("the opposite of the average" in claim.text) == (not agrees), claim.text
    if not agrees:
        assert "can go either way" in claim.text
    overlap = not (max(kl[(a, claim.ratio)]) < min(kl[(b, claim.ratio)])
                   or max(kl[(b, claim.ratio)]) < min(kl[(a, claim.ratio)]))
    assert claim.inside_noise == overlap
    assert ("inside the calibration noise" in claim.text) == (agrees and overlap), claim.text


def check_draw_claims(asset: dict, focus: float | None = None) -> list[Claim]:
    claims = draw_claims(asset, focus)
    kinds = [c.kind for c in claims]
    assert kinds.count("draws") == len(asset["ratios"]) and "overlap" in kinds
    assert ("ratio" in kinds) == (len(asset["ratios"]) > 1)
    for claim in claims:
        {"draws": check_draw_claim, "overlap": check_overlap_claim, "ratio": check_ratio_claim}[claim.kind](claim, asset)
    return claims


def check_heal_claims(claims: list[Claim], kl: dict[str, float], top1: dict[str, tuple[str, float]],
                      names: tuple[str, str, str, str], gap: float | None) -> None:
    """Refit / recovery direction from the KL numbers; the menu sentence from each model's top token."""
    original, cut, refit, recovered = names
    for claim in claims:
        if claim.kind == "heal":
            assert kl[claim.better] < kl[claim.worse], claim.text
            step = {cut: refit, refit: recovered}
            helped = step.get(claim.worse) == claim.better  # the later model is the closer one
            assert helped or step.get(claim.better) == claim.worse, claim.text
            assert (" down " in claim.text) == helped and ("did not" in claim.text) == (not helped), claim.text
            assert f"{kl[claim.better]:.3f}" in claim.text and f"{kl[claim.worse]:.3f}" in claim.text
        elif claim.kind == "scale":
            gain = (kl[cut] - kl[refit]) / kl[cut]
            assert (claim.better == "refit") == (gain > gap) and ("bigger step" in claim.text) == (gain > gap)
        elif claim.kind == "menu":
            favourite = top1[original][0]
            for token, share in top1.values():
                assert f"{token!r}" in claim.text and percent(share) in claim.text
            lost = top1[cut][0] != favourite
            back = next((n for n in (refit, recovered) if n in top1 and top1[n][0] == favourite), None) if lost else None
            assert claim.values["back"] == back
            assert ("is back on top" in claim.text) == (back is not None), claim.text
            if back is not None:
                assert f"{favourite!r} is back on top after {'the refit' if back == refit else 'recovery'}" in claim.text
    assert [c.kind for c in claims].count("heal") == (refit in kl) + (recovered in kl)


# -- constructed numbers --------------------------------------------------------------------------------
def asset_of(kl: dict[str, dict[float, list[float]]], overlap: dict[float, tuple[float, dict[str, float]]]) -> dict:
    rows = [{"criterion": c, "ratio": r, "allocation": "uniform", "draws": len(v), "kl_mean": statistics.mean(v),
             "kl_std": statistics.stdev(v), "kl_min": min(v), "kl_max": max(v), "kl_draws": v}
            for c, by in kl.items() for r, v in by.items()]
    criteria = list(kl)
    return {"criteria": criteria, "ratios": sorted({r for by in kl.values() for r in by}), "draws": 4,
            "fidelity": rows, "overlap": {f"{r:g}": {"criteria": {"|".join(criteria): a}, "draws": w, "chance": r}
                                          for r, (a, w) in overlap.items()}}


INSIDE = {"entropy": {0.3: [1.00, 1.10, 1.05, 0.98]}, "cross_entropy": {0.3: [1.02, 1.06, 1.12, 1.01]}}
BEYOND = {"entropy": {0.3: [1.00, 1.01, 0.99, 1.02]}, "cross_entropy": {0.3: [1.20, 1.25, 1.22, 1.19]}}
EVERY_BUT_OVERLAP = {"entropy": {0.3: [1.00, 1.20, 1.10, 1.05]}, "cross_entropy": {0.3: [1.01, 1.22, 1.12, 1.06]}}
CE_BETTER = {"entropy": {0.2: [0.7, 0.72, 0.71, 0.73], 0.3: [1.3, 1.35, 1.32, 1.31]},
             "cross_entropy": {0.2: [0.6, 0.61, 0.62, 0.6], 0.3: [1.0, 1.34, 1.1, 1.02]}}


@pytest.mark.parametrize("kl", [INSIDE, BEYOND, EVERY_BUT_OVERLAP, CE_BETTER],
                         ids=["inside-noise", "beyond-noise", "every-draw-but-overlapping", "cross-entropy-better"])
def test_the_draw_sentences_agree_with_constructed_numbers(kl):
    overlap = {r: (0.8, {"entropy": 0.7, "cross_entropy": 0.72}) for by in kl.values() for r in by}
    asset = asset_of(kl, overlap)
    claims = check_draw_claims(asset, 0.3)
    mid = next(c for c in claims if c.kind == "draws" and c.ratio == 0.3)
    expected = {id(INSIDE): (True, "entropy"), id(BEYOND): (False, "entropy"), id(EVERY_BUT_OVERLAP): (True, "entropy"),
                id(CE_BETTER): (True, "cross_entropy")}[id(kl)]
    assert (mid.inside_noise, mid.better) == expected
    if kl is EVERY_BUT_OVERLAP:
        assert mid.every_draw and "the gap is still inside the calibration noise" in mid.text


def test_the_overlap_sentence_follows_which_overlap_is_larger():
    for across, within, bigger in ((0.8, {"e": 0.7, "c": 0.6}, "text"), (0.5, {"e": 0.7, "c": 0.6}, "criterion"),
                                   (0.65, {"e": 0.7, "c": 0.6}, "neither")):
        asset = asset_of(INSIDE, {0.3: (across, within)})
        [claim] = [c for c in draw_claims(asset, 0.3) if c.kind == "overlap"]
        assert claim.values["bigger"] == bigger
        check_overlap_claim(claim, asset)


@pytest.mark.parametrize("live", [{"entropy": 1.27, "cross_entropy": 1.147}, {"entropy": 1.10, "cross_entropy": 1.20}])
@pytest.mark.parametrize("kl", [INSIDE, BEYOND], ids=["inside", "beyond"])
def test_the_live_one_draw_sentence_says_when_it_contradicts_the_draws(live, kl):
    asset = asset_of(kl, {0.3: (0.8, {"entropy": 0.7, "cross_entropy": 0.7})})
    numbers = {c: {"kl": v, "perplexity": 100 * v} for c, v in live.items()}
    claim = single_draw_claim(numbers, asset, 0.3, 8, 64)
    check_single_claim(claim, live, asset)
    if live["cross_entropy"] < live["entropy"]:  # the issue's case: one draw favours cross-entropy
        assert "one draw of 512 tokens can go either way" in claim.text and "calibration-draw numbers" in claim.text


HEAL_CASES = [
    ({"cut": 1.17, "refit": 0.85, "recovered": 0.62},
     {"original": (" Paris", 0.77), "cut": (" the", 0.2), "refit": (" the", 0.25), "recovered": (" Paris", 0.4)}),
    ({"cut": 1.17, "refit": 0.85, "recovered": 0.90},
     {"original": (" Paris", 0.77), "cut": (" the", 0.2), "refit": (" Paris", 0.3), "recovered": (" Paris", 0.35)}),
    ({"cut": 1.17, "refit": 1.20, "recovered": 0.90},
     {"original": (" Paris", 0.77), "cut": (" the", 0.2), "refit": (" the", 0.3), "recovered": (" a", 0.2)}),
    ({"cut": 1.17, "refit": 0.85},
     {"original": (" Paris", 0.77), "cut": (" Paris", 0.3), "refit": (" Paris", 0.5)}),
]


@pytest.mark.parametrize("kl,top1", HEAL_CASES, ids=["back-after-recovery", "back-after-refit", "refit-hurt",
                                                      "stopped-before-recovery"])
@pytest.mark.parametrize("gap", [0.041, 0.9])
def test_the_heal_sentences_agree_with_constructed_numbers(kl, top1, gap):
    quality = {n: {"kl": v, "perplexity": 100 * v, "top1": 0.6} for n, v in kl.items()}
    names = ("original", "cut", "refit", "recovered")
    claims = heal_claims(quality, top1, minutes=1.0, names=names, criterion_gap=gap)
    check_heal_claims(claims, kl, top1, names, gap)


# -- the shipped numbers --------------------------------------------------------------------------------
def test_the_shipped_draw_sentences_agree_with_the_shipped_numbers():
    asset = load_tour_draws(SHIPPED)
    assert asset["precomputed"] is True and asset["draws"] >= 4 and asset["samples"] * asset["seq_len"] >= 2048
    claims = check_draw_claims(asset, 0.3)
    by_ratio = {c.ratio: c for c in claims if c.kind == "draws"}
    # the stability benchmark's finding: entropy lower on average at 20 / 30 / 40 %, beyond the noise only at 40 %
    assert [(r, c.better, c.inside_noise) for r, c in sorted(by_ratio.items())] == [
        (0.2, "entropy", True), (0.3, "entropy", True), (0.4, "entropy", False)]
    rows = {r["ratio"]: r for r in draw_rows(asset)}
    for ratio, claim in by_ratio.items():  # the table shown beside the sentences says the same
        assert rows[ratio]["outside_spread"] == (not claim.inside_noise)
        assert (rows[ratio]["kl_a"] < rows[ratio]["kl_b"]) == (claim.better == rows[ratio]["a"])


def test_the_issue_numbers_make_the_tour_say_one_draw_can_go_either_way():
    asset = load_tour_draws(SHIPPED)
    live = {"entropy": {"kl": 1.270, "perplexity": 100.9}, "cross_entropy": {"kl": 1.147, "perplexity": 91.6}}
    claim = single_draw_claim(live, asset, 0.3, 8, 64)
    check_single_claim(claim, {c: v["kl"] for c, v in live.items()}, asset)
    assert claim.better == "cross_entropy" and not claim.values["agrees"]


def test_the_shipped_draws_are_what_the_command_makes_from_the_stability_result(tmp_path, monkeypatch):
    result = json.loads(RESULT.read_text())
    shipped = json.loads(SHIPPED.read_text())
    assert tour_draws(result) == shipped
    assert shipped["made_by"] == "python benchmarks/stability.py --write-tour"
    assert shipped["measured_by"] == result["command"]
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = importlib.import_module("stability")
    try:
        target = tmp_path / "draws.json"
        bench.write_tour(RESULT, target)
        assert target.read_bytes() == SHIPPED.read_bytes()
    finally:
        sys.modules.pop("stability", None)


# -- the Tour on the real model -------------------------------------------------------------------------
def _number(cell) -> float:
    return float(str(cell).split()[0])


def check_step4_output(out: tuple, services) -> None:
    """Step 4's live table, live sentence, draws table and draws sentences agree with each other."""
    from hfprune_ui.tabs.tour import ASSETS, RATIO

    frame, live_sentence, table, sentences = out[0], out[7], out[9], out[10]
    live = {r["criterion"]: r["KL to original (nats/token)"] for r in frame.to_dict("records")}
    assert all(r["scores from"] == "this one draw, 8 × 64" for r in frame.to_dict("records"))
    asset = services.tour_draws(ASSETS)
    check_single_claim(single_draw_claim(
        {c: {"kl": v, "perplexity": 0.0} for c, v in live.items()}, asset, RATIO, 8, 64), live, asset)
    better = min(live, key=live.get)
    assert re.search(rf"\) {re.escape(words(better))}'s cut came out closer", live_sentence), live_sentence
    shown = {r["removed"]: r for r in table.to_dict("records")}
    closer30 = shown["30 %"]["closer on average"].split(",")[0]
    assert ("the opposite of the average" in live_sentence) == (closer30 != better), live_sentence
    lines = [line[2:] for line in sentences.splitlines() if line.startswith("- ")]
    claims = check_draw_claims(asset, RATIO)
    assert lines == [c.text for c in claims]
    for line in lines:  # each per-ratio sentence against the table row beside it
        match = re.match(r"At (\d+) %, ([\w-]+)'s cut is on average", line)
        if match:
            row = shown[f"{match.group(1)} %"]
            assert words(row["closer on average"].split(",")[0]) == match.group(2), line
            assert ("inside the calibration noise" in line) == row["ranges overlap"].startswith("yes"), line


def check_step6_output(text: str, table, plot) -> dict:
    """Step 6's sentences against its table (KL per model) and its menu plot (each model's top token)."""
    rows = {r["variant"]: r for r in table.to_dict("records")}
    kl = {n: r["KL to original (nats/token)"] for n, r in rows.items() if n != "original"}
    bars = {b["name"].split(" (H=")[0]: b for b in plot["data"]}
    top1 = {}
    for name, bar in bars.items():
        best = max(range(len(bar["y"])), key=lambda i: bar["y"][i])
        top1[name] = (bar["x"][best].replace("␣", " ").replace("⏎", "\n"), bar["y"][best])  # bars show ' ' as ␣
    names = tuple(rows)  # original, cut, refit, recovered
    lines = [line[2:] for line in text.splitlines() if line.startswith("- ")]
    refit_line = next(line for line in lines if line.startswith("The least-squares refit"))
    cut, refit, recovered = names[1:]
    assert ("down from" in refit_line) == (kl[refit] < kl[cut]), refit_line
    assert f"{kl[cut]:.3f}" in refit_line and f"{kl[refit]:.3f}" in refit_line
    recovery_line = next(line for line in lines if "of recovery" in line)
    assert ("took KL down from" in recovery_line) == (kl[recovered] < kl[refit]), recovery_line
    assert f"{kl[refit]:.3f}" in recovery_line and f"{kl[recovered]:.3f}" in recovery_line
    menu_line = next(line for line in lines if line.startswith("The original puts"))
    favourite = top1["original"][0]
    assert menu_line.startswith(f"The original puts '{favourite}' first ({percent(top1['original'][1])})")
    lost = top1[cut][0] != favourite
    back = next((n for n in (refit, recovered) if top1[n][0] == favourite), None) if lost else None
    assert ("is back on top" in menu_line) == (back is not None), menu_line
    return {"kl": kl, "perplexity": {n: r["perplexity"] for n, r in rows.items()}, "top1": top1, "lines": lines}


@pytest.mark.real
def test_the_tour_steps_4_and_6_say_what_their_tables_show(real, tmp_path, monkeypatch):
    from hfprune_ui.services import Services
    from hfprune_ui.tabs import tour

    monkeypatch.setattr(tour, "HEAL_MINUTES", 0.1)  # a 6-second recovery and a smaller refit keep it near 2 min
    monkeypatch.setattr(tour, "HEAL_WINDOWS", 16)
    services = Services(runs_root=tmp_path / "runs")
    services.models._models["smollm2-135m"] = real  # the session's loaded model, not a second copy
    text, estimate = tour.make_step1(services).__wrapped__()
    assert "**precomputed**" in text and "*Recompute* scores both criteria here: **about " in estimate
    check_step4_output(tour.make_step4(services).__wrapped__(), services)
    outputs = list(tour.make_step6(services).__wrapped__())
    assert outputs[0][0].startswith("Estimated time: **about ")
    text, table, plot = outputs[-1]
    found = check_step6_output(text, table, json.loads(plot.to_json()))
    print("\n".join(found["lines"]), found["kl"], found["perplexity"], found["top1"], sep="\n")
    assert math.isfinite(found["kl"][table["variant"].iloc[-1]])


# -- step 6's flow on a tiny model (no embedded model): sentences against its table, and Stop ------------
@pytest.fixture()
def tiny_tour(tiny_services, monkeypatch):
    """A tiny model standing in for the Tour's default, with its entropy cut of step 4 already made."""
    from hfprune_ui.tabs import tour

    services, session, folder = tiny_services
    monkeypatch.setattr(tour, "DEFAULT_MODEL", str(folder))
    monkeypatch.setattr(tour, "CRITERIA", ("entropy",))
    monkeypatch.setattr(tour, "HEAL_MINUTES", 0.02)
    monkeypatch.setattr(tour, "HEAL_WINDOWS", 2)
    services.prune(session, "entropy", tour.RATIO, "uniform", 1, tour.heal_names()["cut"], replace=True)
    return services, session, tour


def test_step6_measures_the_cut_the_refit_and_the_recovery_and_says_what_they_show(tiny_tour):
    services, session, tour = tiny_tour
    outputs = list(tour.make_step6(services).__wrapped__())
    assert outputs[0][0].startswith("Estimated time: **about ")
    text, table, plot = outputs[-1]
    assert list(table["model"]) == ["original", "the cut (step 4)", "+ least-squares refit", "+ recovery"]
    found = check_step6_output(text, table, json.loads(plot.to_json()))
    assert len(found["lines"]) >= 3 and set(tour.heal_names().values()) <= set(session.variants)
    again = list(tour.make_step6(services).__wrapped__())  # running it again remakes its own two variants
    assert list(again[-1][1]["variant"])[1:] == list(tour.heal_names().values())


def test_step6_stops_during_the_recovery_and_keeps_the_refit(tiny_tour):
    services, session, tour = tiny_tour
    steps = tour.make_step6(services).__wrapped__()
    for status, _table, _plot in steps:
        if "recovering the MLP weights" in status:
            session.stop.set()  # what the Stop button does
            break
    status, table, _ = list(steps)[-1]
    assert status.startswith("**Stopped** during the recovery") and list(table["model"])[-1] == "+ least-squares refit"
    assert tour.heal_names()["recovered"] not in session.variants
