"""Importance criteria behind one interface (Torch-Pruning's ``Importance``: given a model and
calibration windows, return one 1-D score per MLP neuron and layer), plus a name registry.

Taylor criteria differ only in the loss whose gradient is taken; gradient-free criteria read
weights and forward activations. Higher score = more important = kept.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from core import metrics
from core.errors import HFPruneError, SelectionError, VisionConfigError
from core.importance.obs import obs_scores, weighted_grams
from core.importance.taylor import activation_sq_norms, loss_taylor_scores, taylor_scores
from core.models.adapters import mlp_handles
from core.models.encoders import DEFAULT_TEMP_INV, embed
from core.options import Options, knob


@dataclass
class ScoreOptions:
    """Shared knobs of a scoring pass."""

    batch_size: int = 4
    progress: bool = True
    seed: int = 0
    stop: Callable[[], bool] | None = None
    data_parallel: bool = False  # inside a torch.distributed group: shard windows by rank, all-reduce the sums
    grad_checkpointing: bool = False  # Taylor criteria: recompute layer activations in the backward
    forward: Callable | None = None  # encoders: forward(model, batch) for pixels / ids; None = the decoder stack


class Criterion(ABC):
    """Given a model and calibration windows (N, T), return a list of (d_ff_l,) fp32 scores."""

    name: ClassVar[str]
    cost: ClassVar[str]  # "weights only" | "forward" | "forward+backward" | "forward+backward+teacher"
    summary: ClassVar[str]
    # passes per calibration batch: (forwards, backwards); the teacher forward of self_distill counts
    passes: ClassVar[tuple[int, int]] = (1, 1)
    # which models it scores: "lm" (decoder language models), "encoder" (vision / text encoders)
    applies_to: ClassVar[frozenset[str]] = frozenset({"lm"})

    # The criterion's tunable parameters, declared once (CLI flags, dashboard sliders and the
    # ``criterion_params`` recorded with the scores all come from it); None = no parameters.
    Params: ClassVar[type[Options] | None] = None

    def __init__(self, **params) -> None:
        if self.Params is None:
            if params:
                raise TypeError(f"{self.name} takes no parameters")
            self.p = None
        else:
            self.p = self.Params(**params)

    def params(self) -> dict:
        """The criterion's tunable parameters (recorded with the scores)."""
        return self.p.to_dict() if self.p is not None else {}

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
                             progress=options.progress, stop=options.stop, data_parallel=options.data_parallel,
                             grad_checkpointing=options.grad_checkpointing)


class _Entropy(torch.autograd.Function):
    """H(softmax(z)) per row with a hand-written backward.

    With lse = logsumexp(z) and p = exp(z − lse): H = lse − Σ p·z and dH/dz = −p ⊙ (z − lse + H).
    Autograd through ``-(exp(logp) * logp).sum()`` keeps four (R, V) temporaries and makes five
    passes over them in the backward; this saves p (z is kept by the caller) and makes two."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:  # (R, V) → (R,)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (R, 1)
        p = torch.exp(logits - lse)  # (R, V)
        h = lse.squeeze(-1) - (p * logits).sum(-1)
        ctx.save_for_backward(logits, p, lse.squeeze(-1) - h)
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor) -> torch.Tensor:
        logits, p, shift = ctx.saved_tensors  # shift = lse − H, (R,)
        return (shift.unsqueeze(-1) - logits).mul_(p).mul_(grad_h.unsqueeze(-1))  # one (R, V) temporary


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) per row: (R, V) → (R,), differentiable."""
    return _Entropy.apply(logits)


def _softmax_ce(logits: torch.Tensor, targets: torch.Tensor):
    """Shared forward of the fused losses: logits (R, V), targets (R,) with −100 = none →
    (p (R, V), logsumexp (R,), CE (R,) zero where there is no target, clamped targets, valid mask)."""
    valid = targets >= 0
    safe = targets.clamp_min(0)
    lse = torch.logsumexp(logits, dim=-1)
    ce = (lse - logits.gather(1, safe.unsqueeze(1)).squeeze(1)) * valid
    return torch.exp(logits - lse.unsqueeze(-1)), lse, ce, safe, valid


