"""Rank stability: is a difference between two criteria larger than the noise of the calibration draw?

Each criterion is scored on K disjoint calibration draws (:func:`core.data.disjoint_calibration_windows`).
Within a criterion, every pair of draws gives a per-layer Spearman ρ and the overlap of the neurons
each draw would remove at a ratio; across two criteria, the same draw scored by both gives the
same two numbers. If entropy and cross-entropy agree about as well as two draws of entropy do,
their difference is calibration noise. :func:`fidelity_over_draws` adds KL error bars: prune with
each draw's scores and measure KL to the dense model on the evaluation windows
(:func:`sweep_over_draws` streams the same rows; the dashboard's sweep calls it when K ≥ 2).

    draws = draw_windows(loaded, StabilityOptions(draws=4))
    scores = score_draws(loaded, ["entropy", "cross_entropy"], draws)
    result = agreement(scores, ratios=[0.2, 0.3, 0.4])
"""
from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from core.data.text import CalibrationOptions, disjoint_calibration_windows
from core.errors import DataError, SelectionError
from core.importance.criteria import ScoreOptions, get_criterion, resolve_params
from core.importance.stats import removal_overlap, spearman_per_layer
from core.methods.oneshot import ScoreResult
from core.models.loading import LoadedModel
from core.options import knob
from core.prune.allocate import check_ratio, uniform_widths
from core.prune.compensate import CompensationOptions
from core.studies.claims import Claim, percent, words
from core.studies.sweep import SWEEP_ALLOCATIONS, FidelitySweep


@dataclass
class StabilityOptions(CalibrationOptions):
    """K disjoint draws of ``samples`` × ``seq_len`` calibration tokens from ``source``: the scoring
    pass's calibration group plus ``draws``. ``seed`` picks the random order of window slots the draws
    are cut from (draw 0 = the windows a scoring pass with that seed reads)."""

    error = SelectionError
    draws: int = knob(4, "disjoint calibration draws K", low=2, high=64, ui_high=8)


def draw_windows(loaded: LoadedModel, options: StabilityOptions) -> list[torch.Tensor]:
    """K × (samples, seq_len) disjoint calibration windows."""
    return disjoint_calibration_windows(loaded.tokenizer, options.source, options.draws, options.samples,
                                        options.seq_len, options.seed, max_length=loaded.max_length)


def score_draws(loaded: LoadedModel, criteria: list[str], draws: list[torch.Tensor], *,
                params: dict | None = None, batch_size: int = 4, seed: int = 0, progress: bool = False,
                stop: Callable[[], bool] | None = None,
                on_draw: Callable[[str, int], None] | None = None) -> dict[str, list[list[torch.Tensor]]]:
    """criterion → K per-layer score lists, one per draw (the criteria registry's scorers, called on
    each draw's windows). ``params``: every criterion's knobs; each uses its own. ``on_draw(criterion,
    k)`` is called before each scoring pass (progress)."""
    if not criteria:
        raise SelectionError("Choose at least one criterion to measure rank stability.")
    vocab = loaded.model.config.vocab_size
    out: dict[str, list[list[torch.Tensor]]] = {}
    for name in dict.fromkeys(criteria):
        scorer = get_criterion(name, **resolve_params(name, params))
        out[name] = []
        for k, windows in enumerate(draws):
            if int(windows.max()) >= vocab:
                raise DataError(f"The tokenizer produced ids up to {int(windows.max())} but the model's vocabulary "
                                f"has {vocab}.")
            if on_draw is not None:
                on_draw(name, k)
            scores = scorer(loaded.model, windows, ScoreOptions(batch_size=batch_size, progress=progress, seed=seed,
                                                                stop=stop))
            out[name].append([s.detach().float().cpu() for s in scores])
    return out


@dataclass
class Agreement:
    """Per-layer agreement of a set of score pairs: ρ and removal overlap, mean / min / max over the pairs."""

    pairs: int
    rho: list[float]
    rho_min: list[float]
    rho_max: list[float]
    overlap: dict[str, list[float]]  # ratio ("0.2") → per-layer mean share of removals both make
    overlap_min: dict[str, list[float]]
    mean_rho: float
    mean_overlap: dict[str, float]


