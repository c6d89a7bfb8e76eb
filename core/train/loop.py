"""The one training engine: a student, a frozen teacher, an objective, a parameter set, a budget.

Recovery after pruning (core.recover), DDP's gates, the prune→quantize→distil stage and vision
feature distillation are all this loop with different plug-ins:

- an **objective** (:class:`Objective`) runs forward + backward of one batch and reports its loss;
  it also gives the lower-is-better held-out number the loop tracks (here :class:`LogitDistillation`:
  ``α·τ²·KL(p_teacher ‖ p_student) + (1−α)·CE`` over all positions, fp32, in position chunks so a
  262k-token vocabulary never materialises (B·T, V) at once);
- a **parameter set** (:class:`ParamSet`): the named parameters that train (everything else is frozen
  for the run), optional per-group learning-rate factors and a hook run after every optimiser step
  (e.g. DDP's gate clamp);
- a **budget** in steps, tokens or minutes (:class:`TrainOptions`), whichever ends first.

The loop: AdamW, linear warm-up over ``warmup_steps`` then cosine decay to ``min_lr_ratio`` over the
budget's progress (for a minutes budget, progress is elapsed time / budget), gradient clipping,
fp32 on the CPU and bf16 autocast on CUDA (losses always in fp32), optional gradient checkpointing,
deterministic by seed for step and token budgets. Every ``eval_every`` steps the objective's held-out
number is measured and the best state of the trainable parameters is kept in memory; at the end the
student is left at its best checkpoint (``keep_best``).

**Stop**: ``stop()`` is checked before every step and between held-out batches; when it returns true
the trainable parameters are put back to their values from before the run and :class:`Stopped` is
raised — a stopped run leaves the student exactly as it was (nothing half-trained survives).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from core import distributed, metrics
from core.errors import DataError, HFPruneError, Stopped
from core.models.forward import LOGIT_CHUNK_BYTES, base_forward, lm_logits
from core.models.reference import Reference, head_logits
from core.options import Options, knob
from core.progress import check_stop
from core.train.teacher_cache import SparseTargets, sparse_distill_loss

__all__ = ["DistillOptions", "LogitDistillation", "Objective", "ParamSet", "SparseLogitDistillation", "Stopped",
           "TrainOptions", "train"]


class TrainConfigError(HFPruneError):
    """A training option, parameter set or teacher that cannot work."""


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainOptions(Options):
    """The loop's knobs. Budgets: 0 = not set; at least one of steps / tokens / minutes must be > 0
    and the run ends when the first one is used up."""

    error = TrainConfigError

    steps: int = knob(0, "optimiser steps to run (0 = no step budget)", low=0, ui_high=2000)
    tokens: int = knob(0, "training tokens to read (0 = no token budget)", low=0, ui_high=1_000_000, step=1024)
    minutes: float = knob(0.0, "wall-clock minutes of training (0 = no time budget)", low=0, ui_high=60, step=0.5)
    lr: float = knob(1e-4, "peak learning rate of AdamW", low=0, low_open=True, high=1.0, ui_low=1e-6, ui_high=1e-2,
                     step=1e-6)
    warmup_steps: int = knob(10, "steps of linear learning-rate warm-up", low=0, ui_high=200)
    min_lr_ratio: float = knob(0.1, "the cosine decays to this fraction of the peak lr", low=0, high=1)
    weight_decay: float = knob(0.0, "AdamW weight decay (matrices only)", low=0, high=1)
    beta2: float = knob(0.999, "AdamW β2", low=0, high=1, high_open=True)
    grad_clip: float = knob(1.0, "clip the gradient norm to this (0 = off)", low=0, ui_high=10)
    batch_size: int = knob(4, "windows per optimiser step", low=1, ui_high=64)
    accumulate: int = knob(1, "micro-batches per step (batch_size is split into this many)", low=1, ui_high=16)
    eval_every: int = knob(20, "held-out evaluation every N steps (0 = only before and after)", low=0, ui_high=500)
    keep_best: bool = knob(True, "end at the checkpoint with the lowest held-out number")
    seed: int = knob(0, "seed of the batch order, dropout and any random init", low=0)
    grad_checkpointing: bool = knob(False, "recompute activations in the backward (less memory, about a third slower)")

    def validate(self) -> None:
        super().validate()
        if self.steps <= 0 and self.tokens <= 0 and self.minutes <= 0:
            raise self.error("Give a training budget greater than 0: steps, tokens or minutes "
                             f"(got steps {self.steps}, tokens {self.tokens}, minutes {self.minutes}).")
        if self.batch_size % self.accumulate:
            raise self.error(f"batch_size ({self.batch_size}) must be a multiple of accumulate ({self.accumulate}).")

    @staticmethod
    def warmup_for(steps: int) -> int:
        """The warm-up a form uses when the user sets no warm-up: a tenth of a step budget (1–10 steps),
        else 5 steps for a time or token budget."""
        return min(10, max(1, int(steps) // 10)) if steps else 5

    def budget_text(self) -> str:
        parts = [f"{self.steps} steps" if self.steps else "", f"{self.tokens} tokens" if self.tokens else "",
                 f"{self.minutes:g} min" if self.minutes else ""]
        return " / ".join(p for p in parts if p)


@dataclass
class DistillOptions(Options):
    """The logit objective: ``α·τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) + (1−α)·CE(z_s, next token)``."""

    error = TrainConfigError

    tau: float = knob(1.0, "distillation temperature τ (>1 softens both distributions)", low=0, low_open=True,
                      ui_low=0.25, ui_high=8, step=0.25)
    alpha: float = knob(1.0, "weight of the KL term; 1 − alpha goes to next-token cross-entropy", low=0, high=1)


# ----------------------------------------------------------------------------------------------
# the plug-in interfaces
# ----------------------------------------------------------------------------------------------


@dataclass
class StepState:
    """What the loop tells the objective about the step it is in."""

    step: int  # 0-based optimiser step
    progress: float  # share of the budget used before this step, in [0, 1]
    scale: float  # multiply the loss by this before backward (1 / micro-batches)


@dataclass
class LossReport:
    """One micro-batch: the loss (already backpropagated), its parts, tokens read, and time split."""

    loss: float
    tokens: int
    parts: dict[str, float] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)


class Objective(Protocol):
    """What the loop needs from a loss. ``batch`` is a slice of the training data (first dimension =
    examples), already on the student's device."""

    name: str
    heldout_name: str  # what ``heldout`` measures, e.g. "kl"

    def forward_backward(self, student: nn.Module, teacher: nn.Module | None, batch: torch.Tensor,
                         state: StepState) -> LossReport:
        """Forward, loss·state.scale, backward into the trainable parameters' .grad."""

    def heldout(self, student: nn.Module, teacher: nn.Module | None, windows: torch.Tensor, batch_size: int,
                stop: Callable[[], bool] | None) -> float:
        """A lower-is-better number on fixed held-out data (no gradients)."""


