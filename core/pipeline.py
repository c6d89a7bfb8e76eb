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
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .adapters import mlp_widths
from .allocate import top_k_indices, uniform_widths
from .criteria import ScoreOptions, get_criterion
from .data import calibration_windows
from .errors import DataError, HFPruneError, PruneConfigError
from .models import LoadedModel
from .prune import prune_mlp_neurons

ALLOCATIONS = ("uniform",)


@dataclass
class ScoreResult:
    """Per-layer fp32 scores (d_ff_l,) and how they were made."""

    scores: list[torch.Tensor]
    config: dict
    seconds: float

    def save(self, path: str | os.PathLike) -> Path:
        """Write scores as safetensors (``layer_000`` …) with the config in the header metadata."""
        target = Path(path)
        if target.suffix != ".safetensors":
            raise HFPruneError(f"Scores are saved as .safetensors; got '{target.name}'.")
        if not target.parent.exists():
            raise HFPruneError(f"Parent folder {target.parent} does not exist.")
        tensors = {f"layer_{i:03d}": s.contiguous() for i, s in enumerate(self.scores)}
        tmp = target.with_name(f".{target.name}.partial")
        save_file(tensors, str(tmp), metadata={"config": json.dumps(self.config), "seconds": str(self.seconds)})
        os.replace(tmp, target)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ScoreResult":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
        except Exception as exc:
            raise HFPruneError(f"Could not read scores file {path}: {exc}") from exc
        scores = [tensors[k] for k in sorted(tensors)]
        return cls(scores, json.loads(metadata.get("config", "{}")), float(metadata.get("seconds", "nan")))


@dataclass
class PruneResult:
    model: nn.Module
    widths: list[int]
    kept: list[torch.Tensor]
    meta: dict = field(default_factory=dict)


def score_model(loaded: LoadedModel, criterion: str, *, source: str = "wiki", samples: int = 16, seq_len: int = 128,
                seed: int = 0, batch_size: int = 4, progress: bool = True,
                stop: Callable[[], bool] | None = None) -> ScoreResult:
    """Score every MLP neuron of ``loaded`` with ``criterion`` on calibration windows from ``source``."""
    scorer = get_criterion(criterion)
    windows = calibration_windows(loaded.tokenizer, source, samples, seq_len, seed, max_length=loaded.max_length)
    vocab = loaded.model.config.vocab_size
    if int(windows.max()) >= vocab:
        raise DataError(f"The tokenizer produced ids up to {int(windows.max())} but the model's vocabulary has {vocab}.")
    start = time.perf_counter()
    scores = scorer(loaded.model, windows, ScoreOptions(batch_size=batch_size, progress=progress, seed=seed, stop=stop))
    seconds = time.perf_counter() - start
    config = {"model": loaded.spec, "criterion": criterion, "cost": scorer.cost, "source": source,
              "samples": samples, "seq_len": seq_len, "seed": seed, "batch_size": batch_size,
              "tokens": int(windows.numel()), "tool_version": __version__}
    return ScoreResult([s.detach().cpu().float() for s in scores], config, seconds)


def plan_widths(model: nn.Module, ratio: float, allocation: str = "uniform", round_to: int = 1) -> list[int]:
    """Kept width per layer for a ratio and allocation (no scores needed for uniform)."""
    if allocation not in ALLOCATIONS:
        raise PruneConfigError(f"Unknown allocation '{allocation}'; available: {', '.join(ALLOCATIONS)}.")
    return uniform_widths(mlp_widths(model), ratio, round_to)


def prune_with_scores(loaded: LoadedModel, result: ScoreResult, ratio: float, *, allocation: str = "uniform",
                      round_to: int = 1) -> PruneResult:
    """Keep the top-scoring neurons of each layer; returns a new (copied) smaller model."""
    widths_before = mlp_widths(loaded.model)
    if [s.numel() for s in result.scores] != widths_before:
        raise PruneConfigError("These scores were computed for a model with different MLP widths.")
    widths = plan_widths(loaded.model, ratio, allocation, round_to)
    kept = top_k_indices(result.scores, widths)
    model = prune_mlp_neurons(loaded.model, kept)
    meta = {
        "model": loaded.spec,
        "criterion": result.config.get("criterion"),
        "allocation": allocation,
        "ratio": float(ratio),
        "round_to": round_to,
        "original_intermediate_sizes": widths_before,
        "kept_indices": [k.tolist() for k in kept],
        "calibration": {k: result.config.get(k) for k in ("source", "samples", "seq_len", "seed")},
        "tool_version": __version__,
    }
    return PruneResult(model, widths, kept, meta)