class _CrossEntropy(torch.autograd.Function):
    """Next-token CE per row with a hand-written backward: CE = lse − z_y, dCE/dz = p − onehot(y).

    Rows whose target is −100 get loss 0 and no gradient. Like :class:`_Entropy`, this keeps one
    (R, V) tensor (p) for the backward instead of log_softmax's temporaries."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (R, V), (R,) → (R,)
        p, _lse, ce, safe, valid = _softmax_ce(logits, targets)
        ctx.save_for_backward(p, safe, valid)
        return ce

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        p, safe, valid = ctx.saved_tensors
        grad = p.clone()
        grad.scatter_add_(1, safe.unsqueeze(1), torch.full_like(safe, -1, dtype=p.dtype).unsqueeze(1))
        return grad.mul_((grad_loss * valid).unsqueeze(-1)), None


class _EntropyCE(torch.autograd.Function):
    """w·H(p) + (1−w)·CE per row, fused: one softmax, one (R, V) tensor kept for the backward.

    d/dz = p ⊙ (w·(lse − H − z) + (1−w)) − (1−w)·onehot(y) (the CE part only where the target is valid)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, weight: float) -> torch.Tensor:
        p, lse, ce, safe, valid = _softmax_ce(logits, targets)
        h = lse - (p * logits).sum(-1)
        ctx.save_for_backward(logits, p, lse - h, safe, valid)
        ctx.weight = weight
        return weight * h + (1.0 - weight) * ce

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, p, shift, safe, valid = ctx.saved_tensors
        w = ctx.weight
        ce_rows = (1.0 - w) * valid.to(p.dtype)  # (R,)
        # w·(shift − z) + (1−w)·valid, computed into one (R, V) temporary
        grad = (shift.unsqueeze(-1) - logits).mul_(w).add_(ce_rows.unsqueeze(-1)).mul_(p)
        grad.scatter_add_(1, safe.unsqueeze(1), -ce_rows.unsqueeze(1))
        return grad.mul_(grad_loss.unsqueeze(-1)), None, None