@dataclass
class StabilityResult:
    """``within[c]``: two different draws, same criterion (K·(K−1)/2 pairs). ``across["a|b"]``: the
    same draw, two criteria (K pairs)."""

    criteria: list[str]
    draws: int
    ratios: list[float]
    layers: int
    within: dict[str, Agreement]
    across: dict[str, Agreement]
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StabilityResult:
        """The inverse of :meth:`to_dict`; extra keys (a stored ``summary``, a ``run_id``) are ignored."""
        return cls(data["criteria"], data["draws"], data["ratios"], data["layers"],
                   {k: Agreement(**v) for k, v in data["within"].items()},
                   {k: Agreement(**v) for k, v in data["across"].items()}, data.get("config", {}))

    def summary(self) -> list[dict]:
        """One row per comparison: what is compared, how many pairs, mean ρ, worst layer ρ, overlaps."""
        rows = []
        for kind, table in (("within", self.within), ("across", self.across)):
            for name, agree in table.items():
                label = (f"{name}: draw vs draw" if kind == "within"
                         else f"{name.replace('|', ' vs ')}: same draw")
                rows.append({"comparison": label, "kind": kind, "pairs": agree.pairs, "mean_rho": agree.mean_rho,
                             "min_layer_rho": min(agree.rho), **{f"overlap@{r}": v
                                                                  for r, v in agree.mean_overlap.items()}})
        return rows

    def layer_rows(self, ratio: float | None = None) -> list[dict]:
        """Per layer: ρ within each criterion and across each pair (and overlap at ``ratio``)."""
        key = _ratio_key(ratio if ratio is not None else self.ratios[0])
        rows = []
        for layer in range(self.layers):
            row: dict = {"layer": layer}
            for name, agree in self.within.items():
                row[f"ρ {name} (draws)"] = agree.rho[layer]
            for name, agree in self.across.items():
                row[f"ρ {name.replace('|', ' vs ')}"] = agree.rho[layer]
            if key in next(iter({**self.within, **self.across}.values())).overlap:
                for name, agree in self.within.items():
                    row[f"overlap {name} (draws) @{key}"] = agree.overlap[key][layer]
                for name, agree in self.across.items():
                    row[f"overlap {name.replace('|', ' vs ')} @{key}"] = agree.overlap[key][layer]
            rows.append(row)
        return rows


@dataclass
class StabilityVerdict:
    """Do the criteria differ more than two calibration draws of one criterion do?"""

    noise: float  # the lowest mean ρ between two draws of one criterion
    closest: float  # the highest mean ρ between two criteria on the same draw

    @property
    def beyond_noise(self) -> bool:
        """True when even the closest two criteria agree less than two draws of the least stable one."""
        return self.closest < self.noise

    def sentence(self, emphasis: str = "") -> str:
        """The verdict in one sentence; ``emphasis`` wraps its key words (``**`` for Markdown)."""
        if self.beyond_noise:
            return f"the criteria differ {emphasis}more{emphasis} than two draws of one criterion do."
        return (f"the criteria differ {emphasis}no more{emphasis} than two calibration draws do: their difference "
                "is within calibration noise.")


def stability_verdict(result: StabilityResult) -> StabilityVerdict | None:
    """The verdict of a stability result; None when it compares no two criteria."""
    if not result.within or not result.across:
        return None
    return StabilityVerdict(noise=min(a.mean_rho for a in result.within.values()),
                            closest=max(a.mean_rho for a in result.across.values()))


def _ratio_key(ratio: float) -> str:
    return f"{float(ratio):g}"


def _agreement(pairs: list[tuple[list[torch.Tensor], list[torch.Tensor]]], ratios: list[float]) -> Agreement:
    widths = [int(s.numel()) for s in pairs[0][0]]
    rho = torch.tensor([spearman_per_layer(a, b) for a, b in pairs], dtype=torch.float64)  # (P, L)
    overlap, overlap_min, mean_overlap = {}, {}, {}
    for ratio in ratios:
        kept = uniform_widths(widths, ratio)
        shared = torch.tensor([[row["overlap"] for row in removal_overlap(a, b, kept)] for a, b in pairs],
                              dtype=torch.float64)  # (P, L)
        key = _ratio_key(ratio)
        overlap[key], overlap_min[key] = shared.mean(0).tolist(), shared.min(0).values.tolist()
        mean_overlap[key] = float(shared.mean())
    return Agreement(pairs=len(pairs), rho=rho.mean(0).tolist(), rho_min=rho.min(0).values.tolist(),
                     rho_max=rho.max(0).values.tolist(), overlap=overlap, overlap_min=overlap_min,
                     mean_rho=float(rho.mean()), mean_overlap=mean_overlap)