@dataclass
class ParamSet:
    """The parameters that train. ``named``: (name, parameter) pairs; ``lr_scale``: optional factor per
    name for its learning rate (a separate AdamW group per distinct factor); ``after_step``: called
    after every optimiser step under no_grad (e.g. a clamp); ``options``: per name, extra AdamW group
    options (``{"maximize": True}``: gradient *ascent*, e.g. Lagrange multipliers) and two loop flags,
    ``"clip": False`` (left out of gradient clipping) and ``"schedule": False`` (constant lr: no
    warm-up, no cosine)."""

    name: str
    named: list[tuple[str, nn.Parameter]]
    lr_scale: dict[str, float] = field(default_factory=dict)
    after_step: Callable[[], None] | None = None
    options: dict[str, dict] = field(default_factory=dict)

    def option(self, name: str, key: str, default=True):
        return self.options.get(name, {}).get(key, default)

    @property
    def count(self) -> int:
        return sum(p.numel() for _n, p in self.named)


# ----------------------------------------------------------------------------------------------
# the logit objective
# ----------------------------------------------------------------------------------------------


class _DistillCE(torch.autograd.Function):
    """Per row: ``α·τ²·KL(softmax(t/τ) ‖ softmax(z/τ)) + (1−α)·CE(z, y)``, fused.

    d/dz = α·τ·(softmax(z/τ) − softmax(t/τ)) + (1−α)·(softmax(z) − onehot(y)) (CE part only where y is
    valid). Keeps two (R, V) tensors for the backward (three when τ ≠ 1 and α < 1) instead of
    log_softmax's autograd temporaries."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor, tau: float,
                alpha: float) -> torch.Tensor:  # (R, V), (R, V) | None, (R,) → (R,)
        loss = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
        p_tau = p_teacher = p_one = None
        if alpha > 0:
            log_s = F.log_softmax(logits / tau, dim=-1)  # (R, V)
            log_t = F.log_softmax(teacher / tau, dim=-1)  # (R, V)
            p_teacher = log_t.exp()
            loss = loss + alpha * tau * tau * (p_teacher * (log_t - log_s)).sum(-1)
            p_tau = log_s.exp_()
        valid = targets >= 0
        safe = targets.clamp_min(0)
        if alpha < 1:
            lse = torch.logsumexp(logits, dim=-1)  # (R,)
            ce = (lse - logits.gather(1, safe.unsqueeze(1)).squeeze(1)) * valid
            loss = loss + (1 - alpha) * ce
            p_one = p_tau if (p_tau is not None and tau == 1.0) else torch.exp(logits - lse.unsqueeze(-1))
        ctx.save_for_backward(p_tau, p_teacher, p_one, safe, valid)
        ctx.tau, ctx.alpha = tau, alpha
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        p_tau, p_teacher, p_one, safe, valid = ctx.saved_tensors
        tau, alpha = ctx.tau, ctx.alpha
        grad = None
        if alpha > 0:
            grad = (p_tau - p_teacher).mul_(alpha * tau)  # (R, V)
        if alpha < 1:
            ce_grad = p_one.clone()
            ce_grad.scatter_add_(1, safe.unsqueeze(1), torch.full_like(safe, -1, dtype=p_one.dtype).unsqueeze(1))
            ce_grad.mul_(((1 - alpha) * valid).unsqueeze(-1))
            grad = ce_grad if grad is None else grad.add_(ce_grad)
        return grad.mul_(grad_loss.unsqueeze(-1)), None, None, None, None


def distill_loss(logits: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor, tau: float = 1.0,
                 alpha: float = 1.0) -> torch.Tensor:
    """Per-row ``α·τ²·KL(p_t ‖ p_s) + (1−α)·CE``: logits (R, V) fp32, teacher (R, V) fp32 (None when
    α = 0), targets (R,) with −100 = none → (R,), differentiable in ``logits``."""
    if alpha > 0 and teacher is None:
        raise TrainConfigError("The KL term (alpha > 0) needs a teacher.")
    return _DistillCE.apply(logits, teacher, targets, float(tau), float(alpha))


def next_token_targets(batch: torch.Tensor) -> torch.Tensor:
    """(B, T) ids → (B, T) targets: token t+1 at position t, −100 at the last position."""
    targets = torch.full_like(batch, -100)
    targets[:, :-1] = batch[:, 1:]
    return targets


class LogitDistillation:
    """Logit KD / next-token CE / their mix for causal LMs, on all B·T positions.

    The decoder stack runs once; its final hidden states (B, T, H) are detached and the lm_head, the
    softcap and the loss run in chunks of rows (``core.metrics.row_chunks`` at
    ``core.models.forward.LOGIT_CHUNK_BYTES``: ~32 MiB of fp32 logits), each chunk's backward
    accumulating into the detached hidden states; one backward through the stack follows. The
    teacher's hidden states come from its own decoder stack (no grad); its logits are also made per
    chunk. Held-out: mean per-token KL(p_teacher ‖ p_student) at τ = 1 against a
    :class:`core.models.reference.Reference` of the teacher (its log-probs computed once per run, kept
    within the reference's byte budget; the student's logits made one row chunk at a time)."""

    name = "logit-distillation"
    heldout_name = "kl"
    # The teacher's cached held-out log-probs share the device with training (8 × 128 SmolLM2 positions:
    # 201 MB, kept); a held-out set beyond it re-runs the teacher at each evaluation (Gemma-3's 1 GiB).
    heldout_budget_bytes = 256 * 2**20

    def __init__(self, options: DistillOptions | None = None) -> None:
        self.options = options or DistillOptions()
        self._reference: Reference | None = None  # the teacher on the held-out windows

    def needs_teacher(self) -> bool:
        return self.options.alpha > 0

    def teacher_states(self, teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """The teacher's final hidden states (B, T, H) for ids (B, T), no grad. A subclass whose teacher
        is the student itself in another mode (DDP: the same model run ungated) overrides this."""
        return base_forward(teacher, ids)

    def forward_backward(self, student, teacher, batch, state):
        tau, alpha = self.options.tau, self.options.alpha
        t0 = time.perf_counter()
        teacher_hidden = None
        if alpha > 0:
            with torch.no_grad():
                teacher_hidden = self.teacher_states(teacher, batch).reshape(-1, _hidden_size(teacher))  # (B·T, H)
        t1 = time.perf_counter()
        hidden = base_forward(student, batch)  # (B, T, H)
        detached = hidden.detach().requires_grad_(True)
        flat = detached.reshape(-1, hidden.shape[-1])  # (B·T, H)
        targets = next_token_targets(batch).reshape(-1)  # (B·T,)
        rows = flat.shape[0]
        total = kl_sum = 0.0
        for chunk in metrics.row_chunks(rows, student.config.vocab_size, LOGIT_CHUNK_BYTES):
            logits = lm_logits(student, flat[chunk]).float()  # (r, V)
            t_logits = None
            if teacher_hidden is not None:
                with torch.no_grad():
                    t_logits = lm_logits(teacher, teacher_hidden[chunk]).float()  # (r, V)
            per_row = distill_loss(logits, t_logits, targets[chunk], tau, alpha)  # (r,)
            chunk_loss = per_row.sum() / rows
            (chunk_loss * state.scale).backward()
            total += float(chunk_loss.detach())
            if t_logits is not None and alpha < 1:
                kl_sum += float(metrics.per_token_kl(t_logits / tau, logits.detach() / tau).sum()) * tau * tau
        t2 = time.perf_counter()
        if hidden.requires_grad:
            hidden.backward(detached.grad)
        t3 = time.perf_counter()
        parts = {"kd": kl_sum / rows} if alpha < 1 and alpha > 0 else {}
        return LossReport(total, int(batch.numel()), parts,
                          {"teacher": t1 - t0, "student_and_loss": t2 - t1, "backward_stack": t3 - t2})

    @torch.no_grad()
    def heldout(self, student, teacher, windows, batch_size, stop):
        if teacher is None:
            raise TrainConfigError("The held-out KL needs a teacher.")
        device = _device(student)
        reference = self._heldout_reference(teacher, windows, batch_size)
        kl_sum, count = 0.0, 0
        for index in range(len(reference)):
            check_stop(stop, "Training was stopped during the held-out evaluation.")
            dense = reference.batch(index)  # the teacher's log-probs, cached within the reference's budget
            hidden = base_forward(student, reference.ids(index).to(device)).flatten(0, 1)  # (B·T, H)
            kl_sum += dense.kl_sum(head_logits(student, hidden))
            count += hidden.shape[0]
        return kl_sum / max(1, count)

    def _heldout_reference(self, teacher: nn.Module, windows: torch.Tensor, batch_size: int) -> Reference:
        """The teacher on the held-out windows, computed once per run (the teacher is frozen)."""
        ref = self._reference
        if ref is None or ref.windows is not windows or ref.model is not teacher or ref.batch_size != batch_size:
            ref = self._reference = Reference(teacher, windows, batch_size, budget_bytes=self.heldout_budget_bytes,
                                              hidden_states=partial(self.teacher_states, teacher))
        return ref


class SparseLogitDistillation(LogitDistillation):
    """:class:`LogitDistillation` against the teacher cached once (:mod:`core.train.teacher_cache`):
    each step runs only the student. The training data handed to :func:`train` are window indices
    into the cache (``targets.examples()``, shape (N,)); the loss is the unbiased sparse estimate
    ``α·τ²·(−Σ w log softmax(z/τ)[ids] − H) + (1−α)·CE`` whose expectation over the cache's tail draws
    is the dense objective's. The held-out KL is the dense one, against the live teacher's reference
    (computed once per run), so the curves of both teacher kinds are comparable."""

    name = "sparse-logit-distillation"

    def __init__(self, targets: SparseTargets, options: DistillOptions | None = None) -> None:
        super().__init__(options)
        if abs(targets.tau - self.options.tau) > 1e-12:
            raise TrainConfigError(f"The teacher cache was built at temperature {targets.tau:g}, the objective "
                                   f"asks for {self.options.tau:g}; rebuild the cache at τ = {self.options.tau:g}.")
        self.targets = targets

    def needs_teacher(self) -> bool:
        return False  # the cache stands for it during training; the held-out KL still asks for one

    def examples(self) -> torch.Tensor:
        """The training data for :func:`train`: (N,) indices of the cached windows."""
        return torch.arange(self.targets.windows.shape[0])

    def forward_backward(self, student, teacher, batch, state):
        tau, alpha = self.options.tau, self.options.alpha
        t0 = time.perf_counter()
        index = batch.cpu()
        device = _device(student)
        ids = self.targets.windows[index].to(device)  # (B, T)
        slots = self.targets.ids[index].flatten(0, 1).to(device)  # (B·T, S)
        weights = self.targets.weights[index].flatten(0, 1).to(device)  # (B·T, S)
        entropy = self.targets.entropy[index].flatten().to(device)  # (B·T,)
        t1 = time.perf_counter()
        hidden = base_forward(student, ids)  # (B, T, H)
        detached = hidden.detach().requires_grad_(True)
        flat = detached.reshape(-1, hidden.shape[-1])  # (B·T, H)
        targets = next_token_targets(ids).reshape(-1)
        rows = flat.shape[0]
        total = 0.0
        for chunk in metrics.row_chunks(rows, student.config.vocab_size, LOGIT_CHUNK_BYTES):
            logits = lm_logits(student, flat[chunk]).float()  # (r, V)
            per_row = sparse_distill_loss(logits, slots[chunk], weights[chunk], entropy[chunk], targets[chunk],
                                          tau, alpha)  # (r,)
            chunk_loss = per_row.sum() / rows
            (chunk_loss * state.scale).backward()
            total += float(chunk_loss.detach())
        t2 = time.perf_counter()
        if hidden.requires_grad:
            hidden.backward(detached.grad)
        t3 = time.perf_counter()
        return LossReport(total, int(ids.numel()), {},
                          {"teacher": t1 - t0, "student_and_loss": t2 - t1, "backward_stack": t3 - t2})


def _hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    """One point of the live curves (``heldout`` only on evaluation steps; step 0 = before training)."""

    step: int
    tokens: int
    loss: float | None
    heldout: float | None
    lr: float
    elapsed: float  # seconds of the training loop so far (the initial evaluation excluded)
    cpu: float = 0.0  # this process's CPU seconds over the same span (all threads; divide by them for CPU time)


@dataclass
class TrainResult:
    """What a run did. ``curve``: one dict per step record; ``timing``: seconds per phase."""

    steps: int
    tokens: int
    seconds: float  # the budgeted loop: steps + periodic held-out evaluations
    ended_by: str  # "steps" | "tokens" | "minutes"
    heldout_name: str
    initial_heldout: float | None
    final_heldout: float | None  # of the state the student is left in
    best_heldout: float | None
    best_step: int | None
    last_heldout: float | None  # of the last step's state (before restoring the best)
    trainable_params: int
    param_set: str
    curve: list[dict]
    timing: dict[str, float]
    cpu_seconds: float = 0.0  # this process's CPU seconds over ``seconds`` (all threads together)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


@contextlib.contextmanager
def _only_trainable(model: nn.Module, teacher: nn.Module | None, params: ParamSet) -> Iterator[None]:
    """requires_grad only on the parameter set during the run (every other flag restored after);
    the teacher is fully frozen."""
    modules = [model] + ([teacher] if teacher is not None and teacher is not model else [])
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    saved += [(p, p.requires_grad) for _n, p in params.named]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for _n, p in params.named:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in reversed(saved):
            p.requires_grad_(flag)


@contextlib.contextmanager
def _train_mode(model: nn.Module, checkpointing: bool) -> Iterator[None]:
    was_training = model.training
    model.train()
    enabled = False
    if checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise TrainConfigError(f"{type(model).__name__} does not support gradient checkpointing.")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        enabled = True
    try:
        yield
    finally:
        if enabled:
            model.gradient_checkpointing_disable()
        model.train(was_training)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_factor(step: int, progress: float, options: TrainOptions) -> float:
    """Warm-up (linear over ``warmup_steps``) × cosine from 1 to ``min_lr_ratio`` over progress ∈ [0, 1]."""
    warm = min(1.0, (step + 1) / options.warmup_steps) if options.warmup_steps > 0 else 1.0
    cosine = options.min_lr_ratio + (1 - options.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return warm * cosine


def _optimizer(params: ParamSet, options: TrainOptions, device: torch.device) -> torch.optim.Optimizer:
    """One AdamW; a param group per distinct (lr factor, decay, per-name options) — one optimiser
    serves ascent and descent alike since AdamW keeps ``maximize`` per group."""
    groups: dict[tuple, list[nn.Parameter]] = {}
    for name, p in params.named:
        decay = options.weight_decay > 0 and p.dim() >= 2
        extra = tuple(sorted(params.options.get(name, {}).items()))
        groups.setdefault((params.lr_scale.get(name, 1.0), decay, extra), []).append(p)
    param_groups = []
    for (scale, decay, extra), ps in groups.items():
        group_options = {k: v for k, v in extra if k not in ("clip", "schedule")}
        param_groups.append({"params": ps, "lr": options.lr * scale, "lr_scale": scale,
                             "schedule": dict(extra).get("schedule", True),
                             "weight_decay": options.weight_decay if decay else 0.0, **group_options})
    return torch.optim.AdamW(param_groups, lr=options.lr, betas=(0.9, options.beta2), foreach=True)


def _snapshot(params: ParamSet) -> list[torch.Tensor]:
    return [p.detach().clone() for _n, p in params.named]


@torch.no_grad()
def _restore(params: ParamSet, state: list[torch.Tensor]) -> None:
    for (_n, p), saved in zip(params.named, state):
        p.copy_(saved)


def budget_used(options: TrainOptions, step: int, tokens: int, elapsed: float) -> tuple[str, float]:
    """(budget that is furthest along, share of it used) — the run ends when the share reaches 1."""
    fractions = []
    if options.steps:
        fractions.append(("steps", step / options.steps))
    if options.tokens:
        fractions.append(("tokens", tokens / options.tokens))
    if options.minutes:
        fractions.append(("minutes", elapsed / (60.0 * options.minutes)))
    return max(fractions, key=lambda f: f[1])


class _Batches:
    """Indices of ``batch_size`` examples out of ``count``, without replacement, a new seeded order
    each epoch."""

    def __init__(self, count: int, batch_size: int, seed: int) -> None:
        self.count, self.batch_size = count, batch_size
        self.rng = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)
        self.cursor = 0

    def next(self) -> torch.Tensor:
        if self.cursor + self.batch_size > self.order.numel():
            self.order = torch.randperm(self.count, generator=self.rng)
            self.cursor = 0
        index = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return index


class _Best:
    """The best held-out value so far and a copy of the trainable parameters at it (in memory)."""

    def __init__(self, params: ParamSet, keep: bool) -> None:
        self.params, self.keep = params, keep
        self.initial = _snapshot(params)  # also what a stopped or failed run goes back to
        self.value: float | None = None
        self.step: int | None = None
        self.state: list[torch.Tensor] | None = None  # None with step 0 = the initial state

    def start(self, value: float | None) -> None:
        """The held-out value before training (step 0)."""
        self.value, self.step = value, (0 if value is not None else None)

    def offer(self, value: float | None, step: int, snapshot: bool = True) -> None:
        if self.keep and value is not None and (self.value is None or value < self.value):
            self.value, self.step = value, step
            self.state = _snapshot(self.params) if snapshot else None

    def restore_best(self, last_step: int) -> bool:
        """Put the best state back unless it is the current one; True when something was restored."""
        if not self.keep or self.step is None or self.step == last_step:
            return False
        _restore(self.params, self.state if self.state is not None else self.initial)
        return True

    def restore_initial(self) -> None:
        _restore(self.params, self.initial)


def _optimizer_step(optimizer: torch.optim.Optimizer, params: ParamSet, objective: Objective, options: TrainOptions,
                    state: StepState) -> None:
    """Clip, step, zero the gradients, then the parameter set's and the objective's after-step hooks."""
    if options.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for n, p in params.named if params.option(n, "clip")], options.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if params.after_step is not None:
        with torch.no_grad():
            params.after_step()
    if hasattr(objective, "after_step"):
        objective.after_step(state)


def _micro_batches(objective: Objective, student: nn.Module, teacher: nn.Module | None, batch: torch.Tensor,
                   micro: int, state: StepState, device: torch.device, timing: dict[str, float]) -> tuple[float, int]:
    """Forward + backward of ``batch`` in micro-batches of ``micro``: (mean loss, tokens read)."""
    loss, tokens = 0.0, 0
    for part in torch.split(batch, micro):
        with _autocast(device):
            report = objective.forward_backward(student, teacher, part, state)
        loss += report.loss * state.scale
        tokens += report.tokens
        for key, value in report.timing.items():
            timing[key] = timing.get(key, 0.0) + value
    return loss, tokens


def _bar(progress: bool, total: int | None):
    if not progress:
        return None
    return tqdm(desc="training", unit="step", total=total or None)


TIMED = ("data", "teacher", "student_and_loss", "backward_stack", "optimizer", "heldout", "checkpoint")


def _check_inputs(teacher: nn.Module | None, objective: Objective, data: torch.Tensor,
                  params: ParamSet, options: TrainOptions) -> None:
    """One sentence for a run that cannot start: nothing to train, less data than a batch, no teacher."""
    if not params.named:
        raise TrainConfigError(f"The parameter set '{params.name}' has no parameters to train.")
    if data.shape[0] < options.batch_size:
        raise DataError(f"The training text gives {data.shape[0]} windows, fewer than one batch of "
                        f"{options.batch_size}; use more text, a shorter sequence length or a smaller batch.")
    if getattr(objective, "needs_teacher", lambda: True)() and teacher is None:
        raise TrainConfigError("This objective needs a teacher model.")


@contextlib.contextmanager
def _timed(timing: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall seconds of the ``with`` body to ``timing[key]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        timing[key] = timing.get(key, 0.0) + time.perf_counter() - t


def _set_lr(optimizer: torch.optim.Optimizer, options: TrainOptions, factor: float) -> None:
    """Each group's lr: the base lr × its scale × the schedule factor (groups outside the schedule skip it)."""
    for group in optimizer.param_groups:
        group["lr"] = options.lr * group["lr_scale"] * (factor if group["schedule"] else 1.0)