def entropy_ce(logits: torch.Tensor, targets: torch.Tensor, weight: float) -> torch.Tensor:
    """w·entropy + (1−w)·next-token CE per row (nats): (R, V), (R,) → (R,), differentiable."""
    return _EntropyCE.apply(logits, targets, float(weight))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row next-token CE (nats): logits (R, V), targets (R,) with −100 = none → (R,), differentiable."""
    return _CrossEntropy.apply(logits, targets)


@dataclass
class SelfDistillParams(Options):
    label = "self_distill"

    temperature: float = knob(0.5, "self_distill: teacher temperature τ (< 1 sharpens the teacher)", low=0.0,
                              low_open=True, ui_low=0.05, ui_high=1.0, step=0.05, flag="temperature")
    alpha: float = knob(0.5, "self_distill: KL weight α in (1−α)·CE + α·KL", low=0.0, high=1.0, step=0.05,
                        flag="alpha")


@dataclass
class FisherParams(Options):
    label = "fisher"

    aggregate: str = knob("sq_sum", "fisher: score aggregate (sq_sum = diagonal-Fisher KL estimate)",
                          choices=("sq_sum", "sum_abs", "abs_sum"), flag="fisher-aggregate")
    draws: int = knob(1, "fisher: label draws from the model's own distribution", low=1, ui_high=8,
                      flag="fisher-draws")


@dataclass
class EntropyCEParams(Options):
    label = "entropy+ce"

    weight: float = knob(0.5, "entropy+ce: entropy weight w in w·H + (1−w)·CE", low=0.0, high=1.0, step=0.05,
                         flag="weight")


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
        return cross_entropy(logits, targets)


class SelfDistillCriterion(TaylorCriterion):
    """SDMPrune-style self-distillation, done so that it has a gradient.

    KL(p_dense ‖ p_model) has exactly zero gradient at the dense model (student = teacher), so the
    teacher is *sharpened*: its logits are divided by τ < 1 before the softmax, and the KL is mixed
    with next-token CE: L = (1−α)·CE + α·KL(softmax(z_teacher/τ) ‖ softmax(z)). The teacher is the
    dense model itself run once more under no_grad: one extra forward per batch, counted in ``cost``.
    With τ = 1 and α = 1 every score is (numerically) zero — that is the degenerate case.
    """

    name = "self_distill"
    cost = "forward+backward+teacher"
    passes = (2, 1)
    summary = ("SDMPrune-style: (1−α)·CE + α·KL(sharpened dense teacher ‖ model), τ < 1; costs an extra "
               "teacher forward per batch.")

    Params = SelfDistillParams

    def __init__(self, temperature: float = 0.5, alpha: float = 0.5):
        super().__init__(temperature=temperature, alpha=alpha)
        self.temperature, self.alpha = self.p.temperature, self.p.alpha

    def token_loss(self, logits, targets, teacher):
        if teacher is None:
            raise HFPruneError("self_distill needs teacher logits.")
        logp = F.log_softmax(logits, dim=-1)
        teacher_logp = F.log_softmax(teacher.to(logits.dtype), dim=-1)
        kl = metrics.kl(teacher_logp, logp)
        loss = self.alpha * kl
        if self.alpha < 1.0:
            ce = F.nll_loss(logp, targets.clamp_min(0), reduction="none") * (targets >= 0)
            loss = loss + (1.0 - self.alpha) * ce
        return loss

    def __call__(self, model, windows, options):
        # The dense model itself is the teacher (frozen, no_grad inside taylor_scores): an extra forward.
        return taylor_scores(model, windows, self, batch_size=options.batch_size, aggregate=self.aggregate,
                             teacher=model, teacher_temperature=self.temperature, progress=options.progress,
                             stop=options.stop, data_parallel=options.data_parallel,
                             grad_checkpointing=options.grad_checkpointing)


class FisherCriterion(TaylorCriterion):
    """Empirical Fisher with labels *sampled from the model's own distribution* (seeded).

    CE against y_t ~ p_t is the whole-menu idea in expectation: E_y[g g^T] is the Fisher information,
    whose quadratic form is the second-order KL(p_dense ‖ p_pruned). The mean gradient is zero, so
    the score must be a second moment: by default ``sq_sum`` = Σ_windows (Σ_t a_tj·g_tj)², i.e. the
    diagonal-Fisher estimate of the KL increase when neuron j is removed (cross terms between
    positions vanish in expectation because each y_t is drawn independently). ``sum_abs`` gives the
    HFPrune-style Σ|a·g| with sampled labels instead.
    """

    name = "fisher"
    summary = ("Taylor with labels sampled from the model's own distribution; squared per-window Σa·g = "
               "diagonal-Fisher estimate of the KL increase.")

    Params = FisherParams

    def __init__(self, aggregate: str = "sq_sum", draws: int = 1):
        super().__init__(aggregate=aggregate, draws=draws)
        self.fisher_aggregate, self.draws = self.p.aggregate, self.p.draws
        self._seed = 0

    def row_uniforms(self, window_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
        """One uniform in [0, 1) per (window, position), keyed by (seed, draw, global window index):
        (B,) ids → (B·T,) fp32. The label drawn for a token is then the same whatever the batch size
        or the rank that scores the window, so data-parallel scores equal single-process ones."""
        rows = []
        for w in window_ids.tolist():
            key = (self._seed * 1_000_003 + self._draw) * 1_000_000_007 + int(w)
            rows.append(torch.rand(seq_len, generator=torch.Generator().manual_seed(key % (2**63 - 1))))
        return torch.cat(rows)

    def token_loss(self, logits, targets, teacher, uniforms: torch.Tensor | None = None):
        """CE against labels drawn from softmax(logits) by inverse CDF with ``uniforms`` (R,)."""
        if uniforms is None:
            raise HFPruneError("fisher draws its labels from per-token uniforms; score it through taylor_scores.")
        with torch.no_grad():
            cdf = F.softmax(logits.detach(), dim=-1).cumsum_(dim=-1)  # (R, V)
            sampled = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)  # (R,)
            sampled = sampled.clamp_(max=logits.shape[-1] - 1)
        return cross_entropy(logits, sampled)

    def __call__(self, model, windows, options):
        self._seed = options.seed
        total = None
        for draw in range(self.draws):
            self._draw = draw
            got = taylor_scores(model, windows, self, batch_size=options.batch_size, aggregate=self.fisher_aggregate,
                                progress=options.progress, stop=options.stop, data_parallel=options.data_parallel,
                                grad_checkpointing=options.grad_checkpointing)
            total = got if total is None else [t + g for t, g in zip(total, got)]
        return [t / self.draws for t in total]


class EntropyCEMixCriterion(TaylorCriterion):
    """L = w·H(p) + (1−w)·CE: the whole-distribution signal of entropy plus the data signal of CE."""

    name = "entropy+ce"
    summary = "Weighted mix w·entropy + (1−w)·cross-entropy (w exposed, default 0.5)."

    Params = EntropyCEParams

    def __init__(self, weight: float = 0.5):
        super().__init__(weight=weight)
        self.weight = self.p.weight

    def token_loss(self, logits, targets, teacher):
        return entropy_ce(logits, targets, self.weight)


@dataclass
class ObsParams(Options):
    label = "obs"

    weighting: str = knob("entropy", "obs: weight each token's share of the Gram by ‖∂L/∂y_t‖^power at the down_proj "
                          "output for this loss (none = plain OBS, forward only)",
                          choices=("entropy", "cross_entropy", "none"), flag="obs-weighting")
    power: float = knob(2.0, "obs: exponent of the gradient norm in the token weights (0 = unweighted)", low=0.0,
                        ui_high=2.0, step=0.25, flag="obs-power")
    damping: float = knob(0.01, "obs: ridge added to the Gram, a fraction of its mean diagonal", low=0.0,
                          low_open=True, ui_low=0.001, ui_high=0.5, step=0.001, flag="obs-damping")
    block: int = knob(16, "obs: neurons removed per greedy step (fewer = closer to one-at-a-time, slower)", low=1,
                      ui_high=128, flag="obs-block")


class ObsCriterion(Criterion):
    """Greedy structured OBS (:mod:`core.importance.obs`): neurons ranked by the error of reconstructing
    the down_proj output from the kept ones, on a Gram whose tokens are weighted by how much the model's
    output entropy depends on the layer's output there. Compose it with the least-squares refit
    (``--compensate lsq``), whose solution the selection's error assumes. The Gram needs many more tokens
    than the d_ff neurons: score it on ~128 windows of 128 tokens (benchmarks/obs.py: on 16 it loses to
    entropy on the in-domain text). Power 2 (the default) weighs tokens by ‖∂H/∂y_t‖², a Fisher-like
    weight; power 1 measured a little better on out-of-domain text and worse in-domain."""

    name = "obs"
    cost = "forward+backward"
    summary = ("Greedy structured OBS on the down_proj-input Gram, each token weighted by ‖∂entropy/∂y_t‖² at the "
               "layer's output (weighting none: plain OBS, forward only); pair with the lsq refit; ~128 windows.")

    Params = ObsParams

    def __init__(self, weighting: str = "entropy", power: float = 2.0, damping: float = 0.01, block: int = 16):
        super().__init__(weighting=weighting, power=power, damping=damping, block=block)
        if self.p.weighting == "none" or self.p.power == 0.0:
            self.cost, self.passes = "forward", (1, 0)  # no backward: the instance says so in its record

    def __call__(self, model, windows, options):
        loss = None if self.cost == "forward" else REGISTRY[self.p.weighting]()
        stats = weighted_grams(model, windows, loss, power=self.p.power, batch_size=options.batch_size,
                               progress=options.progress, stop=options.stop, data_parallel=options.data_parallel)
        return obs_scores(model, stats, self.p.damping, self.p.block, progress=options.progress, stop=options.stop)


class MagnitudeCriterion(Criterion):
    name = "magnitude"
    applies_to = frozenset({"lm", "encoder"})
    cost = "weights only"
    passes = (0, 0)
    summary = "L2 norms of the neuron's gate row (if gated), up (fc1) row and down (fc2) column, summed; ignores data."

    def __call__(self, model, windows, options):
        out = []
        for h in mlp_handles(model):
            norm = sum(linear.weight.detach().float().norm(dim=1 if role != "down" else 0)
                       for role, linear in h.linears.items())  # (d_ff,)
            out.append(norm.cpu())
        return out


def _activation_stats(model: nn.Module, windows: torch.Tensor, options: ScoreOptions):
    """The forward-only criteria's statistics of every down_proj input a (d_ff,) per layer: Σ a², Σ a and
    the token count (:func:`core.importance.taylor.activation_sq_norms` with the pass's options)."""
    return activation_sq_norms(model, windows, batch_size=options.batch_size, progress=options.progress,
                               stop=options.stop, data_parallel=options.data_parallel, forward=options.forward)


class WandaCriterion(Criterion):
    name = "wanda"
    applies_to = frozenset({"lm", "encoder"})
    cost = "forward"
    passes = (1, 0)
    summary = "Structured Wanda (FLAP-WIFN): mean |W_down[:, j]| times the L2 norm of activation a_j."

    def __call__(self, model, windows, options):
        sq, _total, _count = _activation_stats(model, windows, options)
        return [h.down.weight.detach().float().abs().mean(dim=0).cpu() * s.sqrt()
                for h, s in zip(mlp_handles(model), sq)]


class FluctuationCriterion(Criterion):
    """FLAP's fluctuation metric: the variance of a_j over calibration tokens times ‖W_down[:, j]‖².

    (FLAP also folds the removed neurons' mean output into a bias; these architectures have no
    down_proj bias, so only the ranking is used.)"""

    name = "fluctuation"
    applies_to = frozenset({"lm", "encoder"})
    cost = "forward"
    passes = (1, 0)
    summary = "FLAP: variance of activation a_j over calibration tokens times the squared norm of W_down[:, j]."

    def __call__(self, model, windows, options):
        sq, total, count = _activation_stats(model, windows, options)
        out = []
        for h, s, t in zip(mlp_handles(model), sq, total):
            mean = t / count
            variance = (s / count - mean.pow(2)).clamp_min(0.0)
            out.append(variance * h.down.weight.detach().float().pow(2).sum(dim=0).cpu())
        return out


class RandomCriterion(Criterion):
    name = "random"
    applies_to = frozenset({"lm", "encoder"})
    cost = "weights only"
    passes = (0, 0)
    summary = "Uniform random scores (seeded): the floor every real criterion must beat."

    def __call__(self, model, windows, options):
        generator = torch.Generator().manual_seed(options.seed)
        return [torch.rand(h.width, generator=generator) for h in mlp_handles(model)]


def similarity_entropy(features: torch.Tensor, temp_inv: float, self_similarity: bool = True) -> torch.Tensor:
    """AMP's label-free loss: features (B, H) → scalar E = −mean_i Σ_j p_ij log p_ij with
    p_i = softmax_j(temp_inv · f̂_i·f̂_j), f̂ = f/‖f‖, in fp32; ``self_similarity=False`` removes j = i."""
    f = F.normalize(features.float(), dim=-1)  # (B, H)
    logits = temp_inv * f @ f.t()  # (B, B)
    if not self_similarity:
        logits = logits.masked_fill(torch.eye(f.shape[0], dtype=torch.bool, device=f.device), float("-inf"))
        logp = torch.log_softmax(logits, dim=-1)
        return -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1).mean()
    return metrics.entropy(metrics.log_probs(logits)).mean()


