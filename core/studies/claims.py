"""Comparative sentences made from numbers, each returned with the facts it states (:class:`Claim`), so
a teaching page, the CLI or a report can show them and a test can check every one against the numbers
shown beside it. :func:`heal_claims` says what a least-squares refit and a short recovery did to a cut;
the calibration-draw sentences live next to the stability verdict (:mod:`core.studies.stability`).

    claims = heal_claims({"cut": {...}, "refit": {...}, "recovered": {...}}, menus, minutes=1.0)
    text = " ".join(c.text for c in claims)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from core.paths import BENCHMARK_RESULTS


@dataclass(frozen=True)
class Claim:
    """One sentence and what it asserts. ``better`` is the side the sentence calls closer to the
    original (lower KL) and ``worse`` the other; ``inside_noise`` what it says about the draw-to-draw
    spread (None: it says nothing about it); ``every_draw`` whether it says "in every draw";
    ``values`` the numbers it cites, by name."""

    text: str
    kind: str  # 'draws' | 'overlap' | 'ratio' | 'single' | 'heal' | 'scale' | 'menu'
    ratio: float | None = None
    better: str | None = None
    worse: str | None = None
    inside_noise: bool | None = None
    every_draw: bool | None = None
    values: dict = field(default_factory=dict)


def words(name: str) -> str:
    """A criterion's name as prose: 'cross_entropy' → 'cross-entropy'."""
    return name.replace("_", "-")


def percent(fraction: float, digits: int = 0) -> str:
    """0.3 → '30 %'; 0.0412 with digits=1 → '4.1 %'."""
    return f"{100 * fraction:.{digits}f} %"


def minutes_words(minutes: float) -> str:
    """1 → 'One minute', 0.1 → '6 seconds', 2.5 → '2.5 minutes' (the start of a sentence)."""
    if minutes == 1:
        return "One minute"
    if minutes < 1:
        seconds = max(1, round(60 * minutes))
        return f"{seconds} second{'s' if seconds > 1 else ''}"
    return f"{minutes:g} minutes"


def heal_claims(quality: dict[str, dict], top1: dict[str, tuple[str, float]], *, minutes: float,
                names: tuple[str, str, str, str] = ("original", "cut", "refit", "recovered"),
                criterion_gap: float | None = None) -> list[Claim]:
    """What the refit and the recovery did, in sentences derived from the measurements.

    ``quality``: name → {"kl", "perplexity", "top1"} on the same held-out text, for the cut, the refit
    and (when it ran) the recovered model; ``top1``: name → (its most likely next token, probability)
    for the original and the same models; ``names``: the keys of (original, cut, refit, recovered);
    ``criterion_gap``: the average relative KL difference between the two criteria at this cut (from
    the calibration draws), which the refit's gain is set against."""
    original, cut, refit, recovered = names
    out: list[Claim] = []
    if cut in quality and refit in quality:
        before, after = quality[cut], quality[refit]
        helped = after["kl"] < before["kl"]
        text = (f"The least-squares refit brought the cut's KL to the original down from {before['kl']:.3f} to "
                f"{after['kl']:.3f} (perplexity {before['perplexity']:.1f} → {after['perplexity']:.1f}) without "
                "changing its size or speed." if helped else
                f"The least-squares refit did not bring this cut closer to the original: KL went from "
                f"{before['kl']:.3f} to {after['kl']:.3f}.")
        out.append(Claim(text, "heal", better=refit if helped else cut, worse=cut if helped else refit,
                         values={"kl_before": before["kl"], "kl_after": after["kl"]}))
        gain = (before["kl"] - after["kl"]) / before["kl"]
        if criterion_gap is not None and helped:
            bigger = gain > criterion_gap
            text = (f"That is a {'bigger' if bigger else 'smaller'} step than the choice of criterion: the refit "
                    f"moved KL by {percent(gain)}, the choice of criterion by {percent(criterion_gap, 1)} on average "
                    "over the calibration draws.")
            out.append(Claim(text, "scale", better="refit" if bigger else "criterion",
                             worse="criterion" if bigger else "refit",
                             values={"refit_gain": gain, "criterion_gap": criterion_gap}))
    if refit in quality and recovered in quality:
        before, after = quality[refit], quality[recovered]
        helped = after["kl"] < before["kl"]
        time = minutes_words(minutes)
        text = (f"{time} of recovery then took KL down from {before['kl']:.3f} to {after['kl']:.3f} (perplexity "
                f"{after['perplexity']:.1f}, top-1 agreement {percent(after['top1'])})." if helped else
                f"{time} of recovery did not lower KL: it went from {before['kl']:.3f} to {after['kl']:.3f}.")
        out.append(Claim(text, "heal", better=recovered if helped else refit, worse=refit if helped else recovered,
                         values={"kl_before": before["kl"], "kl_after": after["kl"]}))
    menu = menu_claim(top1, names)
    if menu is not None:
        out.append(menu)
    return out