def agreement(draw_scores: dict[str, list[list[torch.Tensor]]], ratios: list[float] = (0.2,),
              config: dict | None = None) -> StabilityResult:
    """Within-criterion (draw vs draw) and across-criteria (same draw) agreement per layer.
    ``draw_scores``: criterion → K per-layer score lists (K ≥ 2, the same K and widths for all)."""
    if not draw_scores:
        raise SelectionError("Choose at least one criterion to measure rank stability.")
    counts = {len(v) for v in draw_scores.values()}
    if len(counts) != 1:
        raise SelectionError("Every criterion needs the same number of draws.")
    draws = counts.pop()
    if draws < 2:
        raise SelectionError(f"Rank stability needs at least 2 calibration draws, got {draws}.")
    widths = {tuple(int(s.numel()) for s in scores) for sets in draw_scores.values() for scores in sets}
    if len(widths) != 1:
        raise SelectionError("The score sets come from models with different MLP widths.")
    ratios = [check_ratio(r) for r in ratios]
    within = {name: _agreement([(sets[i], sets[j]) for i, j in itertools.combinations(range(draws), 2)], ratios)
              for name, sets in draw_scores.items()}
    across = {f"{a}|{b}": _agreement([(draw_scores[a][k], draw_scores[b][k]) for k in range(draws)], ratios)
              for a, b in itertools.combinations(draw_scores, 2)}
    return StabilityResult(list(draw_scores), draws, ratios, len(next(iter(widths))), within, across,
                           dict(config or {}))


SWEEP_DRAWS_MAX = 8  # the dashboard sweep's "calibration draws K" goes 1 (no error bars) … 8


def check_sweep_draws(draws: int, allocation: str = "uniform") -> int:
    """K for the sweep's KL error bars: a whole number from 1 (one draw: no error bars, the plain
    sweep) to ``SWEEP_DRAWS_MAX``; with K ≥ 2 ``allocation`` must be one of the sweep's allocations."""
    try:
        number = float(draws)
        value = int(number)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SelectionError(f"Calibration draws K must be a whole number from 1 to {SWEEP_DRAWS_MAX}, "
                             f"got '{draws}'.") from exc
    if value != number or not 1 <= value <= SWEEP_DRAWS_MAX:
        raise SelectionError(f"Calibration draws K must be a whole number from 1 (no error bars) to "
                             f"{SWEEP_DRAWS_MAX}, got {draws}.")
    if value > 1:
        _check_draws_allocation(allocation)
    return value


def _check_draws_allocation(allocation: str) -> None:
    """Error bars over draws need one of the sweep's allocations; else one sentence."""
    if allocation not in SWEEP_ALLOCATIONS:
        raise SelectionError(f"Error bars over calibration draws work with the {', '.join(SWEEP_ALLOCATIONS)} "
                             f"allocations, not '{allocation}'; set K to 1 for it.")


def draw_summary(name: str, ratio: float, allocation: str, cells: list[dict]) -> dict:
    """One (criterion, ratio) cell over K draws from K sweep rows (:meth:`core.sweep.FidelitySweep.row`):
    ``kl_to_dense`` / ``perplexity`` / ``top1_agreement`` / ``params`` are the means over the draws
    (KL in nats/token), ``*_std`` the sample std (n − 1), ``kl_min`` / ``kl_max`` the range and
    ``kl_draws`` / ``perplexity_draws`` / ``top1_draws`` the K values in draw order."""
    kl = [c["kl_to_dense"] for c in cells]
    ppl = [c["perplexity"] for c in cells]
    top1 = [c["top1_agreement"] for c in cells]
    mean = sum(kl) / len(kl)
    return {"criterion": name, "ratio": ratio, "allocation": allocation, "draws": len(cells),
            "kl_to_dense": mean, "perplexity": sum(ppl) / len(ppl), "top1_agreement": sum(top1) / len(top1),
            "params": round(sum(c["params"] for c in cells) / len(cells)),
            "kl_mean": mean, "kl_std": _std(kl), "kl_min": min(kl), "kl_max": max(kl), "kl_draws": kl,
            "perplexity_std": _std(ppl), "perplexity_draws": ppl, "top1_std": _std(top1), "top1_draws": top1}


