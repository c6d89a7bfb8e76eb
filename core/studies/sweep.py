"""Criteria × allocation × ratio fidelity sweep: prune (in memory) and measure fidelity to the dense model.

The dashboard's "criteria × ratio" table (:func:`fidelity_sweep`) and ``benchmarks/criteria.py``
(the README's tables) both run :class:`FidelitySweep`. Allocation specs: ``uniform``, ``global``
(mean-normalised), ``global-z`` (z-scored), ``global-raw`` (raw scores), ``adaptive`` (AMP's search,
each layer against the dense model), ``adaptive-seq`` (last to first with the later layers already
pruned); a trailing ``+lsq`` keeps the same widths and neurons and then refits every pruned
down_proj by least squares. The dense model runs once per set of evaluation windows (a
``core.evaluate.Reference``), the compensation statistics once per sweep, the adaptive held-out pass
once per criterion.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Iterable, Iterator

import torch

from core.errors import PruneConfigError
from core.importance.stats import top_k_indices
from core.measure.evaluate import EvalResult, Reference, evaluate, evaluate_reference
from core.methods.oneshot import (
    AllocationOptions,
    CompensationOptions,
    ScoreResult,
    adaptive_heldout,
    compensation_grams,
    plan_widths,
    refit_probing,
)
from core.models.loading import LoadedModel
from core.models.slicing import pruned_view
from core.progress import check_stop
from core.prune.adaptive import MaskedEvaluator, RefitMaskedEvaluator, adaptive_search
from core.prune.allocate import check_ratio
from core.prune.compensate import compensate_pruned

# spec → (engine allocation, AllocationOptions overrides)
ALLOCATION_SPECS: dict[str, tuple[str, dict]] = {
    "uniform": ("uniform", {}),
    "global": ("global", {"normalize": "mean"}),
    "global-z": ("global", {"normalize": "zscore"}),
    "global-raw": ("global", {"normalize": "none"}),
    "adaptive": ("adaptive", {"mode": "independent"}),
    "adaptive-seq": ("adaptive", {"mode": "sequential"}),
}
# The dashboard's choices; adaptive runs a search per cell: use benchmarks/criteria.py.
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


def split_allocation(spec: str) -> tuple[str, dict, bool]:
    """'global-z+lsq' → ('global', {'normalize': 'zscore'}, True)."""
    base, plus, method = spec.partition("+")
    if base not in ALLOCATION_SPECS or (plus and method != "lsq"):
        raise PruneConfigError(f"Unknown sweep allocation '{spec}'; use one of {', '.join(ALLOCATION_SPECS)}, "
                               f"optionally followed by +lsq.")
    allocation, overrides = ALLOCATION_SPECS[base]
    return allocation, overrides, bool(plus)


class FidelitySweep:
    """Prune a loaded model in memory per (criterion, allocation, ratio) and measure it on ``windows``
    (K, T held-out token ids) against the dense model.

    ``options``: the allocation knobs (held-out slice, min_keep, …; the spec's normalisation / mode
    override them). ``compensation``: windows and damping of the ``+lsq`` refit. Each row is a dict:
    criterion, allocation, ratio, perplexity, kl_to_dense, top1_agreement, params, achieved_ratio,
    widths, alloc_s (+ tolerance / evaluations / search_ratio for adaptive, compensate_s for +lsq)."""

    def __init__(self, loaded: LoadedModel, windows: torch.Tensor, *, options: AllocationOptions | None = None,
                 compensation: CompensationOptions | None = None, round_to: int = 1, batch_size: int = 4,
                 progress: bool = False, stop: Callable[[], bool] | None = None) -> None:
        self.loaded, self.windows, self.round_to, self.batch_size = loaded, windows, int(round_to), int(batch_size)
        self.options = options or AllocationOptions()
        self.compensation = replace(compensation or CompensationOptions(), method="lsq")
        self.progress, self.stop = progress, stop
        self.reference: Reference | None = None  # computed on the first row
        self.grams: list[torch.Tensor] | None = None
        self.grams_seconds: float | None = None
        # per probe kind (True: with the refit applied), the criterion's held-out evaluator
        self._evaluators: dict[bool, tuple[ScoreResult, MaskedEvaluator]] = {}

    def _reference(self) -> Reference:
        if self.reference is None:
            self.reference = Reference(self.loaded.model, self.windows, self.batch_size)
        return self.reference

    def dense(self) -> EvalResult:
        """The dense model's own metrics on the windows (from the reference pass every row reuses)."""
        return evaluate_reference(self._reference(), progress=self.progress, stop=self.stop)

    def widths(self, result: ScoreResult, spec: str, ratio: float) -> tuple[list[int], dict]:
        """Kept widths of an allocation spec at ``ratio`` (+ the adaptive search's summary)."""
        allocation, overrides, _lsq = split_allocation(spec)
        options = replace(self.options, **overrides)
        if allocation != "adaptive":
            return plan_widths(self.loaded.model, ratio, allocation, self.round_to, result.scores, options), {}
        refit = self.refit_probing(spec)
        held = self._evaluators.get(refit)
        if held is None or held[0] is not result:  # one held-out dense pass per criterion and probe kind
            self._evaluators.pop(refit, None)
            heldout = adaptive_heldout(self.loaded, result, options)
            evaluator = (RefitMaskedEvaluator(self.loaded.model, heldout, result.scores, self._grams(result),
                                              self.compensation.damping, options.fidelity, self.batch_size)
                         if refit else MaskedEvaluator(self.loaded.model, heldout, result.scores, options.fidelity,
                                                       self.batch_size))
            held = self._evaluators[refit] = (result, evaluator)
        found = adaptive_search(self.loaded.model, result.scores, ratio, None, evaluator=held[1],
                                mode=options.mode, halvings=options.halvings, min_keep=options.adaptive_min_keep,
                                round_to=self.round_to, progress=self.progress, stop=self.stop)
        return found.widths, {"tolerance": found.tolerance, "evaluations": found.evaluations,
                              "search_ratio": found.search_ratio}

    def refit_probing(self, spec: str) -> bool:
        """Whether ``spec``'s search probes with the refit applied (an adaptive ``+lsq`` spec with
        ``refit_probes`` on): then it searches its own widths instead of reusing the plain spec's."""
        allocation, overrides, lsq = split_allocation(spec)
        return refit_probing(allocation, replace(self.options, **overrides), self.compensation if lsq else None)

    def _grams(self, result: ScoreResult) -> list[torch.Tensor]:
        if self.grams is None:  # the dense model's statistics, on the first criterion's calibration source
            start = time.perf_counter()
            source, seed = result.calibration.source, result.calibration.seed
            self.grams = compensation_grams(self.loaded, self.compensation, source=source, seed=seed,
                                            batch_size=self.batch_size, progress=self.progress, stop=self.stop)
            self.grams_seconds = time.perf_counter() - start
        return self.grams

    def row(self, name: str, result: ScoreResult, spec: str, ratio: float, *, reuse: dict | None = None) -> dict:
        """One row. ``reuse``: an earlier row of the same criterion, ratio and base allocation whose
        widths (and search summary and time) a ``+lsq`` row takes instead of searching again."""
        check_stop(self.stop, "The sweep was stopped.")
        ratio = check_ratio(ratio)
        _allocation, _overrides, lsq = split_allocation(spec)
        start = time.perf_counter()
        if reuse is not None and "widths" in reuse:
            widths = [int(w) for w in reuse["widths"]]
            extra = {k: reuse[k] for k in ("tolerance", "evaluations", "search_ratio") if k in reuse}
            start -= float(reuse.get("alloc_s", 0.0))
        else:
            widths, extra = self.widths(result, spec, ratio)
        alloc_s = time.perf_counter() - start
        kept = top_k_indices(result.scores, widths)
        variant = pruned_view(self.loaded.model, kept)
        if lsq:
            grams = self._grams(result)
            t0 = time.perf_counter()
            compensate_pruned(variant, self.loaded.model, kept, grams, self.compensation.damping)
            extra["compensate_s"] = round(time.perf_counter() - t0, 2)
        metrics = evaluate(variant, self.windows, self._reference(), batch_size=self.batch_size,
                           progress=self.progress, stop=self.stop)
        del variant
        full = [s.numel() for s in result.scores]
        return {"criterion": name, "allocation": spec, "ratio": ratio, "perplexity": metrics.perplexity,
                "kl_to_dense": metrics.kl_to_reference, "top1_agreement": metrics.top1_agreement,
                "params": metrics.params, "achieved_ratio": 1.0 - sum(widths) / sum(full), "widths": widths,
                "alloc_s": round(alloc_s, 2), **extra}

    def rows(self, results: dict[str, ScoreResult], specs: Iterable[str], ratios: Iterable[float]) -> Iterator[dict]:
        """Every (criterion, allocation, ratio) row, criterion-major; a ``+lsq`` spec reuses the widths
        of its plain spec when that was swept first (not an adaptive one that probes with the refit)."""
        specs, ratios = list(specs), list(ratios)
        for spec in specs:
            split_allocation(spec)  # an unknown spec fails before any work
        for name, result in results.items():
            done: dict[tuple[str, float], dict] = {}
            for spec in specs:
                for ratio in ratios:
                    base = spec.partition("+")[0]
                    reuse = done.get((base, ratio)) if base != spec and not self.refit_probing(spec) else None
                    row = self.row(name, result, spec, ratio, reuse=reuse)
                    done.setdefault((base, ratio), row)
                    yield row