class AmpEntropyCriterion(Criterion):
    """AMP: Taylor scores |Σ_tokens a·g| per image, averaged, for the batch similarity entropy."""

    name = "amp_entropy"
    applies_to = frozenset({"encoder"})
    cost = "forward+backward"
    summary = ("AMP: entropy of the batch's embedding-similarity distribution (no labels); per image "
               "|Σ_tokens a·g| at the fc2 input, averaged over images.")

    def __init__(self, temp_inv: float | None = None, self_similarity: bool = True):
        if temp_inv is not None and not float(temp_inv) > 0:
            raise VisionConfigError(f"amp_entropy temp_inv must be > 0, got {temp_inv}.")
        self.temp_inv = None if temp_inv is None else float(temp_inv)
        self.self_similarity = bool(self_similarity)

    def params(self) -> dict:
        return {"temp_inv": self.temp_inv, "self_similarity": self.self_similarity}

    def resolved_temp_inv(self, model: nn.Module) -> float:
        return self.temp_inv or DEFAULT_TEMP_INV.get(model.config.model_type, 20.0)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] < 2:
            raise SelectionError("The similarity entropy needs at least 2 examples per batch.")
        return similarity_entropy(embed(model, batch), self.resolved_temp_inv(model), self.self_similarity)

    def __call__(self, model, data, options):
        return loss_taylor_scores(model, data, self.loss, batch_size=options.batch_size, aggregate="abs_sum",
                                  progress=options.progress, stop=options.stop)


