"""Importance criteria behind one interface (Torch-Pruning's ``Importance``: given a model and
calibration windows, return one 1-D score per MLP neuron and layer), plus a name registry.

Taylor criteria differ only in the loss whose gradient is taken; gradient-free criteria read
weights and forward activations. Higher score = more important = kept.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import mlp_handles
from .errors import HFPruneError
from .scoring import activation_sq_norms, taylor_scores


@dataclass
class ScoreOptions:
    """Shared knobs of a scoring pass."""

    batch_size: int = 4
    progress: bool = True
    seed: int = 0
    stop: Callable[[], bool] | None = None


class Criterion(ABC):
    """Given a model and calibration windows (N, T), return a list of (d_ff_l,) fp32 scores."""

    name: ClassVar[str]
    cost: ClassVar[str]  # "weights only" | "forward" | "forward+backward" | "forward+backward+teacher"
    summary: ClassVar[str]

    @abstractmethod
    def __call__(self, model: nn.Module, windows: torch.Tensor, options: ScoreOptions) -> list[torch.Tensor]:
        ...


class TaylorCriterion(Criterion):
    """|a · ∂L/∂a| summed over tokens and samples, for the loss L this subclass defines."""

    cost = "forward+backward"
    aggregate: str = "sum_abs"

    def position_weights(self, seq_len: int) -> torch.Tensor:
        """Per-sample mean over all T positions."""
        return torch.full((seq_len,), 1.0 / seq_len)

    @abstractmethod
    def token_loss(self, logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        """logits (R, V) fp32 → loss per row (R,)."""

    def __call__(self, model, windows, options):
        return taylor_scores(model, windows, self, batch_size=options.batch_size, aggregate=self.aggregate,
                             progress=options.progress, stop=options.stop)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) per row: (R, V) → (R,)."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


class EntropyCriterion(TaylorCriterion):
    name = "entropy"
    summary = "HFPrune: entropy of the model's own full next-token distribution; no labels, no teacher."

    def token_loss(self, logits, targets, teacher):
        return entropy(logits)


class CrossEntropyCriterion(TaylorCriterion):
    name = "cross_entropy"
    summary = "LLM-Pruner-style Taylor: next-token cross-entropy against the calibration text (one-hot)."

    def position_weights(self, seq_len: int) -> torch.Tensor:
        weights = torch.full((seq_len,), 1.0 / (seq_len - 1))
        weights[-1] = 0.0  # the last position has no next token
        return weights

    def token_loss(self, logits, targets, teacher):
        return F.cross_entropy(logits, targets.clamp_min(0), reduction="none") * (targets >= 0)


class MagnitudeCriterion(Criterion):
    name = "magnitude"
    cost = "weights only"
    summary = "L2 norms of the neuron's gate row, up row and down column, summed; ignores data."

    def __call__(self, model, windows, options):
        out = []
        for h in mlp_handles(model):
            norm = h.gate.weight.detach().float().norm(dim=1) + h.up.weight.detach().float().norm(dim=1)
            out.append((norm + h.down.weight.detach().float().norm(dim=0)).cpu())
        return out


class WandaCriterion(Criterion):
    name = "wanda"
    cost = "forward"
    summary = "Structured Wanda (FLAP-WIFN): mean |W_down[:, j]| times the L2 norm of activation a_j."

    def __call__(self, model, windows, options):
        sq, _total, _count = activation_sq_norms(model, windows, batch_size=options.batch_size,
                                                 progress=options.progress, stop=options.stop)
        return [h.down.weight.detach().float().abs().mean(dim=0).cpu() * s.sqrt()
                for h, s in zip(mlp_handles(model), sq)]


class RandomCriterion(Criterion):
    name = "random"
    cost = "weights only"
    summary = "Uniform random scores (seeded): the floor every real criterion must beat."

    def __call__(self, model, windows, options):
        generator = torch.Generator().manual_seed(options.seed)
        return [torch.rand(h.width, generator=generator) for h in mlp_handles(model)]


REGISTRY: dict[str, type[Criterion]] = {
    cls.name: cls for cls in (EntropyCriterion, CrossEntropyCriterion, MagnitudeCriterion, WandaCriterion, RandomCriterion)
}


def get_criterion(name: str) -> Criterion:
    """Instantiate a criterion by registry name; unknown names list the valid ones."""
    if name not in REGISTRY:
        raise HFPruneError(f"Unknown criterion '{name}'; choose one of: {', '.join(REGISTRY)}.")
    return REGISTRY[name]()


def needs_data(name: str) -> bool:
    return get_criterion(name).cost != "weights only"