def menu_claim(top1: dict[str, tuple[str, float]],
               names: tuple[str, str, str, str] = ("original", "cut", "refit", "recovered")) -> Claim | None:
    """Which token each model puts first, and where the original's favourite comes back on top (the
    first model after the cut, in the order of ``names``, whose favourite is the original's again)."""
    original, *rest = names
    if original not in top1:
        return None
    favourite, share = top1[original]
    shown = [n for n in rest if n in top1]
    if not shown:
        return None
    labels = {names[1]: "the plain cut", names[2]: "the refit", names[3]: "the recovered model"}
    parts = [f"{labels[n]}{' puts' if i == 0 else ''} {top1[n][0]!r}{' first' if i == 0 else ''} "
             f"({percent(top1[n][1])})" for i, n in enumerate(shown)]
    text = f"The original puts {favourite!r} first ({percent(share)}); " + ", ".join(parts) + "."
    back = None
    if shown[0] == names[1] and top1[shown[0]][0] != favourite:  # the cut lost it: where does it come back?
        back = next((n for n in shown[1:] if top1[n][0] == favourite), None)
        if back is not None:
            after = {names[2]: "the refit", names[3]: "recovery"}[back]
            text += f" {favourite!r} is back on top after {after}, at {percent(top1[back][1])}."
        else:
            text += f" {favourite!r} is not back on top in any of them."
    elif top1[shown[0]][0] == favourite:
        text += f" {labels[shown[0]].capitalize()} already keeps {favourite!r} first."
    return Claim(text, "menu", values={"favourite": favourite, "top1": {n: top1[n] for n in [original, *shown]},
                                       "back": back})


# ----------------------------------------------------------------------------------------------
# the recipe the Prune tab recommends, in sentences made from a stored benchmark result
# ----------------------------------------------------------------------------------------------

RECIPE_RESULT = "criteria_smollm2-135m.json"  # benchmarks/criteria.py's table on the embedded model


def recipe_evidence(rows: list[dict], setup: dict, criterion: str = "entropy") -> dict:
    """The numbers the recipe sentences cite, from a criteria-benchmark result (``rows`` with criterion,
    allocation, ratio, kl, alloc_s; ``setup`` with model, evaluation, compensation_statistics_s):
    ``{"model", "evaluation", "refit_seconds", "ratios": {ratio: {"uniform", "uniform+lsq", "adaptive+lsq",
    "adaptive_seconds"}}}`` for every ratio that has all three KL values."""
    cells: dict[float, dict] = {}
    for row in rows:
        if row.get("criterion") == criterion and row.get("allocation") in ("uniform", "uniform+lsq", "adaptive+lsq"):
            cell = cells.setdefault(round(float(row["ratio"]), 4), {})
            cell[row["allocation"]] = float(row["kl"])
            if row["allocation"] == "adaptive+lsq":
                cell["adaptive_seconds"] = float(row.get("alloc_s") or 0.0)
    ratios = {r: c for r, c in sorted(cells.items()) if {"uniform", "uniform+lsq", "adaptive+lsq"} <= set(c)}
    return {"model": setup.get("model", "?"), "evaluation": setup.get("evaluation", "?"), "criterion": criterion,
            "refit_seconds": setup.get("compensation_statistics_s"), "refit_text": setup.get("compensation", ""),
            "ratios": ratios}