def encoder_criterion(name: str, **params) -> Criterion:
    """A criterion for encoders by name (``amp_entropy`` takes ``temp_inv`` / ``self_similarity``)."""
    if name not in ENCODER_CRITERIA:
        raise SelectionError(f"Criterion '{name}' does not apply to encoders; choose one of: "
                             f"{', '.join(ENCODER_CRITERIA)}.")
    params = {k: v for k, v in params.items() if v is not None}
    try:
        return ENCODER_CRITERIA[name](**params)
    except TypeError as exc:
        raise SelectionError(f"Criterion '{name}' does not take parameters {sorted(params)}.") from exc


# The one registry: every criterion, LLM and encoder. ``applies_to`` says which models a criterion scores;
# REGISTRY (decoder LMs) and ENCODER_CRITERIA are views of it.
ALL_CRITERIA: dict[str, type[Criterion]] = {
    cls.name: cls for cls in (EntropyCriterion, CrossEntropyCriterion, SelfDistillCriterion, FisherCriterion,
                              EntropyCEMixCriterion, ObsCriterion, MagnitudeCriterion, WandaCriterion,
                              FluctuationCriterion, RandomCriterion, AmpEntropyCriterion)
}
REGISTRY: dict[str, type[Criterion]] = {n: c for n, c in ALL_CRITERIA.items() if "lm" in c.applies_to}
ENCODER_CRITERIA: dict[str, type[Criterion]] = {
    n: c for n in ("amp_entropy", "magnitude", "wanda", "fluctuation", "random")
    for c in [ALL_CRITERIA[n]] if "encoder" in c.applies_to}


