"""Statistics of score sets (what the dashboard's Importance and Criteria views show; no UI here).

Per-layer summaries, histograms, the sorted layer × neuron matrix, percentile ranks, Spearman ρ
between two criteria, the overlap of the neurons each would remove, and the neurons the two
disagree on most. Scores are lists of per-layer (d_ff,) tensors.
"""
from __future__ import annotations

import math

import torch

from core.errors import HFPruneError, PruneConfigError

# ----------------------------------------------------------------------------------------------
# score-set statistics
# ----------------------------------------------------------------------------------------------


def layer_summaries(scores: list[torch.Tensor]) -> list[dict]:
    """One row per layer: width, mean, median, std, max, max/mean and the share of the total score
    held by the top 10 % of neurons (how concentrated importance is)."""
    rows = []
    for layer, s in enumerate(scores):
        s = s.double()
        total = float(s.sum())
        top = max(1, int(math.ceil(0.1 * s.numel())))
        top_share = float(s.topk(top).values.sum()) / total if total > 0 else float("nan")
        mean = float(s.mean())
        rows.append({"layer": layer, "width": int(s.numel()), "mean": mean, "median": float(s.median()),
                     "std": float(s.std()) if s.numel() > 1 else 0.0, "max": float(s.max()),
                     "max_over_mean": float(s.max()) / mean if mean > 0 else float("nan"),
                     "top10_share": top_share})
    return rows


def _log10(values: torch.Tensor) -> torch.Tensor:
    """log10 with zeros (and negatives) floored just below the smallest positive value."""
    values = values.double()
    positive = values[values > 0]
    floor = float(positive.min()) / 10 if positive.numel() else 1e-12
    return values.clamp_min(floor).log10()


