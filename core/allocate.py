"""How many neurons each layer keeps, and which ones."""
from __future__ import annotations

import torch

from .errors import PruneConfigError


def check_ratio(ratio: float) -> float:
    """Ratio = fraction of MLP neurons removed; must lie in [0, 1)."""
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
    """Every layer keeps round((1 − ratio)·d_ff) neurons, optionally rounded to a multiple."""
    ratio = check_ratio(ratio)
    if round_to < 1:
        raise PruneConfigError(f"round_to must be a positive integer, got {round_to}.")
    kept = []
    for layer, width in enumerate(widths):
        keep = round_width(int(round((1.0 - ratio) * width)), round_to, width)
        if keep < 1:
            raise PruneConfigError(f"Ratio {ratio} leaves layer {layer} with 0 of {width} neurons; lower the ratio.")
        kept.append(keep)
    return kept


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
