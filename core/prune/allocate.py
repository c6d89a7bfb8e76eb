"""How many neurons each layer keeps, and which ones."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.errors import PruneConfigError
from core.models.adapters import mlp_handles
from core.models.counts import count_params, mlp_layout
from core.options import Options, knob

ADAPTIVE_MODES = ("independent", "sequential")


@dataclass
class AllocationOptions(Options):
    """Knobs of the non-uniform allocations: ``global`` (one ranking after per-layer normalisation,
    a floor per layer) and ``adaptive`` (AMP's per-layer binary search on held-out calibration text)."""

    error = PruneConfigError

    normalize: str = knob("mean", "global: per-layer score normalisation before the one ranking",
                          choices=("mean", "zscore", "none"), flag="normalize")
    min_keep: float = knob(0.1, "global: minimum kept fraction of every layer", low=0.0, high=1.0, low_open=True,
                           high_open=True, step=0.01, flag="min-keep")
    fidelity: str = knob("kl", "adaptive: the loss whose increase must stay under the tolerance",
                         choices=("kl", "entropy"), flag="fidelity")
    mode: str = knob("independent", "adaptive: each layer against the dense model, or AMP's last-to-first "
                     "with the later layers already pruned", choices=ADAPTIVE_MODES, flag="adaptive-mode")
    halvings: int = knob(6, "adaptive: binary-search steps per layer", low=1, high=16, flag="halvings")
    heldout_samples: int = knob(4, "adaptive: held-out calibration windows", low=1, ui_high=64,
                                flag="heldout-samples")
    heldout_seq_len: int = knob(64, "adaptive: tokens per held-out window", low=2, ui_low=16, ui_high=512,
                                step=16, flag="heldout-seq-len")
    adaptive_min_keep: float = knob(0.05, "adaptive: minimum kept fraction of every layer", low=0.0, high=1.0,
                                    low_open=True, step=0.01, flag="adaptive-min-keep")
    refit_probes: bool = knob(False, "adaptive, with the lsq or region compensation: probe every width with the "
                              "least-squares refit applied, so the widths suit the refitted model (the refit's "
                              "statistics are computed before the search and reused by the refit; same time). Off "
                              "by default: in benchmarks/heal.py it was a tie within a quick search's noise",
                              flag="refit-probes")


# The adaptive search's settings, one click apart: quick is the dashboard's default (≤ 3 min on a 2-core CPU,
# measured in benchmarks/dashboard.py), thorough is the engine's / CLI's default (AllocationOptions()).
ADAPTIVE_KNOBS = ("halvings", "heldout_samples", "heldout_seq_len", "fidelity")
ADAPTIVE_PRESETS: dict[str, dict] = {
    "quick": {"halvings": 4, "heldout_samples": 2, "heldout_seq_len": 64, "fidelity": "kl"},
    "thorough": {k: getattr(AllocationOptions(), k) for k in ADAPTIVE_KNOBS},
}


def check_ratio(ratio: float) -> float:
    """Ratio = fraction of MLP neurons removed; must lie in [0, 1). Called once, where a ratio enters
    the engine (a CLI flag, an option group, a top-level call such as ``prune_with_scores``); the
    allocations below take the checked value as given."""
    try:
        value = float(ratio)
    except (TypeError, ValueError) as exc:
        raise PruneConfigError(f"Ratio must be a number in [0, 1), got {ratio!r}.") from exc
    if not 0.0 <= value < 1.0 or value != value:
        raise PruneConfigError(f"Ratio must be in [0, 1) (fraction of MLP neurons removed), got {ratio}.")
    return value


def round_width(width: int, multiple: int, limit: int) -> int:
    """Round a kept width to the nearest multiple (≥ one multiple, ≤ the layer's width)."""
    if multiple <= 1:
        return width
    rounded = max(multiple, int(round(width / multiple)) * multiple)
    return min(rounded, limit)


def uniform_widths(widths: list[int], ratio: float, round_to: int = 1) -> list[int]:
    """Every layer keeps round((1 − ratio)·d_ff) neurons, optionally rounded to a multiple.
    ``ratio``: already checked (:func:`check_ratio`)."""
    if round_to < 1:
        raise PruneConfigError(f"round_to must be a positive integer, got {round_to}.")
    kept = []
    for layer, width in enumerate(widths):
        keep = round_width(int(round((1.0 - ratio) * width)), round_to, width)
        if keep < 1:
            raise PruneConfigError(f"Ratio {ratio} leaves layer {layer} with 0 of {width} neurons; lower the ratio.")
        kept.append(keep)
    return kept


NORMALIZATIONS = ("mean", "zscore", "none")


def normalize_scores(scores: list[torch.Tensor], method: str = "mean") -> list[torch.Tensor]:
    """Make per-layer scores comparable across layers: divide by the layer mean (``mean``) or
    standardise to zero mean / unit std (``zscore``); ``none`` keeps raw scores (for criteria whose
    scores already share a unit across layers, such as fisher's KL-increase estimates)."""
    if method not in NORMALIZATIONS:
        raise PruneConfigError(f"Unknown normalisation '{method}'; choose one of: {', '.join(NORMALIZATIONS)}.")
    out = []
    for score in scores:
        s = score.detach().float().cpu()
        if method == "none":
            out.append(s)
        elif method == "mean":
            out.append(s / s.mean().clamp_min(1e-30))
        else:
            out.append((s - s.mean()) / s.std(unbiased=False).clamp_min(1e-30))
    return out


def round_to_total(widths: list[int], multiple: int, limits: list[int], target: int,
                   floor: list[int] | None = None) -> list[int]:
    """Round every width to a multiple of ``multiple`` (capped at its layer's full width, which is
    allowed even when it is not a multiple) while keeping the total as close as possible to ``target``:
    round down, then give one more multiple to the layers with the largest remainders."""
    if multiple <= 1:
        return list(widths)
    floor = floor or [1] * len(widths)
    low = [min(limit, max(multiple, (w // multiple) * multiple, -(-lo // multiple) * multiple))
           for w, limit, lo in zip(widths, limits, floor)]
    remainders = sorted(range(len(widths)), key=lambda i: (-(widths[i] - low[i]), i))
    total = sum(low)
    for i in remainders:
        if total + multiple / 2 > target:
            break
        if low[i] >= limits[i]:
            continue
        step = min(multiple, limits[i] - low[i])
        low[i] += step
        total += step
    return low


def global_widths(scores: list[torch.Tensor], ratio: float, *, normalize: str = "mean", min_keep: float = 0.1,
                  round_to: int = 1) -> list[int]:
    """One ranking of all neurons after per-layer normalisation. Each layer first keeps its top
    ``ceil(min_keep·d_l)`` neurons; the rest of the budget goes to the globally best remaining ones.
    Keeps exactly round((1 − ratio)·Σd_l) neurons (before optional rounding to a multiple).
    ``ratio``: already checked (:func:`check_ratio`)."""
    if not 0.0 < min_keep <= 1.0:
        raise PruneConfigError(f"min_keep must be in (0, 1], got {min_keep}.")
    if round_to < 1:
        raise PruneConfigError(f"round_to must be a positive integer, got {round_to}.")
    limits = [int(s.numel()) for s in scores]
    target = int(round((1.0 - ratio) * sum(limits)))
    floors = [max(1, int(math.ceil(min_keep * d - 1e-9))) for d in limits]
    if sum(floors) > target:
        raise PruneConfigError(f"Ratio {ratio} keeps {target} neurons, fewer than the per-layer minimum "
                               f"({min_keep:.0%} of every layer = {sum(floors)}); lower the ratio or min_keep.")
    normed = normalize_scores(scores, normalize)
    pool_scores, pool_layers = [], []
    for layer, (s, lo) in enumerate(zip(normed, floors)):
        order = torch.argsort(s, descending=True, stable=True)
        rest = s[order[lo:]]
        pool_scores.append(rest)
        pool_layers.append(torch.full((rest.numel(),), layer, dtype=torch.long))
    widths = list(floors)
    remaining = target - sum(floors)
    if remaining > 0:
        flat = torch.cat(pool_scores)
        layers = torch.cat(pool_layers)
        chosen = torch.argsort(flat, descending=True, stable=True)[:remaining]
        counts = torch.bincount(layers[chosen], minlength=len(scores))
        widths = [w + int(c) for w, c in zip(widths, counts.tolist())]
    return round_to_total(widths, round_to, limits, target, floors)


def removed_shares(model, widths: list[int]) -> dict[str, float]:
    """What keeping ``widths`` neurons per layer removes, in the two units users compare:
    ``mlp_neuron_ratio`` (share of MLP neurons) and ``params_removed_share`` (share of *all* model
    parameters, embeddings included, tied weights counted once). The seed papers' "20 %" is the second."""
    handles = mlp_handles(model)
    full = [h.width for h in handles]
    if len(widths) != len(full):
        raise PruneConfigError(f"Got widths for {len(widths)} layers; the model has {len(full)}.")
    layout = mlp_layout(model)
    removed = layout.params(full) - layout.params(list(widths))
    return {"mlp_neuron_ratio": 1.0 - sum(widths) / sum(full),
            "params_removed_share": removed / count_params(model)["params"]}


def neuron_ratio_for_param_ratio(model, param_ratio: float) -> float:
    """The share of MLP neurons to remove (uniformly) so that ``param_ratio`` of *all* parameters go:
    every neuron carries the same 3·H weights in a gated MLP (2·H in fc1/fc2), so the neuron ratio is
    param_ratio · params / (MLP parameters that scale with the width). E.g. 20 % of LLaMA-2-7B's
    parameters ≈ 31 % of its MLP neurons."""
    try:
        share = float(param_ratio)
    except (TypeError, ValueError) as exc:
        raise PruneConfigError(f"The parameter ratio must be a number in [0, 1), got {param_ratio!r}.") from exc
    if not 0.0 <= share < 1.0 or math.isnan(share):
        raise PruneConfigError(f"The parameter ratio must be in [0, 1) (share of all parameters removed), "
                               f"got {param_ratio}.")
    handles = mlp_handles(model)
    full = [h.width for h in handles]
    layout = mlp_layout(model)
    scalable = layout.params(full) - layout.params([0] * len(full))
    total = count_params(model)["params"]
    ratio = share * total / scalable
    if ratio >= 1.0:
        raise PruneConfigError(f"Removing {share:.0%} of all parameters from the MLPs alone is impossible: their "
                               f"neurons hold only {scalable / total:.0%} of this model's parameters.")
    return ratio
