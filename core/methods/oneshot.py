"""The engine's top-level calls, shared by the CLI, the dashboard and Python users.

    loaded = load_model("smollm2-135m")
    result = score_model(loaded, "entropy", samples=16, seq_len=128)
    pruned = prune_with_scores(loaded, result, ratio=0.2)
    save_pruned(pruned.model, loaded.tokenizer, "out/", pruned.meta)
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from core import __version__, distributed
from core.data.text import CalibrationOptions, calibration_windows
from core.errors import DataError, HFPruneError, PruneConfigError
from core.files import read_layer_tensors, write_layer_tensors
from core.importance.criteria import ScoreOptions, get_criterion
from core.importance.stats import (
    top_k_indices,
)
from core.models.adapters import mlp_widths
from core.models.loading import LoadedModel
from core.models.slicing import prune_mlp_neurons
from core.prune.adaptive import RefitMaskedEvaluator, adaptive_search, heldout_windows
from core.prune.allocate import (
    AllocationOptions,
    check_ratio,
    global_widths,
    removed_shares,
    uniform_widths,
)
from core.prune.compensate import CompensationOptions, activation_grams, compensate_pruned
from core.prune.region import RegionReport, reconstruct_regions

if TYPE_CHECKING:
    from core.prune.adaptive import AdaptiveResult

ALLOCATIONS = ("uniform", "global", "adaptive")


@dataclass
class ScoreResult:
    """Per-layer fp32 scores (d_ff_l,) and how they were made."""

    scores: list[torch.Tensor]
    config: dict
    seconds: float

    @property
    def calibration(self) -> CalibrationOptions:
        """The calibration settings these scores were made with (defaults fill keys older runs lack)."""
        return CalibrationOptions.from_dict(self.config)

    def save(self, path: str | os.PathLike) -> Path:
        """Write scores as safetensors (``layer_000`` …) with the config in the header metadata."""
        target = Path(path)
        if target.suffix != ".safetensors":
            raise HFPruneError(f"Scores are saved as .safetensors; got '{target.name}'.")
        if not target.parent.exists():
            raise HFPruneError(f"Parent folder {target.parent} does not exist.")
        return write_layer_tensors(target, self.scores,
                                   {"config": json.dumps(self.config), "seconds": str(self.seconds)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ScoreResult":
        try:
            scores, metadata = read_layer_tensors(path)
        except Exception as exc:
            raise HFPruneError(f"Could not read scores file {path}: {exc}") from exc
        return cls(scores, json.loads(metadata.get("config", "{}")), float(metadata.get("seconds", "nan")))


@dataclass
class PruneResult:
    model: nn.Module
    widths: list[int]
    kept: list[torch.Tensor]
    meta: dict = field(default_factory=dict)


def score_model(loaded: LoadedModel, criterion: str, *, source: str = CalibrationOptions.source,
                samples: int = CalibrationOptions.samples, seq_len: int = CalibrationOptions.seq_len,
                seed: int = CalibrationOptions.seed, batch_size: int = CalibrationOptions.batch_size,
                progress: bool = True, stop: Callable[[], bool] | None = None, criterion_params: dict | None = None,
                grad_checkpointing: bool = False, data_parallel: bool | None = None) -> ScoreResult:
    """Score every MLP neuron of ``loaded`` with ``criterion`` on calibration windows from ``source``
    (the calibration keywords and their defaults are :class:`CalibrationOptions`' fields).
    ``criterion_params``: e.g. {"temperature": 0.5, "alpha": 0.5} for self_distill, {"weight": 0.5}
    for entropy+ce. ``grad_checkpointing``: recompute layer activations in the backward (less memory).
    ``data_parallel``: shard the windows over a torch.distributed group and all-reduce the scores
    (default: whenever a group of more than one process is running, e.g. under torchrun); every rank
    returns the same scores."""
    if data_parallel is None:
        data_parallel = distributed.active()
    scorer = get_criterion(criterion, **(criterion_params or {}))
    calib = CalibrationOptions(source=source, samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size)
    source, samples, seq_len, seed, batch_size = (calib.source, calib.samples, calib.seq_len, calib.seed,
                                                  calib.batch_size)
    windows = calibration_windows(loaded.tokenizer, source, samples, seq_len, seed, max_length=loaded.max_length)
    vocab = loaded.model.config.vocab_size
    if int(windows.max()) >= vocab:
        raise DataError(f"The tokenizer produced ids up to {int(windows.max())} but the model's vocabulary has "
                        f"{vocab}.")
    start = time.perf_counter()
    options = ScoreOptions(batch_size=batch_size, progress=progress and distributed.is_main(), seed=seed, stop=stop,
                           data_parallel=data_parallel, grad_checkpointing=grad_checkpointing)
    scores = scorer(loaded.model, windows, options)
    seconds = time.perf_counter() - start
    config = {"model": loaded.spec, "criterion": criterion, "criterion_params": scorer.params(), "cost": scorer.cost,
              "forwards_per_batch": scorer.passes[0], "backwards_per_batch": scorer.passes[1], "source": source,
              "samples": samples, "seq_len": seq_len, "seed": seed, "batch_size": batch_size,
              "tokens": int(windows.numel()), "tool_version": __version__,
              "processes": distributed.world() if data_parallel else 1}
    return ScoreResult([s.detach().cpu().float() for s in scores], config, seconds)


def plan_widths(model: nn.Module, ratio: float, allocation: str = "uniform", round_to: int = 1,
                scores: list[torch.Tensor] | None = None, options: AllocationOptions | None = None) -> list[int]:
    """Kept width per layer for a ratio and allocation. ``uniform`` needs no scores; ``global`` needs
    the per-layer scores; ``adaptive`` needs a search — use :func:`preview_widths` or
    :func:`prune_with_scores` (which run it) instead. ``ratio`` is checked here (:func:`check_ratio`)."""
    return _plan_widths(model, check_ratio(ratio), allocation, round_to, scores, options)


def _plan_widths(model: nn.Module, ratio: float, allocation: str, round_to: int, scores: list[torch.Tensor] | None,
                 options: AllocationOptions | None) -> list[int]:
    """:func:`plan_widths` for a ratio the caller has checked."""
    if allocation not in ALLOCATIONS:
        raise PruneConfigError(f"Unknown allocation '{allocation}'; available: {', '.join(ALLOCATIONS)}.")
    options = options or AllocationOptions()
    if allocation == "uniform":
        return uniform_widths(mlp_widths(model), ratio, round_to)
    if scores is None:
        raise PruneConfigError(f"The '{allocation}' allocation needs neuron scores; score the model first.")
    if [s.numel() for s in scores] != mlp_widths(model):
        raise PruneConfigError("These scores were computed for a model with different MLP widths.")
    if allocation == "global":
        return global_widths(scores, ratio, normalize=options.normalize, min_keep=options.min_keep, round_to=round_to)
    raise PruneConfigError("The adaptive allocation runs a search; call preview_widths() or prune_with_scores().")


@dataclass
class WidthPlan:
    """What an allocation would do: per-layer widths (and, for adaptive, the search with its traces)."""

    allocation: str
    ratio: float
    widths: list[int]
    full_widths: list[int]
    adaptive: "AdaptiveResult | None" = None
    # the refit's statistics when the search probed with the refit (RefitMaskedEvaluator), so the refit after
    # the cut reuses them: (per-layer Grams, the (source, samples, seq_len, seed) they were computed on)
    refit_grams: "tuple[list[torch.Tensor], tuple] | None" = field(default=None, repr=False, compare=False)

    @property
    def achieved_ratio(self) -> float:
        """Share of MLP neurons removed by these widths."""
        return 1.0 - sum(self.widths) / sum(self.full_widths)

    def to_dict(self) -> dict:
        out = {"allocation": self.allocation, "ratio": self.ratio, "widths": self.widths,
               "full_widths": self.full_widths, "achieved_ratio": self.achieved_ratio}
        if self.adaptive is not None:
            out["adaptive"] = self.adaptive.to_dict()
        return out


def refit_probing(allocation: str, options: AllocationOptions, compensation: CompensationOptions | None) -> bool:
    """Whether an adaptive search probes with the least-squares refit applied: it does when the cut will
    be refitted (lsq or region) and ``options.refit_probes`` is on."""
    return (allocation == "adaptive" and options.refit_probes and compensation is not None
            and compensation.method != "none")


def grams_key(options: CompensationOptions, calibration: CalibrationOptions) -> tuple:
    """What a set of refit statistics was computed on: (source, samples, seq_len, seed)."""
    return (calibration.source, options.samples, options.seq_len, calibration.seed)


def compensation_grams(loaded: LoadedModel, options: CompensationOptions, *, source: str = CalibrationOptions.source,
                       seed: int = CalibrationOptions.seed, batch_size: int = CalibrationOptions.batch_size,
                       progress: bool = True,
                       stop: Callable[[], bool] | None = None) -> list[torch.Tensor]:
    """Per-layer Gram matrices of the dense model's down_proj inputs on ``options.samples`` calibration
    windows of ``source`` (never its evaluation split)."""
    windows = calibration_windows(loaded.tokenizer, source, options.samples, options.seq_len, seed,
                                  max_length=loaded.max_length)
    grams, _tokens = activation_grams(loaded.model, windows, batch_size=batch_size, progress=progress, stop=stop)
    return grams


def apply_compensation(loaded: LoadedModel, pruned: nn.Module, kept: list[torch.Tensor], meta: dict, *,
                       progress: bool = True, stop: Callable[[], bool] | None = None,
                       grams: "tuple[list[torch.Tensor], tuple] | None" = None) -> nn.Module:
    """Redo the least-squares refit a prune recorded in its ``meta`` (deterministic: same source,
    seed, windows and damping), e.g. when a stored run is rebuilt from its kept indices; for ``region``
    also the layer-by-layer MLP reconstruction (:func:`reconstruct_mlps`, seeded), whose per-layer
    errors and time go to ``meta["region"]``. ``grams``: statistics already computed (a refit-probing
    search's :attr:`WidthPlan.refit_grams`), used when they were made on the same windows. In place."""
    recorded = dict(meta.get("compensation") or {})
    if recorded.get("method", "none") == "none":
        return pruned
    options = CompensationOptions.from_dict(recorded)
    calibration = CalibrationOptions.from_dict(meta.get("calibration"))
    if grams is not None and grams[1] == grams_key(options, calibration):
        grams_list = grams[0]
    else:
        grams_list = compensation_grams(loaded, options, source=calibration.source, seed=calibration.seed,
                                        progress=progress, stop=stop)
    compensate_pruned(pruned, loaded.model, kept, grams_list, options.damping)
    if options.method == "region":
        report = reconstruct_mlps(loaded, pruned, options, source=calibration.source, seed=calibration.seed,
                                  progress=progress, stop=stop)
        meta["region"] = report.to_dict()
    return pruned


def reconstruct_mlps(loaded: LoadedModel, pruned: nn.Module, options: CompensationOptions, *,
                     source: str = CalibrationOptions.source, seed: int = CalibrationOptions.seed,
                     batch_size: int = CalibrationOptions.batch_size, progress: bool = True,
                     stop: Callable[[], bool] | None = None) -> RegionReport:
    """The ``region`` compensation's second stage on a pruned model (usually already lsq-refitted): each
    MLP fitted to the dense one on ``options.region_samples`` × ``options.seq_len`` calibration windows
    of ``source``, bottom layer first, on the pruned model's own inputs (:mod:`core.prune.region`). In place."""
    windows = calibration_windows(loaded.tokenizer, source, options.region_samples, options.seq_len, seed,
                                  max_length=loaded.max_length)
    return reconstruct_regions(pruned, loaded.model, windows, steps=options.region_steps, lr=options.region_lr,
                               batch_tokens=options.region_batch, damping=options.damping,
                               target=options.region_target, seed=seed,
                               batch_size=batch_size, progress=progress, stop=stop)


def adaptive_heldout(loaded: LoadedModel, result: "ScoreResult | None", options: AllocationOptions) -> torch.Tensor:
    """Held-out windows for the adaptive search: the calibration split of the scoring source, disjoint
    from the windows the scores were computed on (never the evaluation split)."""
    if result is None:  # no scoring windows to stay clear of
        calib, score_samples = CalibrationOptions(), 0
    else:
        calib = result.calibration
        score_samples = calib.samples
    return heldout_windows(loaded.tokenizer, calib.source, options.heldout_samples, options.heldout_seq_len,
                           seed=calib.seed, score_samples=score_samples, score_seq_len=calib.seq_len,
                           max_length=loaded.max_length)


def preview_widths(loaded: LoadedModel, ratio: float, allocation: str = "uniform", *,
                   scores: "ScoreResult | list[torch.Tensor] | None" = None, round_to: int = 1,
                   options: AllocationOptions | None = None, batch_size: int = 4, progress: bool = True,
                   stop: Callable[[], bool] | None = None,
                   compensation: CompensationOptions | None = None) -> WidthPlan:
    """Per-layer widths an allocation would give, without pruning. ``global`` needs scores;
    ``adaptive`` also runs the search on held-out calibration windows (seconds to minutes on CPU) and
    returns its per-layer trace in ``plan.adaptive.traces``. ``compensation``: the refit the cut will get
    (default ``CompensationOptions()``, lsq); with one, the search probes every width refitted
    (:func:`refit_probing`) and the plan carries the refit's statistics for :func:`prune_with_scores`.
    ``ratio`` is checked here (:func:`check_ratio`)."""
    return _preview_widths(loaded, check_ratio(ratio), allocation, scores=scores, round_to=round_to, options=options,
                           batch_size=batch_size, progress=progress, stop=stop,
                           compensation=compensation or CompensationOptions())


def _preview_widths(loaded: LoadedModel, ratio: float, allocation: str, *,
                    scores: "ScoreResult | list[torch.Tensor] | None", round_to: int, options: AllocationOptions | None,
                    batch_size: int = 4, progress: bool, stop: Callable[[], bool] | None,
                    compensation: CompensationOptions | None = None) -> WidthPlan:
    """:func:`preview_widths` for a ratio the caller has checked."""
    options = options or AllocationOptions()
    refit_grams = None
    result = scores if isinstance(scores, ScoreResult) else None
    score_list = scores.scores if isinstance(scores, ScoreResult) else scores
    full = mlp_widths(loaded.model)
    adaptive = None
    if allocation == "adaptive":
        if score_list is None:
            raise PruneConfigError("The adaptive allocation needs neuron scores (they order each layer's neurons).")
        if [s.numel() for s in score_list] != full:
            raise PruneConfigError("These scores were computed for a model with different MLP widths.")
        windows = adaptive_heldout(loaded, result, options)
        evaluator = None
        if refit_probing(allocation, options, compensation):
            calibration = result.calibration if result is not None else CalibrationOptions()
            grams = compensation_grams(loaded, compensation, source=calibration.source, seed=calibration.seed,
                                       batch_size=batch_size, progress=progress, stop=stop)
            refit_grams = (grams, grams_key(compensation, calibration))
            evaluator = RefitMaskedEvaluator(loaded.model, windows, score_list, grams, compensation.damping,
                                             options.fidelity, batch_size)
        adaptive = adaptive_search(loaded.model, score_list, ratio, windows, fidelity=options.fidelity,
                                   mode=options.mode, halvings=options.halvings, min_keep=options.adaptive_min_keep,
                                   round_to=round_to, batch_size=batch_size, progress=progress, stop=stop,
                                   evaluator=evaluator)
        widths = adaptive.widths
    else:
        widths = _plan_widths(loaded.model, ratio, allocation, round_to, score_list, options)
    return WidthPlan(allocation, ratio, widths, full, adaptive, refit_grams)


def prune_with_scores(loaded: LoadedModel, result: ScoreResult, ratio: float, *, allocation: str = "uniform",
                      round_to: int = 1, options: AllocationOptions | None = None,
                      plan: WidthPlan | None = None, progress: bool = True,
                      stop: Callable[[], bool] | None = None,
                      compensation: CompensationOptions | None = None) -> PruneResult:
    """Keep the top-scoring neurons of each layer at the widths the allocation gives; returns a new
    (copied) smaller model. Pass ``plan`` (from :func:`preview_widths`) to reuse an adaptive search;
    ``compensation=CompensationOptions("lsq")`` refits every down_proj by least squares afterwards;
    ``CompensationOptions("region")`` then also reconstructs every MLP layer by layer (:func:`reconstruct_mlps`).
    ``ratio`` is checked here (:func:`check_ratio`), once; the planning below takes the checked value."""
    ratio = check_ratio(ratio)
    widths_before = mlp_widths(loaded.model)
    if [s.numel() for s in result.scores] != widths_before:
        raise PruneConfigError("These scores were computed for a model with different MLP widths.")
    options = options or AllocationOptions()
    compensation = compensation or CompensationOptions()
    if (plan is None or plan.allocation != allocation or plan.ratio != ratio
            or plan.full_widths != widths_before):
        plan = _preview_widths(loaded, ratio, allocation, scores=result, round_to=round_to, options=options,
                               progress=progress, stop=stop, compensation=compensation)
    widths = plan.widths
    kept = top_k_indices(result.scores, widths)
    model = prune_mlp_neurons(loaded.model, kept)
    meta = {
        "model": loaded.spec,
        "criterion": result.config.get("criterion"),
        "criterion_params": result.config.get("criterion_params", {}),
        "allocation": allocation,
        "ratio": ratio,
        "achieved_ratio": plan.achieved_ratio,
        "round_to": round_to,
        "original_intermediate_sizes": widths_before,
        "intermediate_sizes": widths,
        "kept_indices": [k.tolist() for k in kept],
        "calibration": {k: result.config.get(k) for k in ("source", "samples", "seq_len", "seed")},
        "compensation": compensation.to_dict() if compensation.method != "none" else {"method": "none"},
        "tool_version": __version__,
    }
    meta["params_removed_share"] = removed_shares(loaded.model, widths)["params_removed_share"]  # of ALL parameters
    if allocation != "uniform":
        meta["allocation_options"] = options.to_dict()
    if plan.adaptive is not None:
        a = plan.adaptive
        meta["adaptive"] = {"tolerance": a.tolerance, "fidelity": a.fidelity, "mode": a.mode,
                            "search_ratio": a.search_ratio, "evaluations": a.evaluations,
                            "heldout_tokens": a.heldout_tokens, "refit_probes": plan.refit_grams is not None,
                            "trace": [{"layer": t.layer, "tried": t.tried, "chosen": t.chosen, "width": t.width}
                                      for t in a.traces]}
    apply_compensation(loaded, model, kept, meta, progress=progress, stop=stop, grams=plan.refit_grams)
    return PruneResult(model, widths, kept, meta)