def refit_claim(evidence: dict, source: str = RECIPE_RESULT) -> Claim | None:
    """What the default least-squares refit bought and cost on the benchmark's model (None without numbers)."""
    ratios = evidence.get("ratios") or {}
    if not ratios:
        return None
    gains = ", ".join(f"{c['uniform']:.3f} → {c['uniform+lsq']:.3f} at {percent(r)} "
                      f"({percent(c['uniform+lsq'] / c['uniform'] - 1)})" for r, c in ratios.items())
    cost = (f"Its statistics took {evidence['refit_seconds']:.0f} s of forward passes there "
            f"({evidence['refit_text'].split(': ', 1)[-1]}); " if evidence.get("refit_seconds") else "")
    text = (f"The least-squares refit is on by default. Measured on {evidence['model']} ({source}, KL to the "
            f"original on {evidence['evaluation']}, {words(evidence['criterion'])} scores, uniform widths): "
            f"{gains}. {cost}it costs nothing at deployment — same shapes, every export format reloads it.")
    better = all(c["uniform+lsq"] < c["uniform"] for c in ratios.values())
    return Claim(text, "recipe", better="uniform+lsq" if better else None, worse="uniform" if better else None,
                 values={"kl": {r: {"uniform": c["uniform"], "uniform+lsq": c["uniform+lsq"]}
                                for r, c in ratios.items()}, "refit_seconds": evidence.get("refit_seconds")})


def adaptive_claim(evidence: dict, source: str = RECIPE_RESULT) -> Claim | None:
    """The adaptive allocation as the recommended choice: its measured gain over uniform widths (both with
    the refit), what its search cost there, and what per-layer widths mean for the export."""
    ratios = evidence.get("ratios") or {}
    if not ratios:
        return None
    better = all(c["adaptive+lsq"] < c["uniform+lsq"] for c in ratios.values())
    gains = ", ".join(f"{c['uniform+lsq']:.3f} → {c['adaptive+lsq']:.3f} at {percent(r)} "
                      f"({percent(c['adaptive+lsq'] / c['uniform+lsq'] - 1)})" for r, c in ratios.items())
    searches = ", ".join(f"{c['adaptive_seconds']:.0f} s at {percent(r)}" for r, c in ratios.items()
                         if c.get("adaptive_seconds"))
    verdict = "Recommended: the **adaptive** allocation." if better else \
        "The adaptive allocation did not beat uniform widths at every measured ratio."
    text = (f"{verdict} Measured on {evidence['model']} ({source}, KL to the original on "
            f"{evidence['evaluation']}, {words(evidence['criterion'])} scores, both with the refit): uniform → "
            f"adaptive {gains}. Its price: a search on held-out calibration text before the cut"
            f"{f' ({searches} there, thorough settings)' if searches else ''}, and every layer gets its own "
            "width, so it cannot be saved as hf-native: export as hf-remote-code (reload with "
            "trust_remote_code=True), hf-padded (plain from_pretrained, but padded back to the widest layer: no "
            "size or speed gain) or GGUF (llama.cpp's per-layer 'deci' layout, Llama-family models). Uniform "
            "widths stay the default because they export everywhere.")
    return Claim(text, "recipe", better="adaptive+lsq" if better else None, worse="uniform+lsq" if better else None,
                 values={"kl": {r: {"uniform+lsq": c["uniform+lsq"], "adaptive+lsq": c["adaptive+lsq"]}
                                for r, c in ratios.items()},
                         "search_seconds": {r: c.get("adaptive_seconds") for r, c in ratios.items()}})


def load_recipe_evidence(path: str | Path | None = None, criterion: str = "entropy") -> dict:
    """:func:`recipe_evidence` from the stored criteria benchmark (default
    ``benchmarks/results/criteria_smollm2-135m.json``); empty ratios when the file is missing or unreadable."""
    target = Path(path) if path is not None else BENCHMARK_RESULTS / RECIPE_RESULT
    try:
        stored = json.loads(target.read_text())
    except (OSError, ValueError):
        return {"ratios": {}}
    return recipe_evidence(stored.get("rows", []), stored.get("setup", {}), criterion)