def _unknown(name: str) -> HFPruneError:
    """The one sentence for a name that is not a language-model criterion."""
    if name in ALL_CRITERIA:
        return HFPruneError(f"Criterion '{name}' scores encoders only; for a language model choose one of: "
                            f"{', '.join(REGISTRY)}.")
    return HFPruneError(f"Unknown criterion '{name}'; choose one of: {', '.join(REGISTRY)}.")


def get_criterion(name: str, **params) -> Criterion:
    """Instantiate a criterion by registry name with optional parameters (e.g. ``temperature``/``alpha``
    for self_distill, ``weight`` for entropy+ce, ``aggregate``/``draws`` for fisher)."""
    if name not in REGISTRY:
        raise _unknown(name)
    try:
        return REGISTRY[name](**params)
    except TypeError as exc:
        raise HFPruneError(f"Criterion '{name}' does not take parameters {sorted(params)}: {exc}") from exc


def resolve_params(name: str, values: dict | None = None) -> dict:
    """The full parameter set ``name`` would score with, given ``values`` that may hold parameters of
    other criteria too (a form with every criterion's knobs): keys the criterion does not take are
    ignored, missing ones take their defaults, bad values raise a clear error. ``values`` may also be
    keyed by criterion ({"self_distill": {"temperature": 0.3}, …}), as the dashboard sends them."""
    if name not in REGISTRY:
        raise _unknown(name)
    if values and any(isinstance(v, dict) for v in values.values()):
        values = values.get(name) or {}
    takes = REGISTRY[name]().params()
    return get_criterion(name, **{k: v for k, v in (values or {}).items() if k in takes and v is not None}).params()


def describe() -> list[dict]:
    """One row per criterion: name, cost, passes per batch (forward, backward), summary, default params."""
    return [{"name": name, "cost": cls.cost, "forwards": cls.passes[0], "backwards": cls.passes[1],
             "summary": cls.summary, "params": cls().params()} for name, cls in REGISTRY.items()]


def needs_data(name: str) -> bool:
    return get_criterion(name).cost != "weights only"


def parameter_knobs() -> list[tuple[str, type[Options], str]]:
    """(criterion, its Params class, field) for every tunable criterion parameter, in registry order:
    what the CLI turns into flags and the dashboard into sliders."""
    return [(name, cls.Params, f.name) for name, cls in REGISTRY.items() if cls.Params is not None
            for f, _spec, _kind in cls.Params.knobs()]


def add_parameter_arguments(parser) -> None:
    """Add every criterion's parameter flags (``--temperature``, ``--fisher-aggregate`` …) to an argparse
    parser; a flag not typed on the command line leaves no attribute (see :func:`parameters_from_args`)."""
    for cls in dict.fromkeys(c.Params for c in REGISTRY.values() if c.Params is not None):
        cls.add_arguments(parser, only_given=True)


def parameters_from_args(args, criterion: str) -> dict:
    """The parameters of ``criterion`` typed on the command line; a flag of another criterion is an error."""
    if criterion not in REGISTRY:
        raise _unknown(criterion)
    own = REGISTRY[criterion].Params
    foreign = [cls.flag(field) for name, cls, field in parameter_knobs()
               if cls is not own and field in cls.given(args)]
    if foreign:
        raise HFPruneError(f"{', '.join(sorted(set(foreign)))} does not apply to the '{criterion}' criterion.")
    return own.given(args) if own is not None else {}