def histogram(values: torch.Tensor, bins: int = 40, log: bool = False,
              value_range: tuple[float, float] | None = None,
              clamp: bool = False) -> tuple[list[float], list[int]]:
    """Bin ``values`` (optionally log10 first) → (bin edges (bins+1,), counts (bins,)). With ``clamp``,
    values outside ``value_range`` land in the first / last bin instead of being left out."""
    data = _log10(values) if log else values.double()
    lo, hi = value_range if value_range is not None else (float(data.min()), float(data.max()))
    if hi <= lo:
        hi = lo + 1e-12
    if clamp:
        data = data.clamp(lo, hi)
    counts = torch.histc(data.float(), bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    return edges.tolist(), [int(c) for c in counts.tolist()]


def shared_range(score_sets: list[torch.Tensor], log: bool = False) -> tuple[float, float]:
    """One (min, max) covering several score vectors, so overlaid histograms share their bins."""
    data = torch.cat([(_log10(s) if log else s.double()).flatten() for s in score_sets])
    return float(data.min()), float(data.max())


def bulk_range(score_sets: list[torch.Tensor], log: bool = False, coverage: float = 0.99) -> tuple[float, float]:
    """(lo, hi) of the central ``coverage`` of all values (after log10 if ``log``): histogram bins over
    this range show where most neurons are, instead of one crowded bin beside a few far outliers."""
    data = torch.cat([(_log10(s) if log else s.double()).flatten() for s in score_sets])
    tail = (1.0 - coverage) / 2.0
    lo, hi = torch.quantile(data, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return (lo, hi) if hi > lo else (float(data.min()), float(data.max()))


def outside(values: torch.Tensor, value_range: tuple[float, float], log: bool = False) -> tuple[int, int]:
    """How many values fall below / above ``value_range`` (in the display scale)."""
    data = _log10(values) if log else values.double()
    return int((data < value_range[0]).sum()), int((data > value_range[1]).sum())


def robust_limits(matrix: torch.Tensor, low: float = 2.0, high: float = 98.0) -> tuple[float, float]:
    """Colour limits for a heatmap: the ``low`` / ``high`` percentiles of its finite cells, so a few
    extreme cells do not flatten everything else into one colour."""
    cells = matrix[torch.isfinite(matrix)].double()
    if cells.numel() == 0:
        return 0.0, 1.0
    lo, hi = torch.quantile(cells, torch.tensor([low / 100.0, high / 100.0], dtype=torch.float64)).tolist()
    return (lo, hi) if hi > lo else (float(cells.min()), float(cells.max()) + 1e-12)


def sorted_score_matrix(scores: list[torch.Tensor], log: bool = True, columns: int | None = 256) -> torch.Tensor:
    """(layers, columns) matrix: each layer's scores sorted high → low and divided by the layer's mean
    (log10 if ``log``), so layers are comparable. Column c is the neuron at rank fraction
    c / (columns − 1) of its layer (``columns=None``: every neuron, NaN-padding narrower layers)."""
    width = max(s.numel() for s in scores)
    columns = width if columns is None else min(columns, width)
    matrix = torch.full((len(scores), columns), float("nan"), dtype=torch.float64)
    for layer, s in enumerate(scores):
        s = s.double()
        mean = float(s.mean())
        relative = s / mean if mean > 0 else s
        row = (_log10(relative) if log else relative).sort(descending=True).values
        if columns == width and s.numel() == width:
            matrix[layer] = row
        elif columns == width:
            matrix[layer, : s.numel()] = row
        else:
            picks = torch.linspace(0, s.numel() - 1, columns).round().long()
            matrix[layer] = row[picks]
    return matrix


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """Percentile rank of every neuron in its layer: 0 = least important, 1 = most (ties averaged)."""
    from scipy.stats import rankdata

    n = scores.numel()
    r = torch.from_numpy(rankdata(scores.double().numpy(), method="average"))
    return (r - 1) / max(1, n - 1)


def _check_pair(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    if [s.numel() for s in a] != [s.numel() for s in b]:
        raise HFPruneError("The two score sets come from models with different MLP widths.")


def spearman_per_layer(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    """Spearman rank correlation ρ between two criteria, per layer."""
    _check_pair(a, b)
    out = []
    for sa, sb in zip(a, b):
        ra, rb = ranks(sa), ranks(sb)
        ra, rb = ra - ra.mean(), rb - rb.mean()
        denominator = float(ra.norm() * rb.norm())
        out.append(float((ra * rb).sum()) / denominator if denominator > 0 else float("nan"))
    return out


def removed_indices(scores: list[torch.Tensor], widths: list[int]) -> list[torch.Tensor]:
    """Indices each layer would drop when keeping ``widths[l]`` top-scoring neurons (ascending)."""
    kept = top_k_indices(scores, widths)
    out = []
    for s, keep in zip(scores, kept):
        mask = torch.ones(s.numel(), dtype=torch.bool)
        mask[keep] = False
        out.append(mask.nonzero().flatten())
    return out


def removal_overlap(a: list[torch.Tensor], b: list[torch.Tensor], widths: list[int]) -> list[dict]:
    """Per layer: how many neurons each criterion removes, how many both remove, the fraction of
    A's removals that B also removes, and the Jaccard index of the two removed sets."""
    _check_pair(a, b)
    rows = []
    for layer, (ra, rb) in enumerate(zip(removed_indices(a, widths), removed_indices(b, widths))):
        set_a, set_b = set(ra.tolist()), set(rb.tolist())
        shared = len(set_a & set_b)
        union = len(set_a | set_b)
        rows.append({"layer": layer, "removed": len(set_a), "shared": shared,
                     "overlap": shared / len(set_a) if set_a else 1.0,
                     "jaccard": shared / union if union else 1.0})
    return rows


def chance_overlap(widths: list[int], full_widths: list[int]) -> list[float]:
    """Per layer, the removal overlap two *random* criteria would have on average: B removes each
    neuron with probability (removed / width), so that share of A's removals is expected to match."""
    return [1.0 - kept / full if full else 0.0 for kept, full in zip(widths, full_widths, strict=True)]


def disagreements(a: list[torch.Tensor], b: list[torch.Tensor], top: int = 10) -> list[dict]:
    """The ``top`` neurons (over all layers) whose percentile rank differs most between A and B."""
    _check_pair(a, b)
    rows = []
    for layer, (sa, sb) in enumerate(zip(a, b)):
        ra, rb = ranks(sa), ranks(sb)
        gap = (ra - rb).abs()
        k = min(top, gap.numel())
        for index in gap.topk(k).indices.tolist():
            rows.append({"layer": layer, "neuron": index, "rank_a": float(ra[index]), "rank_b": float(rb[index]),
                         "gap": float(gap[index])})
    rows.sort(key=lambda row: (-row["gap"], row["layer"], row["neuron"]))
    return rows[:top]


def top_k_indices(scores: list[torch.Tensor], widths: list[int]) -> list[torch.Tensor]:
    """Indices of the ``widths[l]`` highest-scoring neurons of each layer, ascending (LongTensor)."""
    if len(scores) != len(widths):
        raise PruneConfigError(f"Got scores for {len(scores)} layers but widths for {len(widths)}.")
    kept = []
    for layer, (score, keep) in enumerate(zip(scores, widths)):
        if not 1 <= keep <= score.numel():
            raise PruneConfigError(f"Layer {layer} cannot keep {keep} of {score.numel()} neurons.")
        # stable tie-break by index so equal scores give a deterministic choice
        order = torch.argsort(score.float(), descending=True, stable=True)
        kept.append(order[:keep].sort().values)
    return kept