# ----------------------------------------------------------------------------------------------
# the adaptive search's refit probes, in a sentence made from benchmarks/heal.py's stored tables
# ----------------------------------------------------------------------------------------------

# heal.py rows that differ only in the search's probes (mask, refit): same scores, preset and refit windows
PROBE_PAIRS = (("ce-adaptive-quick+lsq", "ce-refit-adaptive-quick+lsq"),
               ("ce-adaptive-quick+lsq512", "ce-refit-adaptive-quick+lsq512"))


def probe_evidence(tables: dict[str, dict]) -> list[dict]:
    """Each (table, ratio, refit windows) where heal.py measured both rows of a :data:`PROBE_PAIRS` pair:
    ``{"table", "ratio", "windows", "mask", "refit", "mask_cpu", "refit_cpu"}`` (KL to the original, CPU
    minutes dense → saved; ``windows``: '' for the default refit, '512' for the 512-window one).
    ``tables``: a stored heal result's name ('smollm2-135m, wiki') → its JSON ({"rows": [...]})."""
    found = []
    for name, stored in tables.items():
        rows = {(r.get("config"), round(float(r.get("ratio", 0)), 4)): r for r in stored.get("rows", [])}
        for ratio in sorted({key[1] for key in rows}):
            for plain, probed in PROBE_PAIRS:
                mask, refit = rows.get((plain, ratio)), rows.get((probed, ratio))
                if mask and refit:
                    found.append({"table": name, "ratio": ratio, "windows": plain.rpartition("lsq")[2],
                                  "mask": float(mask["kl"]), "refit": float(refit["kl"]),
                                  "mask_cpu": float(mask["cpu_min"]), "refit_cpu": float(refit["cpu_min"])})
    return found


def probe_claim(evidence: list[dict], noise: float = 0.03) -> Claim | None:
    """Why the adaptive search probes with the refit applied: the refitted cut's KL with mask probes →
    with refit probes in every measured case, and whether each change is beyond ``noise`` (a relative
    change a single 2 × 64-token held-out slice can plausibly move; the text says which are inside it)."""
    if not evidence:
        return None
    changes = [e["refit"] / e["mask"] - 1 for e in evidence]
    cases = "; ".join(f"{e['table']} at {percent(e['ratio'])}"
                      + (f" (refit on {e['windows']} windows)" if e.get("windows") else "")
                      + f": {e['mask']:.3f} → {e['refit']:.3f} "
                      f"({percent(c, 1)}, {e['mask_cpu']:.1f} → {e['refit_cpu']:.1f} CPU-min)"
                      for e, c in zip(evidence, changes))
    wins = sum(c < 0 for c in changes)
    small = sum(abs(c) < noise for c in changes)
    verdict = (f"Probing with the refit gave the closer cut in {wins} of {len(evidence)} measured cases"
               if wins < len(evidence) else
               f"Probing with the refit gave the closer cut in all {len(evidence)} measured cases")
    noise_text = (f" {small} of them changed by less than {percent(noise)}, which one search on a 2 × 64-token "
                  "held-out slice can move either way: read those as a tie." if small else "")
    better = wins == len(evidence) and small == 0
    advice = ("It costs the same search time, because the refit's statistics are computed before the search "
              "instead of after, and the cut exports like any other.")
    advice += (" Worth switching on." if better else
               " It is off by default: the measured cases do not show a gain beyond that noise.")
    text = (f"{verdict} (cross-entropy scores, the quick search, then the refit; KL to the original, "
            f"benchmarks/heal.py): {cases}.{noise_text} {advice}")
    return Claim(text, "recipe", better="refit probes" if better else None, worse="mask probes" if better else None,
                 inside_noise=small > 0, values={"cases": evidence})


def load_probe_evidence(folder: str | Path | None = None) -> list[dict]:
    """:func:`probe_evidence` from every stored ``heal_<model>_<text>.json`` (default: the shipped
    benchmark results); an unreadable file is left out."""
    tables = {}
    for path in sorted(Path(folder or BENCHMARK_RESULTS).glob("heal_*_*.json")):
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        model, _, text = path.stem.removeprefix("heal_").rpartition("_")
        tables[f"{model}, {text}"] = stored
    return probe_evidence(tables)