def sweep_over_draws(loaded: LoadedModel, draw_results: dict[str, list[ScoreResult]], ratios: list[float],
                     windows: torch.Tensor, *, allocation: str = "uniform", round_to: int = 1,
                     compensation: CompensationOptions | None = None, progress: bool = False,
                     stop: Callable[[], bool] | None = None) -> Iterator[dict]:
    """The sweep with KL error bars: criterion → K score results (one per calibration draw, the same K
    for all). For each (criterion, ratio), criterion-major and in the order given, prune with each
    draw's scores, measure on ``windows`` (W, T evaluation token ids) against the dense model and
    yield one :func:`draw_summary` row. One :class:`core.sweep.FidelitySweep` serves every draw, so
    the dense reference (and a ``+lsq`` refit's statistics, made on the first criterion's first
    draw's calibration settings) is computed once: only the scores vary over the draws."""
    _check_draws_allocation(allocation)
    if not draw_results:
        raise SelectionError("Score at least one criterion before running the sweep.")
    counts = {len(v) for v in draw_results.values()}
    if len(counts) != 1 or 0 in counts:
        raise SelectionError("Every criterion needs the same number of calibration draws (at least one).")
    sweep = FidelitySweep(loaded, windows, compensation=compensation, round_to=round_to, progress=progress, stop=stop)
    for name, results in draw_results.items():
        for ratio in ratios:
            cells = [sweep.row(name, result, allocation, ratio) for result in results]
            yield draw_summary(name, cells[0]["ratio"], allocation, cells)


def fidelity_over_draws(loaded: LoadedModel, draw_scores: dict[str, list[list[torch.Tensor]]], ratios: list[float],
                        windows: torch.Tensor, *, allocation: str = "uniform", round_to: int = 1,
                        compensation: CompensationOptions | None = None, calibration: dict | None = None,
                        progress: bool = False, stop: Callable[[], bool] | None = None) -> list[dict]:
    """KL error bars for the sweep: prune with each draw's scores (:func:`sweep_over_draws`) and
    evaluate on ``windows`` (W, T). One row per (criterion, sorted ratio): KL / perplexity / top-1 per
    draw, the mean, sample std, min and max of KL over the draws (see :func:`draw_summary`).
    ``calibration``: the scores' calibration settings (source, samples, seq_len, seed), which a
    ``+lsq`` refit computes its statistics on (default: the CalibrationOptions defaults)."""
    results = {name: [ScoreResult(scores, {**(calibration or {}), "criterion": name, "draw": k}, 0.0)
                      for k, scores in enumerate(sets)] for name, sets in draw_scores.items()}
    ratios = sorted({check_ratio(r) for r in ratios})
    return list(sweep_over_draws(loaded, results, ratios, windows, allocation=allocation, round_to=round_to,
                                 compensation=compensation, progress=progress, stop=stop))


