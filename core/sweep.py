"""Criteria × ratio fidelity sweep: prune (in memory) at each ratio and measure fidelity to the dense model.

The dashboard's "criteria × ratio" table and ``python -m core``-side comparisons use this; the full
benchmark with adaptive allocation lives in ``benchmarks/criteria.py``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterator

import torch

from .allocate import check_ratio, top_k_indices
from .engine import CompensationOptions, ScoreResult, compensation_grams, plan_widths
from .errors import PruneConfigError
from .evaluate import Reference, evaluate
from .models import LoadedModel
from .progress import check_stop
from .prune import pruned_view

# adaptive runs a search per cell: use benchmarks/criteria.py. "+lsq": least-squares compensation.
SWEEP_ALLOCATIONS = ("uniform", "global", "uniform+lsq", "global+lsq")


def parse_ratios(text: str) -> list[float]:
    """'0.2, 0.3 0.4' → [0.2, 0.3, 0.4]; every value checked to lie in [0, 1)."""
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise PruneConfigError("Give at least one ratio, e.g. '0.2, 0.3, 0.4'.")
    try:
        ratios = [float(p) for p in parts]
    except ValueError as exc:
        raise PruneConfigError(f"Ratios must be numbers between 0 and 1, got '{text}'.") from exc
    return sorted({check_ratio(r) for r in ratios})


def fidelity_sweep(loaded: LoadedModel, results: dict[str, ScoreResult], ratios: list[float], windows: torch.Tensor,
                   *, allocation: str = "uniform", round_to: int = 1, progress: bool = False,
                   stop: Callable[[], bool] | None = None,
                   compensation: CompensationOptions | None = None) -> Iterator[dict]:
    """Yield one row per (criterion, ratio): perplexity, KL to dense, top-1 agreement, kept params.

    windows (K, T): held-out evaluation token ids. An allocation ending in ``+lsq`` refits every
    pruned down_proj (``compensation`` gives windows and damping; the statistics are computed once,
    on the calibration source of the first criterion's scores). The pruned copies share non-MLP
    tensors with the dense model and are dropped after each row, so memory stays at one extra MLP stack."""
    if allocation not in SWEEP_ALLOCATIONS:
        raise PruneConfigError(f"The sweep supports {' and '.join(SWEEP_ALLOCATIONS)} allocations; "
                               f"run benchmarks/criteria.py for '{allocation}'.")
    if not results:
        raise PruneConfigError("Score at least one criterion before running the sweep.")
    from .compensate import compensate_pruned

    base_allocation, _, compensate = allocation.partition("+")
    options = replace(compensation or CompensationOptions(), method="lsq").check() if compensate else None
    grams = None
    reference = None  # the dense model's distributions on ``windows``, computed once for every row
    for name, result in results.items():
        for ratio in ratios:
            check_stop(stop, "The sweep was stopped.")
            widths = plan_widths(loaded.model, ratio, base_allocation, round_to, result.scores)
            kept = top_k_indices(result.scores, widths)
            variant = pruned_view(loaded.model, kept)
            if options is not None:
                if grams is None:
                    grams = compensation_grams(loaded, options, source=result.config.get("source") or "wiki",
                                               seed=int(result.config.get("seed") or 0), progress=progress, stop=stop)
                compensate_pruned(variant, loaded.model, kept, grams, options.damping)
            if reference is None:
                reference = Reference(loaded.model, windows)
            metrics = evaluate(variant, windows, reference, progress=progress, stop=stop)
            yield {"criterion": name, "ratio": ratio, "allocation": allocation, "perplexity": metrics.perplexity,
                   "kl_to_dense": metrics.kl_to_reference, "top1_agreement": metrics.top1_agreement,
                   "params": metrics.params}
            del variant
