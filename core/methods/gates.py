"""Deterministic differentiable pruning (DDP): gates trained against the dense model that harden
into the deployed structure, with no sampling anywhere.

    loaded = load_model("smollm2-135m")
    result = ddp(loaded, DDPOptions(ratio=0.2, units="mlp"), TrainOptions(minutes=3, lr=5e-2))
    save_ddp(result, loaded.tokenizer, "ddp20")

**Gates.** One parameter ``z`` per MLP neuron and per attention unit (see *heads* below), initialised
N(1, 0.01) (or warm-started from entropy-Taylor scores). The forward multiplies the unit's output by
``relu(z)`` with a straight-through backward (the gradient passes as if relu were the identity);
after every optimiser step ``z`` is clamped to ≥ −0.1 so a closed gate can reopen. The MLP gate sits
on the input of ``down_proj`` (``act(gate x)·up x``, width d_ff), the head gate on the input of
``o_proj`` (each head's attention output). Model weights are frozen: only gates and λ's train.

**Objective** (one training step of core.train's loop)::

    ce·CE(next token) + kd·τ²·KL(p_dense ‖ p_gated) + Σ_types [λ1(ŝ−t) + λ2(ŝ−t)² + λ3·mean(s(1−s))]

with the teacher being the *same* frozen model run ungated (no second copy in memory), the soft
surrogate ``s = clamp(1.2·σ((2.4/m)(relu(z) − m)) − 0.1, 0, 1)``, ``m = 0.5 − 0.4·√progress``
(threshold 0.5 → 0.1, sharpness 4.8 → 24), and ``ŝ = 1 − mean(s)`` over every layer of a unit
type — so the per-layer allocation is learned. The λ's are trained by gradient *ascent*
(``maximize=True``) at their own learning rates, constant by default (the reference code also
anneals them; ``lambda_schedule`` does that).

**Hardening** (:meth:`Gates.plan`): the exact global top-k gates by ``relu(z)`` that meet the target
(never "z > 0", which the reference code exports and which misses the target), with at least one
unit per layer; each kept gate value is folded into the weights (MLP: ``up_proj`` rows; heads:
``o_proj`` columns), the rest is sliced away. The exported model's logits equal the gated model's
with hardened gates (the held-out KL the loop tracks is measured on exactly that hardened model).

**Heads under grouped-query attention.** HF attention repeats each KV head ``heads // kv_heads``
times, so a layer must keep the same number of query heads on every kept KV head. The granularity:

- ``kv``: one gate per KV group (the KV head and all its query heads); default for multi-head
  attention (one query head per KV head), where it is exactly one gate per head;
- ``query``: one gate per query head, hardened *evenly per group*: the unit of the top-k is a
  "slot" c of a layer (the c-th best query head of every group, valued by their summed gates), so a
  layer keeps c_l query heads on every KV head and all KV heads stay; default under GQA (SmolLM2:
  9 query heads on 3 KV heads → a layer keeps 3, 6 or 9; Gemma-3 1B: 4 on 1 → any count).

Per-layer head counts export only through ``hf-remote-code`` (core.remote_code).
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from core import __version__
from core.data.text import CalibrationOptions, TrainingText
from core.errors import PruneConfigError
from core.export.hf import save_pruned
from core.importance.heads import head_entropy_scores
from core.methods.oneshot import plan_widths, score_model
from core.methods.recover import check_trainable
from core.models.adapters import attention_handles, mlp_handles, mlp_widths
from core.models.counts import count_params
from core.models.forward import base_forward
from core.models.slicing import prune_attention_heads, prune_mlp_neurons
from core.options import knob, knob_like
from core.prune.allocate import normalize_scores
from core.train.loop import (
    DistillOptions,
    LogitDistillation,
    LossReport,
    ParamSet,
    StepRecord,
    StepState,
    TrainOptions,
    train,
)

if TYPE_CHECKING:
    from core.models.loading import LoadedModel
    from core.train.loop import TrainResult

UNITS = ("mlp", "heads", "both")
GRANULARITIES = ("auto", "kv", "query")
HIST_EDGES = torch.linspace(0.0, 1.5, 31)  # gate-value histogram bins (relu(z) ≥ 1.5 in the last bin)
# CPU defaults of the loop for the gates (the reference run: lr 2e-2 over 1000 steps of 16 × 2048 tokens with
# 100 warm-up steps; a few CPU minutes give ~100 steps of 4 × 128 tokens, where a higher lr lets a gate travel
# from 1 to 0). Measured in benchmarks/ddp.py.
TRAIN_DEFAULTS = {"lr": 5e-2, "warmup_steps": 5, "batch_size": 4, "eval_every": 10, "min_lr_ratio": 0.1}


@dataclass
class DDPOptions(TrainingText):
    """What DDP prunes, its objective and its constraint, and its training text
    (:class:`core.data.text.TrainingText`: windows of the calibration split of ``source`` and the held-out
    slice the hardened model's KL curve is measured on). The budget and learning rate of the gates are
    core.train's :class:`TrainOptions`."""

    error = PruneConfigError

    ratio: float = knob(0.2, "share of MLP neurons to remove (the per-layer split is learned; exact in total)",
                        low=0, high=1, low_open=True, high_open=True, step=0.01)
    units: str = knob("mlp", "what gets gates: MLP neurons, attention heads, or both", choices=UNITS)
    head_ratio: float = knob(0.0, "share of attention heads to remove (0 = the same as --ratio)", low=0, high=1,
                             high_open=True, step=0.01)
    head_granularity: str = knob("auto", "heads: one gate per KV group (kv) or per query head pruned evenly per "
                                 "group (query); auto = kv for multi-head, query under grouped-query attention",
                                 choices=GRANULARITIES)
    kd_weight: float = knob(2.0, "weight of τ²·KL(p_dense ‖ p_gated)", low=0, ui_high=8, step=0.1)
    ce_weight: float = knob(1.0, "weight of next-token cross-entropy", low=0, ui_high=4, step=0.1)
    tau: float = knob(1.0, "distillation temperature τ", low=0, low_open=True, ui_low=0.25, ui_high=4, step=0.25)
    lambda_lr: float = knob(2e-2, "learning rate of λ1 and λ3 (gradient ascent)", low=0, low_open=True,
                            ui_high=1, step=1e-3)
    lambda2_lr: float = knob(0.4, "learning rate of λ2 (gradient ascent)", low=0, low_open=True, ui_high=4,
                             step=1e-2)
    lambda_schedule: bool = knob(False, "warm up and cosine-decay the λ's too, as the reference code does")
    clamp_min: float = knob(-0.1, "after every step each z is clamped to at least this", low=-10, high=0)
    init_mean: float = knob(1.0, "cold start: gates start at N(init_mean, init_std)", low=0, low_open=True, ui_high=2)
    init_std: float = knob(0.01, "cold start: spread of the initial gates", low=0, ui_high=0.2, step=0.001)
    warm_start: bool = knob(False, "start the gates from entropy-Taylor scores (least important at warm_low, "
                            "most important at 1)")
    warm_low: float = knob(0.5, "warm start: initial gate of the globally least important unit", low=0, high=1)
    warm_samples: int = knob_like(CalibrationOptions, "samples",
                                  help="warm start: calibration windows for the entropy scores")
    min_layer_keep: float = knob(0.0, "share of every layer's units always kept (at least one unit)", low=0, high=1,
                                 high_open=True)
    histogram_every: int = knob(0, "record the gate histogram every N steps (0 = about 40 snapshots per run)",
                                low=0, ui_high=500)

    def validate(self) -> None:
        super().validate()
        if self.kd_weight + self.ce_weight <= 0:
            raise self.error("kd_weight and ce_weight cannot both be 0: the gates need a task loss.")

    @property
    def prunes_mlp(self) -> bool:
        return self.units in ("mlp", "both")

    @property
    def prunes_heads(self) -> bool:
        return self.units in ("heads", "both")

    @property
    def heads_ratio(self) -> float:
        return self.head_ratio or self.ratio


# ----------------------------------------------------------------------------------------------
# the gate maths
# ----------------------------------------------------------------------------------------------


def ste_relu(z: torch.Tensor) -> torch.Tensor:
    """relu(z) forward, identity backward (straight-through)."""
    return z + (z.clamp_min(0) - z).detach()


def surrogate_threshold(progress: float) -> float:
    """m = 0.5 − 0.4·√progress: the surrogate's threshold (0.5 → 0.1; its sharpness is 2.4/m)."""
    return 0.5 - 0.4 * math.sqrt(min(1.0, max(0.0, float(progress))))


def surrogate(z: torch.Tensor, m: float) -> torch.Tensor:
    """s = clamp(1.2·σ((2.4/m)(relu(z) − m)) − 0.1, 0, 1), relu and clamp straight-through.
    s(0) ≈ 0, s(m) = 0.5, s saturates at 1 near 2m."""
    raw = 1.2 * torch.sigmoid((2.4 / m) * (ste_relu(z) - m)) - 0.1
    return raw + (raw.clamp(0.0, 1.0) - raw).detach()


def global_top_k(values: list[torch.Tensor], keep: int, floors: list[int]) -> list[torch.Tensor]:
    """Exactly ``keep`` units over all layers: each layer's best ``floors[l]`` first, then the globally
    largest of the rest (ties: lower layer, lower index). values: per layer (n_l,) → bool masks (n_l,)."""
    masks = [torch.zeros(v.numel(), dtype=torch.bool) for v in values]
    pool_values, pool_ids = [], []
    for layer, (v, floor) in enumerate(zip(values, floors)):
        order = torch.argsort(v.detach().float().cpu(), descending=True, stable=True)
        masks[layer][order[:floor]] = True
        rest = order[floor:]
        pool_values.append(v.detach().float().cpu()[rest])
        pool_ids.append(torch.stack([torch.full_like(rest, layer), rest], dim=1))
    remaining = keep - sum(floors)
    if remaining > 0:
        flat, ids = torch.cat(pool_values), torch.cat(pool_ids)
        for layer, index in ids[torch.argsort(flat, descending=True, stable=True)[:remaining]].tolist():
            masks[layer][index] = True
    return masks


@dataclass
class _UnitType:
    """The gates of one unit type: per layer a 1-D parameter, the target and the three λ's."""

    kind: str  # "mlp" | "heads"
    z: list[nn.Parameter]  # per layer (units_l,)
    keep: int  # units kept at export (exact)
    floors: list[int]  # units always kept per layer
    lambdas: list[nn.Parameter]  # λ1, λ2, λ3: scalars
    granularity: str = "neuron"  # "neuron" | "kv" | "query"
    groups: list[int] = field(default_factory=list)  # heads: query heads per KV head, per layer

    @property
    def total(self) -> int:
        """Units the constraint counts (query granularity: query heads; its export unit is a slot)."""
        return sum(int(z.numel()) for z in self.z)

    @property
    def target(self) -> float:
        """The sparsity the constraint aims at: exactly what the export keeps, as a share of units."""
        if self.granularity == "query":
            return 1.0 - self.keep / sum(self.groups)  # slots: a layer has one per query head of a group
        return 1.0 - self.keep / self.total

    def expected_sparsity(self, m: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(ŝ = 1 − mean(s) over every unit of every layer, the binarisation term mean(s(1 − s)))."""
        s = torch.cat([surrogate(z, m) for z in self.z])  # (total,)
        return 1.0 - s.mean(), (s * (1.0 - s)).mean()

    def constraint(self, m: float) -> tuple[torch.Tensor, float]:
        """λ1(ŝ−t) + λ2(ŝ−t)² + λ3·mean(s(1−s)) and ŝ."""
        expected, binar = self.expected_sparsity(m)
        gap = expected - self.target
        l1, l2, l3 = self.lambdas
        return l1 * gap + l2 * gap * gap + l3 * binar, float(expected.detach())

    def masks(self) -> list[torch.Tensor]:
        """Per layer, which gates survive the exact top-k (bool, same shape as z)."""
        values = [z.detach().clamp_min(0).float().cpu() for z in self.z]
        if self.granularity != "query":
            return global_top_k(values, self.keep, self.floors)
        slot_values, orders = [], []
        for v, group in zip(values, self.groups):
            grouped = v.reshape(-1, group)  # (kv_heads, group)
            order = torch.argsort(grouped, dim=1, descending=True, stable=True)  # best first in each group
            orders.append(order)
            slot_values.append(grouped.gather(1, order).sum(0))  # (group,) c-th best of every group, summed
        slot_masks = global_top_k(slot_values, self.keep, self.floors)
        masks = []
        for v, group, order, slots in zip(values, self.groups, orders, slot_masks):
            count = int(slots.sum())  # query heads kept on every KV head
            mask = torch.zeros(v.numel() // group, group, dtype=torch.bool)
            mask.scatter_(1, order[:, :count], True)
            masks.append(mask.reshape(-1))
        return masks


class Gates:
    """The gates of one model: per-type parameters, forward pre-hooks and three modes —
    ``soft`` (training: relu(z) straight-through), ``off`` (the dense teacher) and ``hard`` (the
    exact top-k with the kept gates' values: what is exported)."""

    def __init__(self, model: nn.Module, options: DDPOptions) -> None:
        self.model = model
        self.options = options
        self.mode = "soft"
        self._hard: dict[str, list[torch.Tensor]] = {}
        self._hooks: list = []
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(0)
        self.types: dict[str, _UnitType] = {}

        def params(sizes: list[int]) -> list[nn.Parameter]:
            return [nn.Parameter((options.init_mean + options.init_std * torch.randn(n, generator=gen)).to(device))
                    for n in sizes]

        def lambdas() -> list[nn.Parameter]:
            return [nn.Parameter(torch.zeros((), device=device)) for _ in range(3)]

        def floors(sizes: list[int]) -> list[int]:
            return [max(1, math.ceil(options.min_layer_keep * n - 1e-9)) for n in sizes]

        if options.prunes_mlp:
            widths = mlp_widths(model)
            keep = int(round((1.0 - options.ratio) * sum(widths)))
            self.types["mlp"] = _UnitType("mlp", params(widths), keep, floors(widths), lambdas())
        if options.prunes_heads:
            handles = attention_handles(model)
            granularity = self.head_granularity(model, options.head_granularity)
            if granularity == "kv":
                sizes, units, groups = [h.kv_heads for h in handles], [h.kv_heads for h in handles], []
            else:
                groups = [h.group for h in handles]  # the export unit is a slot: one query head per KV head
                sizes, units = [h.heads for h in handles], groups
            keep = int(round((1.0 - options.heads_ratio) * sum(units)))
            self.types["heads"] = _UnitType("heads", params(sizes), keep, floors(units), lambdas(), granularity,
                                            groups)
        for unit in self.types.values():
            if sum(unit.floors) > unit.keep:
                what = "MLP neurons" if unit.kind == "mlp" else "attention units"
                raise PruneConfigError(f"The ratio keeps {unit.keep} {what}, fewer than one per layer "
                                       f"({sum(unit.floors)}); lower the ratio or min_layer_keep.")

    @staticmethod
    def head_granularity(model: nn.Module, choice: str) -> str:
        """``auto`` → ``kv`` when every KV head has one query head (multi-head), else ``query``."""
        if choice != "auto":
            return choice
        return "kv" if all(h.group == 1 for h in attention_handles(model)) else "query"

    # -- parameters --------------------------------------------------------------------------
    def param_set(self, train_options: TrainOptions) -> ParamSet:
        """Gates (lr = train_options.lr, clamped after each step) and λ's (ascent, own lr, no clipping)."""
        named, lr_scale, opts = [], {}, {}
        for kind, unit in self.types.items():
            named += [(f"{kind}.z.{i}", z) for i, z in enumerate(unit.z)]
            for i, lam in enumerate(unit.lambdas):
                name = f"{kind}.lambda{i + 1}"
                named.append((name, lam))
                lr = self.options.lambda2_lr if i == 1 else self.options.lambda_lr
                lr_scale[name] = lr / train_options.lr
                opts[name] = {"maximize": True, "clip": False, "schedule": self.options.lambda_schedule}
        return ParamSet("ddp-gates", named, lr_scale, after_step=self.clamp_, options=opts)

    @torch.no_grad()
    def clamp_(self) -> None:
        """z ≥ clamp_min after every optimiser step (a closed gate can reopen)."""
        for unit in self.types.values():
            for z in unit.z:
                z.clamp_(min=self.options.clamp_min)

    @torch.no_grad()
    def set_values(self, kind: str, values: list[torch.Tensor]) -> None:
        for z, v in zip(self.types[kind].z, values):
            z.copy_(v.to(z.device, z.dtype))

    # -- forward -----------------------------------------------------------------------------
    def _gate(self, kind: str, layer: int) -> torch.Tensor | None:
        if self.mode == "off":
            return None
        if self.mode == "hard":
            return self._hard[kind][layer]
        return ste_relu(self.types[kind].z[layer])

    def _mlp_hook(self, layer: int):
        def hook(_module, args):
            gate = self._gate("mlp", layer)
            if gate is None:
                return None
            return (args[0] * gate.to(args[0].dtype),) + tuple(args[1:])  # (B, T, d_ff) · (d_ff,)
        return hook

    def _head_hook(self, layer: int, heads: int, head_dim: int, group: int):
        unit = self.types["heads"]

        def hook(_module, args):
            gate = self._gate("heads", layer)
            if gate is None:
                return None
            if unit.granularity == "kv":
                gate = gate.repeat_interleave(group)  # (kv,) → (heads,): query head h reads KV head h // group
            x = args[0]  # (B, T, heads·d)
            scaled = x.unflatten(-1, (heads, head_dim)) * gate.to(x.dtype).unsqueeze(-1)  # (B, T, heads, d)
            return (scaled.flatten(-2),) + tuple(args[1:])
        return hook

    @contextlib.contextmanager
    def attached(self) -> Iterator[Gates]:
        """Hooks on every gated projection while inside (removed on exit, even on error)."""
        try:
            if "mlp" in self.types:
                for h in mlp_handles(self.model):
                    self._hooks.append(h.down.register_forward_pre_hook(self._mlp_hook(h.index)))
            if "heads" in self.types:
                for h in attention_handles(self.model):
                    self._hooks.append(h.attn.o_proj.register_forward_pre_hook(
                        self._head_hook(h.index, h.heads, h.head_dim, h.group)))
            yield self
        finally:
            for handle in self._hooks:
                handle.remove()
            self._hooks.clear()

    @contextlib.contextmanager
    def using(self, mode: str) -> Iterator[None]:
        """Run inside with gates ``soft`` / ``off`` / ``hard`` (hard values computed on entry)."""
        previous, saved = self.mode, self._hard
        if mode == "hard":
            self._hard = {kind: [v.to(z.device) for v, z in zip(values, self.types[kind].z)]
                          for kind, values in self.hardened_values().items()}
        self.mode = mode
        try:
            yield
        finally:
            self.mode, self._hard = previous, saved

    # -- hardening ---------------------------------------------------------------------------
    def hardened_values(self) -> dict[str, list[torch.Tensor]]:
        """Per type and layer: relu(z) where the exact top-k keeps the unit, 0 elsewhere (fp32, CPU)."""
        out = {}
        for kind, unit in self.types.items():
            out[kind] = [z.detach().clamp_min(0).float().cpu() * mask for z, mask in zip(unit.z, unit.masks())]
        return out

    def plan(self) -> DDPPlan:
        """What the export keeps and the gate values folded into the kept units."""
        handles = mlp_handles(self.model)
        plan = DDPPlan()
        if "mlp" in self.types:
            masks = self.types["mlp"].masks()
            plan.mlp_kept = [m.nonzero().flatten() for m in masks]
            plan.mlp_scale = [z.detach().clamp_min(0).float().cpu()[k] for z, k in zip(self.types["mlp"].z,
                                                                                      plan.mlp_kept)]
        else:
            plan.mlp_kept = [torch.arange(h.width) for h in handles]
        if "heads" in self.types:
            unit = self.types["heads"]
            plan.head_kept, plan.kv_kept, plan.head_scale = [], [], []
            for z, mask, h in zip(unit.z, unit.masks(), attention_handles(self.model)):
                values = z.detach().clamp_min(0).float().cpu()
                if unit.granularity == "kv":
                    kv = mask.nonzero().flatten()
                    heads = (kv.unsqueeze(1) * h.group + torch.arange(h.group)).reshape(-1)
                    scale = values[kv].repeat_interleave(h.group)
                else:
                    heads = mask.nonzero().flatten()
                    kv = torch.arange(h.kv_heads)
                    scale = values[heads]
                plan.head_kept.append(heads)
                plan.kv_kept.append(kv)
                plan.head_scale.append(scale)
        return plan


# ----------------------------------------------------------------------------------------------
# the plan: what is kept, and folding + slicing
# ----------------------------------------------------------------------------------------------


@dataclass
class DDPPlan:
    """Per layer: kept MLP neurons and their gate values; kept query / KV heads and the kept query
    heads' gate values (None when heads were not pruned). Applying it folds and slices."""

    mlp_kept: list[torch.Tensor] = field(default_factory=list)  # (kept_l,) long
    mlp_scale: list[torch.Tensor] | None = None  # (kept_l,) fp32; None = MLP not gated
    head_kept: list[torch.Tensor] | None = None  # (kept query heads_l,) long
    kv_kept: list[torch.Tensor] | None = None  # (kept KV heads_l,) long
    head_scale: list[torch.Tensor] | None = None  # (kept query heads_l,) fp32

    def widths(self) -> list[int]:
        return [int(k.numel()) for k in self.mlp_kept]

    def head_counts(self) -> tuple[list[int], list[int]] | None:
        if self.head_kept is None or self.kv_kept is None:
            return None
        return [int(k.numel()) for k in self.head_kept], [int(k.numel()) for k in self.kv_kept]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat named tensors (a stored run's weights file)."""
        out: dict[str, torch.Tensor] = {}
        for name in ("mlp_kept", "mlp_scale", "head_kept", "kv_kept", "head_scale"):
            for i, t in enumerate(getattr(self, name) or []):
                out[f"{name}.{i}"] = t.contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> DDPPlan:
        def layers(name: str) -> list[torch.Tensor] | None:
            found = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.rsplit(".", 1)[0] == name)
            return [v for _i, v in found] or None

        return cls(layers("mlp_kept") or [], layers("mlp_scale"), layers("head_kept"), layers("kv_kept"),
                   layers("head_scale"))

    @torch.no_grad()
    def apply(self, model: nn.Module) -> nn.Module:
        """A new pruned model: every tensor it does not change is shared with ``model`` (never
        modified); sliced projections are new, and the kept gate values are folded into them
        (MLP: rows of up_proj and its bias; heads: the head's columns of o_proj)."""
        memo: dict[int, object] = {id(p): p for p in model.parameters()}
        memo.update({id(b): b for b in model.buffers()})
        clone = copy.deepcopy(model, memo)  # new modules, shared tensors
        if self.mlp_scale is not None:
            prune_mlp_neurons(clone, self.mlp_kept, inplace=True)
            for h, scale in zip(mlp_handles(clone), self.mlp_scale):
                h.up.weight.mul_(scale.to(h.up.weight).unsqueeze(1))  # (kept, H) · (kept, 1)
                if h.up.bias is not None:
                    h.up.bias.mul_(scale.to(h.up.bias))
        if self.head_kept is not None and self.kv_kept is not None and self.head_scale is not None:
            prune_attention_heads(clone, self.head_kept, self.kv_kept, inplace=True)
            for h, scale in zip(attention_handles(clone), self.head_scale):
                o = h.attn.o_proj.weight  # (hidden, kept heads·d)
                o.mul_(scale.to(o).repeat_interleave(h.head_dim).unsqueeze(0))
        return clone


# ----------------------------------------------------------------------------------------------
# the objective plugged into core.train
# ----------------------------------------------------------------------------------------------


class DDPObjective(LogitDistillation):
    """``ce·CE + kd·τ²·KL(p_dense ‖ p_gated)`` (core.train's fused chunked loss, with the teacher =
    the same model run with gates off) plus the sparsity constraint of every unit type. Held-out:
    KL(p_dense ‖ p_hard) of the *hardened* model, i.e. of what would be exported at that step.
    ``history``: one dict per step (m, ŝ and target per type, the λ's); ``snapshots``: gate-value
    histograms every ``every`` steps (and at step 0)."""

    name = "ddp"
    heldout_name = "kl"

    def __init__(self, gates: Gates, options: DDPOptions, histogram_every: int = 1) -> None:
        weight = options.kd_weight + options.ce_weight
        super().__init__(DistillOptions(tau=options.tau, alpha=options.kd_weight / weight))
        self.gates = gates
        self.weight = weight
        self.every = max(1, histogram_every)
        self.history: list[dict] = []
        self.snapshots: list[dict] = [self.snapshot(0)]

    def teacher_states(self, teacher, ids):
        with self.gates.using("off"):
            return base_forward(teacher, ids)

    def forward_backward(self, student, teacher, batch, state):
        m = surrogate_threshold(state.progress)
        with self.gates.using("soft"):
            report = super().forward_backward(student, teacher, batch,
                                              StepState(state.step, state.progress, state.scale * self.weight))
        total = torch.zeros(())
        parts: dict[str, float] = {}
        for kind, unit in self.gates.types.items():
            loss, expected = unit.constraint(m)
            total = total + loss.cpu()
            parts[f"sparsity_{kind}"] = expected
        (total * state.scale).backward()
        return LossReport(report.loss * self.weight + float(total.detach()), report.tokens,
                          {**report.parts, **parts, "constraint": float(total.detach())}, report.timing)

    def heldout(self, student, teacher, windows, batch_size, stop):
        with self.gates.using("hard"):
            return super().heldout(student, teacher, windows, batch_size, stop)

    @torch.no_grad()
    def after_step(self, state: StepState) -> None:
        m = surrogate_threshold(state.progress)
        point: dict = {"step": state.step + 1, "progress": round(state.progress, 5), "m": round(m, 5)}
        for kind, unit in self.gates.types.items():
            expected, binar = unit.expected_sparsity(m)
            point[kind] = {"expected_sparsity": float(expected), "target": unit.target,
                           "binarisation": float(binar),
                           "lambdas": [float(lam) for lam in unit.lambdas],
                           "open": sum(int((z > 0).sum()) for z in unit.z) / unit.total}
        self.history.append(point)
        if (state.step + 1) % self.every == 0:
            self.snapshots.append(self.snapshot(state.step + 1))

    @torch.no_grad()
    def snapshot(self, step: int) -> dict:
        """Gate-value histogram per type: counts of relu(z) in HIST_EDGES bins (the last bin takes ≥ 1.5)."""
        out: dict = {"step": step}
        for kind, unit in self.gates.types.items():
            values = torch.cat([z.detach().clamp(0.0, 1.5).float().cpu() for z in unit.z])
            out[kind] = torch.histc(values, bins=len(HIST_EDGES) - 1, min=0.0, max=1.5).int().tolist()
        return out


# ----------------------------------------------------------------------------------------------
# warm start
# ----------------------------------------------------------------------------------------------


def warm_values(scores: list[torch.Tensor], low: float) -> list[torch.Tensor]:
    """Per-layer scores → initial gates: divide each layer by its mean, rank all units together and
    map the rank quantile q ∈ [0, 1] to ``low + (1 − low)·q`` (least important → low, best → 1)."""
    normed = normalize_scores(scores, "mean")
    flat = torch.cat(normed)
    ranks = torch.empty(flat.numel())
    ranks[torch.argsort(flat, stable=True)] = torch.arange(flat.numel(), dtype=torch.float32)
    q = ranks / max(1, flat.numel() - 1)
    return list(torch.split(low + (1.0 - low) * q, [s.numel() for s in scores]))


# ----------------------------------------------------------------------------------------------
# the recipe
# ----------------------------------------------------------------------------------------------


@dataclass
class DDPResult:
    """The pruned model (folded + sliced), what it keeps, its metadata, the training run, the DDP
    curves (``history``: per step; ``snapshots``: gate histograms) and — when entropy scores were
    available — the per-layer widths a one-shot global entropy allocation would have chosen."""

    model: nn.Module
    plan: DDPPlan
    meta: dict
    train: TrainResult
    history: list[dict]
    snapshots: list[dict]
    entropy_widths: list[int] | None = None


def _histogram_every(options: DDPOptions, train_options: TrainOptions) -> int:
    if options.histogram_every:
        return options.histogram_every
    if train_options.steps:
        return max(1, train_options.steps // 40)
    return 5  # minutes / tokens budgets: the step count is not known in advance


def ddp(loaded: LoadedModel, options: DDPOptions | None = None, train_options: TrainOptions | None = None, *,
        scores: list[torch.Tensor] | None = None, stop: Callable[[], bool] | None = None,
        on_step: Callable[[dict], None] | None = None, progress: bool = False) -> DDPResult:
    """Learn gates on ``loaded`` (its weights are never changed) and return the hardened, folded,
    sliced model. ``scores``: per-layer entropy-Taylor MLP scores (the warm start and the width
    comparison use them; computed here when warm-starting without them). ``on_step`` receives a
    dict per step: core.train's StepRecord fields plus this step's DDP point (``m``, and per type
    ŝ / target / λ's) and, every few steps, ``histogram``. On Stop (:class:`core.errors.Stopped`)
    nothing is returned and the model is as before."""
    options = options or DDPOptions()
    train_options = train_options or TrainOptions(minutes=3, **TRAIN_DEFAULTS)
    model = loaded.model
    check_trainable(model)
    if options.prunes_heads:
        attention_handles(model)  # a clear error for an architecture without q/k/v/o
    gates = Gates(model, options)
    windows, heldout = options.windows(loaded.tokenizer, train_options.seed, max_length=loaded.max_length,
                                       min_windows=train_options.batch_size)
    warm_seconds = 0.0
    if options.warm_start:
        start = time.perf_counter()
        if options.prunes_mlp:
            if scores is None:
                scores = score_model(loaded, "entropy", source=options.source, samples=options.warm_samples,
                                     seq_len=options.seq_len, seed=train_options.seed, progress=False,
                                     stop=stop).scores
            gates.set_values("mlp", warm_values(scores, options.warm_low))
        if options.prunes_heads:
            unit = gates.types["heads"]
            with gates.attached(), gates.using("soft"):  # the MLP gates' warm values shape what the heads see
                gates.set_values("heads", [torch.ones_like(z) for z in unit.z])  # head gates out of the way
                head_scores = head_entropy_scores(model, windows[:options.warm_samples], unit.granularity)
            gates.set_values("heads", warm_values(head_scores, options.warm_low))
        warm_seconds = time.perf_counter() - start
    objective = DDPObjective(gates, options, _histogram_every(options, train_options))

    def forward(record: StepRecord) -> None:
        if on_step is None:
            return
        point = asdict(record)
        if objective.history and objective.history[-1]["step"] == record.step:
            point.update({k: v for k, v in objective.history[-1].items() if k != "step"})
        if objective.snapshots and objective.snapshots[-1]["step"] == record.step:
            point["histogram"] = objective.snapshots[-1]
        on_step(point)

    with gates.attached():
        result = train(model, model, objective, windows, gates.param_set(train_options), train_options,
                       heldout=heldout if options.heldout_windows else None, stop=stop, on_step=forward,
                       progress=progress)
        plan = gates.plan()
    if objective.snapshots[-1]["step"] != result.steps:
        objective.snapshots.append(objective.snapshot(result.steps))
    pruned = plan.apply(model)
    pruned.eval()
    entropy_widths = None
    if scores is not None and options.prunes_mlp:
        entropy_widths = plan_widths(model, options.ratio, "global", scores=scores)
    meta = _meta(loaded, options, train_options, plan, result, objective, pruned, warm_seconds, windows, heldout)
    if entropy_widths is not None:
        meta["ddp"]["entropy_global_widths"] = entropy_widths
    return DDPResult(pruned, plan, meta, result, objective.history, objective.snapshots, entropy_widths)


def _meta(loaded, options: DDPOptions, train_options: TrainOptions, plan: DDPPlan, result, objective: DDPObjective,
          pruned: nn.Module, warm_seconds: float, windows: torch.Tensor, heldout: torch.Tensor) -> dict:
    full = mlp_widths(loaded.model)
    widths = plan.widths()
    before, after = count_params(loaded.model)["params"], count_params(pruned)["params"]
    last = objective.history[-1] if objective.history else {}
    meta = {
        "model": loaded.spec,
        "criterion": "ddp",
        "allocation": "ddp (learned gates)",
        "ratio": options.ratio if options.prunes_mlp else 0.0,
        "achieved_ratio": 1.0 - sum(widths) / sum(full),
        "original_intermediate_sizes": full,
        "intermediate_sizes": widths,
        "kept_indices": [k.tolist() for k in plan.mlp_kept],
        "params_removed_share": 1.0 - after / before,
        "compensation": {"method": "none"},
        "tool_version": __version__,
    }
    counts = plan.head_counts()
    if counts is not None:
        handles = attention_handles(loaded.model)
        heads = [h.heads for h in handles]
        meta["heads"] = {"granularity": objective.gates.types["heads"].granularity,
                         "ratio": options.heads_ratio, "achieved_ratio": 1.0 - sum(counts[0]) / sum(heads),
                         "original_heads": heads, "original_kv_heads": [h.kv_heads for h in handles],
                         "layer_num_attention_heads": counts[0], "layer_num_key_value_heads": counts[1],
                         "kept_heads": [k.tolist() for k in plan.head_kept or []]}
    meta["ddp"] = {
        "options": options.to_dict(), "train": train_options.to_dict(), "trainable_params": result.trainable_params,
        "training_windows": int(windows.shape[0]), "heldout_tokens": int(heldout.numel()),
        "tokens_seen": result.tokens, "steps": result.steps, "seconds": round(result.seconds, 2),
        "warm_start_seconds": round(warm_seconds, 2), "ended_by": result.ended_by,
        "tokens_per_second": round(result.tokens_per_second, 2),
        "heldout_kl_hardened_before": result.initial_heldout, "heldout_kl_hardened_after": result.final_heldout,
        "best_step": result.best_step, "final_point": last, "timing": result.timing,
        "curve": [{k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in p.items()} for p in result.curve],
    }
    return meta


def save_ddp(result: DDPResult, tokenizer, out_dir: str | Path, mode: str | None = None) -> Path:
    """Export like any pruned model; head-pruned or non-uniform models go through hf-remote-code."""
    widths = result.plan.widths()
    if mode is None:
        mode = "hf-native" if len(set(widths)) == 1 and result.plan.head_kept is None else "hf-remote-code"
    meta = {k: v for k, v in result.meta.items() if k not in ("export", "intermediate_sizes")}
    return save_pruned(result.model, tokenizer, out_dir, meta, mode=mode)