def _std(values: list[float]) -> float:
    """Sample standard deviation (n − 1)."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def compare_over_draws(rows: list[dict], a: str, b: str) -> list[dict]:
    """Per ratio: is criterion ``a``'s KL different from ``b``'s beyond the draw-to-draw spread?

    ``outside_spread``: the two [min, max] ranges of KL over the draws do not overlap. Paired view
    (draw k scored by both criteria): per-draw differences a − b, their mean and sample std, and a
    two-sided paired t-test p-value (scipy)."""
    from scipy.stats import ttest_rel

    by = {(r["criterion"], r["ratio"]): r for r in rows}
    out = []
    for ratio in sorted({r["ratio"] for r in rows}):
        ra, rb = by.get((a, ratio)), by.get((b, ratio))
        if ra is None or rb is None:
            continue
        diffs = [x - y for x, y in zip(ra["kl_draws"], rb["kl_draws"])]
        p_value = float(ttest_rel(ra["kl_draws"], rb["kl_draws"]).pvalue) if len(diffs) > 1 and _std(diffs) > 0 \
            else float("nan")
        out.append({"ratio": ratio, "a": a, "b": b, "kl_a": ra["kl_mean"], "kl_b": rb["kl_mean"],
                    "difference": ra["kl_mean"] - rb["kl_mean"],
                    "relative": (ra["kl_mean"] - rb["kl_mean"]) / rb["kl_mean"],
                    "std_a": ra["kl_std"], "std_b": rb["kl_std"], "range_a": [ra["kl_min"], ra["kl_max"]],
                    "range_b": [rb["kl_min"], rb["kl_max"]],
                    "outside_spread": ra["kl_max"] < rb["kl_min"] or rb["kl_max"] < ra["kl_min"],
                    "paired_differences": diffs, "paired_mean": sum(diffs) / len(diffs), "paired_std": _std(diffs),
                    "same_sign": all(d > 0 for d in diffs) or all(d < 0 for d in diffs), "paired_p": p_value})
    return out


def measure_stability(loaded: LoadedModel, criteria: list[str], options: StabilityOptions | None = None, *,
                      ratios: list[float] = (0.2, 0.3, 0.4), params: dict | None = None, progress: bool = False,
                      stop: Callable[[], bool] | None = None,
                      on_draw: Callable[[str, int], None] | None = None) -> tuple[StabilityResult,
                                                                                  dict[str, list[list[torch.Tensor]]]]:
    """Draw, score and compare in one call (the CLI and the dashboard): (result, the draws' scores)."""
    options = options or StabilityOptions()
    ratios = [check_ratio(r) for r in ratios]
    draws = draw_windows(loaded, options)
    scores = score_draws(loaded, criteria, draws, params=params, batch_size=options.batch_size, seed=options.seed,
                         progress=progress, stop=stop, on_draw=on_draw)
    config = {"model": loaded.spec, **options.to_dict(), "tokens_per_draw": int(draws[0].numel())}
    return agreement(scores, ratios, config), scores


# -- the Tour's precomputed calibration-draw numbers and the sentences made from them ---------------------
TOUR_DRAWS_COMMAND = "python benchmarks/stability.py --write-tour"
TOUR_DRAWS_KEYS = ("criterion", "ratio", "allocation", "draws", "kl_mean", "kl_std", "kl_min", "kl_max", "kl_draws",
                   "perplexity_draws", "top1_draws")


def tour_draws(result: dict, source: str = "benchmarks/results/stability.json") -> dict:
    """The Tour's calibration-draw numbers (``assets/tour/draws.json``) from a stability benchmark
    result (the JSON ``benchmarks/stability.py`` writes): its settings, one row per (criterion, ratio)
    with the KL of every draw's cut, and per ratio the mean removal overlaps (two criteria on the same
    draw, two draws of one criterion, chance = the ratio). Marked ``precomputed``, with the commands
    that measured it and that wrote it."""
    stability = result["stability"]
    overlap = {}
    for ratio in result["ratios"]:
        key = _ratio_key(ratio)
        overlap[key] = {"criteria": {name: agree["mean_overlap"][key] for name, agree in stability["across"].items()},
                        "draws": {name: agree["mean_overlap"][key] for name, agree in stability["within"].items()},
                        "chance": float(ratio)}
    return {"precomputed": True,
            "what": ("KL to the original after a uniform cut made with each of K disjoint calibration draws' "
                     "scores, and how many removed neurons two draws or two criteria share"),
            "made_by": TOUR_DRAWS_COMMAND, "from": source, "measured_by": result["command"],
            "machine": result["machine"],
            "seconds": round(float(result.get("scoring_seconds", 0)) + float(result.get("eval_seconds", 0))),
            "model": result["model"], "criteria": list(result["criteria"]),
            "source": stability.get("config", {}).get("source", "wiki"), "draws": int(result["draws"]),
            "samples": int(result["samples"]), "seq_len": int(result["seq_len"]), "seed": int(result["seed"]),
            "eval_windows": int(result["eval_windows"]), "eval_seq_len": int(result["eval_seq_len"]),
            "ratios": [float(r) for r in result["ratios"]],
            "fidelity": [{k: row[k] for k in TOUR_DRAWS_KEYS if k in row} for row in result["fidelity"]],
            "overlap": overlap}


def load_tour_draws(path: str | Path) -> dict:
    """Read ``assets/tour/draws.json`` (:func:`tour_draws`); one sentence when it is missing or malformed."""
    try:
        data = json.loads(Path(path).read_text())
        if not (data["fidelity"] and data["criteria"] and data["overlap"] and data["draws"] >= 2):
            raise KeyError("fidelity")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"The Tour's calibration-draw numbers in {path} are missing or unreadable; remake them "
                        f"with `{TOUR_DRAWS_COMMAND}`.") from exc
    return data