def train(student: nn.Module, teacher: nn.Module | None, objective: Objective, data: torch.Tensor,
          params: ParamSet, options: TrainOptions, *, heldout: torch.Tensor | None = None,
          stop: Callable[[], bool] | None = None, on_step: Callable[[StepRecord], None] | None = None,
          progress: bool = False) -> TrainResult:
    """Train ``params`` of ``student`` on ``data`` (N examples along dim 0, e.g. (N, T) token windows)
    against ``teacher`` with ``objective`` until the budget in ``options`` is used up.

    Batches are drawn without replacement in a seeded order (a new order each epoch). ``heldout``:
    examples for the objective's held-out number, measured before training, every ``eval_every``
    steps and at the end. ``on_step`` receives a :class:`StepRecord` after every step (and one for
    step 0). Raises :class:`Stopped` when ``stop()`` turns true — the student's trainable parameters
    are then back at their values from before the call."""
    _check_inputs(teacher, objective, data, params, options)
    device = _device(student)
    torch.manual_seed(options.seed)
    batches = _Batches(data.shape[0], options.batch_size, options.seed)
    parallel = distributed.TrainingSync(options.batch_size, options.accumulate)  # no-op outside torchrun
    micro = parallel.micro_batch(options.batch_size, options.accumulate)
    timing = dict.fromkeys(TIMED, 0.0)
    curve: list[dict] = []
    if teacher is not None:
        teacher.eval()

    def record(rec: StepRecord) -> None:
        curve.append(asdict(rec))
        if on_step is not None:
            on_step(rec)

    def evaluate() -> float | None:
        if heldout is None or heldout.shape[0] == 0:
            return None
        was = student.training
        student.eval()
        try:
            with _autocast(device):
                # rank 0's number on every rank, so best-checkpoint choices cannot diverge across GPUs
                return parallel.agree(float(objective.heldout(student, teacher, heldout, options.batch_size, stop)))
        finally:
            student.train(was)

    step = tokens = 0
    bar = _bar(progress, options.steps)
    best = _Best(params, options.keep_best)
    try:
        with _only_trainable(student, teacher, params), _train_mode(student, options.grad_checkpointing):
            with _timed(timing, "initial_heldout"):
                initial_value = last_value = evaluate()
            best.start(initial_value)
            record(StepRecord(0, 0, None, initial_value, 0.0, 0.0))
            optimizer = _optimizer(params, options, device)
            parallel.attach([p for _n, p in params.named])  # DistributedDataParallel gradient averaging
            start, cpu_start = time.perf_counter(), time.process_time()
            step_seconds = 0.0
            while True:
                ended_by, used = parallel.agree(budget_used(options, step, tokens, time.perf_counter() - start))
                if used >= 1.0:
                    break
                check_stop(stop, f"Training was stopped at step {step}; the student is back at its state from "
                           "before the run.")
                factor = lr_factor(step, used, options)
                _set_lr(optimizer, options, factor)
                step_start = time.perf_counter()
                with _timed(timing, "data"):
                    batch = parallel.local(data[batches.next()]).to(device)  # this rank's share of the global batch
                state = StepState(step, used, 1.0 / options.accumulate)
                loss, read = parallel.reduce(*_micro_batches(objective, student, teacher, batch, micro, state,
                                                             device, timing))
                tokens += read
                with _timed(timing, "optimizer"):
                    _optimizer_step(optimizer, params, objective, options, state)
                step += 1
                step_seconds = max(step_seconds, time.perf_counter() - step_start)
                value = None
                if options.eval_every and step % options.eval_every == 0:
                    with _timed(timing, "heldout"):
                        value = last_value = evaluate()
                    with _timed(timing, "checkpoint"):
                        best.offer(value, step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", heldout="" if value is None else f"{value:.4f}")
                if not math.isfinite(loss):
                    raise TrainConfigError(f"The loss became {loss} at step {step}; lower the learning rate.")
                record(StepRecord(step, tokens, loss, value, options.lr * factor, time.perf_counter() - start,
                                  time.process_time() - cpu_start))
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            with _timed(timing, "final_heldout_and_restore"):
                if heldout is not None and (not options.eval_every or step % options.eval_every):
                    last_value = evaluate()
                    best.offer(last_value, step, snapshot=False)  # the current state: nothing to copy
                    curve[-1]["heldout"] = last_value
                    if on_step is not None:  # the live curve gets the final held-out point too
                        on_step(StepRecord(**curve[-1]))
                final_value = best.value if best.restore_best(step) else last_value
            timing["max_step"] = step_seconds
    except BaseException:
        best.restore_initial()
        raise
    finally:
        if bar is not None:
            bar.close()
    timing["other"] = max(0.0, seconds - sum(timing[k] for k in TIMED))
    return TrainResult(steps=step, tokens=tokens, seconds=seconds, ended_by=ended_by,
                       heldout_name=getattr(objective, "heldout_name", "heldout"), initial_heldout=initial_value,
                       final_heldout=final_value, best_heldout=best.value if options.keep_best else None,
                       best_step=best.step if options.keep_best else None, last_heldout=last_value,
                       trainable_params=params.count, param_set=params.name, curve=curve,
                       timing={k: round(v, 4) for k, v in timing.items()}, cpu_seconds=cpu_seconds)