def fidelity_sweep(loaded: LoadedModel, results: dict[str, ScoreResult], ratios: list[float], windows: torch.Tensor,
                   *, allocation: str = "uniform", round_to: int = 1, progress: bool = False,
                   stop: Callable[[], bool] | None = None,
                   compensation: CompensationOptions | None = None) -> Iterator[dict]:
    """The dashboard's sweep: one row per (criterion, ratio) with perplexity, KL to dense, top-1
    agreement and kept params, for one of ``SWEEP_ALLOCATIONS``.

    windows (K, T): held-out evaluation token ids. An allocation ending in ``+lsq`` refits every
    pruned down_proj (``compensation`` gives windows and damping; the statistics are computed once,
    on the calibration source of the first criterion's scores). The pruned copies share non-MLP
    tensors with the dense model and are dropped after each row, so memory stays at one extra MLP
    stack (plus the dense reference, see ``core.evaluate.Reference``)."""
    if allocation not in SWEEP_ALLOCATIONS:
        raise PruneConfigError(f"The sweep supports {' and '.join(SWEEP_ALLOCATIONS)} allocations; "
                               f"run benchmarks/criteria.py for '{allocation}'.")
    if not results:
        raise PruneConfigError("Score at least one criterion before running the sweep.")
    sweep = FidelitySweep(loaded, windows, compensation=compensation, round_to=round_to, progress=progress, stop=stop)
    for row in sweep.rows(results, [allocation], ratios):
        yield {key: row[key] for key in ("criterion", "ratio", "allocation", "perplexity", "kl_to_dense",
                                         "top1_agreement", "params")}