def draw_rows(asset: dict) -> list[dict]:
    """The Tour's table of the calibration draws, one row per ratio: each criterion's KL (mean, std,
    range, every draw), the paired comparison (:func:`compare_over_draws`) and the removal overlaps
    (the two criteria on the same draw, two draws of one criterion, chance)."""
    a, b = asset["criteria"][:2]
    rows = []
    for c in compare_over_draws(asset["fidelity"], a, b):
        shared = asset["overlap"].get(_ratio_key(c["ratio"]), {"criteria": {}, "draws": {}, "chance": c["ratio"]})
        rows.append({**c, "overlap_criteria": max(shared["criteria"].values(), default=float("nan")),
                     "overlap_draws": dict(shared["draws"]), "chance": shared["chance"]})
    return rows


def draw_claims(asset: dict, focus: float | None = None) -> list[Claim]:
    """The sentences the calibration draws support, each with what it asserts: per ratio, which
    criterion's cut is closer to the original on average and whether that is inside the draw-to-draw
    noise (the two criteria's KL ranges over the draws overlap) — :func:`compare_over_draws` on the
    asset's rows; at ``focus`` (default: the middle ratio) whether the calibration text or the
    criterion changes the removed neurons more; and how much the ratio moves KL against the criterion."""
    a, b = asset["criteria"][:2]
    comparisons = compare_over_draws(asset["fidelity"], a, b)
    claims = [_kl_claim(c) for c in comparisons]
    ratios = [c["ratio"] for c in comparisons]
    if not ratios:
        return claims
    focus = focus if focus is not None and _ratio_key(focus) in asset["overlap"] else ratios[len(ratios) // 2]
    claims.append(_overlap_claim(asset["overlap"][_ratio_key(focus)], focus))
    if len(ratios) > 1:
        claims.append(_ratio_claim(asset["fidelity"], [a, b], comparisons))
    return claims


def _kl_claim(c: dict) -> Claim:
    """One ratio of :func:`compare_over_draws`: direction, size, paired wins and the noise verdict."""
    a_better = c["kl_a"] < c["kl_b"]
    better, worse = (c["a"], c["b"]) if a_better else (c["b"], c["a"])
    mb, mw = (c["kl_a"], c["kl_b"]) if a_better else (c["kl_b"], c["kl_a"])
    sb, sw = (c["std_a"], c["std_b"]) if a_better else (c["std_b"], c["std_a"])
    diffs = c["paired_differences"] if a_better else [-d for d in c["paired_differences"]]
    draws, wins = len(diffs), sum(d < 0 for d in diffs)
    inside, every = not c["outside_spread"], wins == len(diffs)
    p = "" if math.isnan(c["paired_p"]) else f" (paired t-test p = {c['paired_p']:.2f})"
    head = (f"At {percent(c['ratio'])}, {words(better)}'s cut is on average {percent((mw - mb) / mw, 1)} closer to "
            f"the original (KL {mb:.3f} ± {sb:.3f} vs {mw:.3f} ± {sw:.3f} over {draws} draws)")
    if not inside:
        text = (f"{head} and closer in every one of them, with no overlap between the two ranges{p}: a difference "
                "beyond the calibration noise.")
    elif every:
        text = (f"{head} and closer in every one of them{p}, but the two ranges overlap: the gap is still inside "
                "the calibration noise.")
    else:
        text = (f"{head}, but it is closer in only {wins} of the {draws} draws and the ranges overlap: this "
                "difference is inside the calibration noise.")
    return Claim(text, "draws", ratio=c["ratio"], better=better, worse=worse, inside_noise=inside, every_draw=every,
                 values={"mean": {better: mb, worse: mw}, "relative": (mw - mb) / mw, "wins": wins, "draws": draws,
                         "p": c["paired_p"]})


def _overlap_claim(overlap: dict, ratio: float) -> Claim:
    """Do two criteria on the same text share more removals than two texts for one criterion do?"""
    across = max(overlap["criteria"].values())
    within = overlap["draws"]
    if across > max(within.values()):
        verdict, bigger = ("which text you calibrate on changes the cut more than which of the two criteria you "
                           "use"), "text"
    elif across < min(within.values()):
        verdict, bigger = "the criteria change the cut more than the calibration text does", "criterion"
    else:
        verdict, bigger = "the criterion and the calibration text change the cut about equally", "neither"
    draws = " and ".join(f"two draws of {words(n)} share {percent(v)}" for n, v in within.items())
    text = (f"At {percent(ratio)}, the two criteria scored on the same draw remove {percent(across)} of the same "
            f"neurons, while {draws} (two random choices would share {percent(overlap['chance'])}): {verdict}.")
    return Claim(text, "overlap", ratio=ratio, values={"criteria": across, "draws": dict(within),
                                                       "chance": overlap["chance"], "bigger": bigger})


def _ratio_claim(rows: list[dict], criteria: list[str], comparisons: list[dict]) -> Claim:
    """How much the ratio moves the mean KL, set against the largest average gap between the criteria."""
    by = {(r["criterion"], r["ratio"]): r["kl_mean"] for r in rows}
    low, high = comparisons[0]["ratio"], comparisons[-1]["ratio"]
    growth = {n: by[(n, high)] / by[(n, low)] for n in criteria}
    gap = max(abs(c["kl_a"] - c["kl_b"]) / max(c["kl_a"], c["kl_b"]) for c in comparisons)
    parts = " and ".join(f"{words(n)}'s mean KL from {by[(n, low)]:.3f} to {by[(n, high)]:.3f} (×{growth[n]:.1f})"
                         for n in criteria)
    more = min(growth.values()) - 1 > gap
    text = (f"How much you cut moves the price {'far more' if more else 'less'} than which criterion you use: going "
            f"from {percent(low)} to {percent(high)} takes {parts}, while the two criteria differ by at most "
            f"{percent(gap, 1)} at any ratio.")
    return Claim(text, "ratio", values={"growth": growth, "max_gap": gap, "ratio_more": more, "low": low,
                                        "high": high})


def single_draw_claim(live: dict[str, dict], asset: dict, ratio: float, samples: int, seq_len: int) -> Claim:
    """What one live cut from ``samples`` × ``seq_len`` calibration tokens says, set against the
    calibration draws at ``ratio``: ``live`` holds each criterion's {"kl", "perplexity"} on held-out
    text. Where the live cut favours the other criterion than the draws' average, the sentence says one
    draw can go either way; where it agrees, it still says whether the draws put that inside the noise."""
    a, b = asset["criteria"][:2]
    better, worse = (a, b) if live[a]["kl"] < live[b]["kl"] else (b, a)
    comparison = next((c for c in compare_over_draws(asset["fidelity"], a, b) if math.isclose(c["ratio"], ratio)),
                      None)
    if comparison is None:
        raise SelectionError(f"The calibration draws hold no cut at {percent(ratio)}.")
    mean_better = a if comparison["kl_a"] < comparison["kl_b"] else b
    inside = not comparison["outside_spread"]
    draws = len(comparison["paired_differences"])
    head = (f"In this one draw ({samples} × {seq_len} calibration tokens) {words(better)}'s cut came out closer to "
            f"the original (KL {live[better]['kl']:.3f} vs {live[worse]['kl']:.3f}, perplexity "
            f"{live[better]['perplexity']:.1f} vs {live[worse]['perplexity']:.1f})")
    if better != mean_better:
        text = (f"{head}, the opposite of the average over the {draws} larger draws: one draw of "
                f"{samples * seq_len} tokens can go either way, so read the calibration-draw numbers below rather "
                "than this row.")
    elif inside:
        text = (f"{head}, the same way as the average over the {draws} larger draws, but at {percent(ratio)} that "
                f"average difference is inside the calibration noise, so this row is no evidence that "
                f"{words(better)} cuts better.")
    else:
        text = f"{head}, as it does in every one of the {draws} larger draws at {percent(ratio)}."
    return Claim(text, "single", ratio=ratio, better=better, worse=worse, inside_noise=inside,
                 every_draw=None if better != mean_better else not inside,
                 values={"kl": {n: live[n]["kl"] for n in (a, b)}, "mean_better": mean_better,
                         "agrees": better == mean_better})
