"""Least-squares compensation: after removing neurons, refit each layer's ``down_proj`` so the MLP
output on calibration text stays as close as possible to the dense one.

With ``a`` (n, d_ff) the activations at the input of ``down_proj`` (dense model, n calibration
tokens), ``W`` (H, d_ff) its weight, K the kept neurons and R the removed ones, the MLP output is
``a W^T``. Plain pruning keeps ``W_K``; compensation solves

    W'_K = argmin ‖a W^T − a_K W'^T‖²  =  W_K + W_R G_RK (G_KK + λ I)^{-1},   G = a^T a

i.e. the removed neurons' contribution is re-expressed through the kept neurons it correlates
with. ``λ = damping · mean(diag G_KK)`` keeps the solve stable when G is rank-deficient (fewer
tokens than neurons) and shrinks the correction toward plain pruning. Forward passes only; the
Gram matrices G (d_ff × d_ff per layer, fp64) are the only state. The result is still an ordinary
smaller model (same shapes as plain pruning), so every export mode reloads it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from core.errors import PruneConfigError
from core.importance.taylor import forward_with_down_hooks
from core.models.adapters import mlp_handles
from core.options import Options, knob

COMPENSATIONS = ("none", "lsq", "region")


@dataclass
class CompensationOptions(Options):
    """Least-squares refit of down_proj after pruning. The statistics come from ``samples`` ×
    ``seq_len`` windows of the scoring source's calibration split (forward passes of the dense model
    only); λ = ``damping`` · mean diag(G_KK)."""

    error = PruneConfigError
    cli_prefix = "compensate-"

    method: str = knob("lsq", "lsq (default): refit each down_proj by least squares so the MLP output on "
                       "calibration text stays close to the dense one (forward passes only, same shapes as plain "
                       "pruning); region: lsq, then each MLP reconstructed layer by layer (region_*); none: plain "
                       "slicing", choices=COMPENSATIONS, flag="compensate")
    samples: int = knob(128, "lsq: calibration windows for the statistics", low=1, ui_low=4, ui_high=256, step=4)
    seq_len: int = knob(128, "lsq: tokens per window", low=2, ui_low=16, ui_high=1024, step=16)
    damping: float = knob(0.1, "lsq: ridge damping, a fraction of the mean kept-neuron activation energy",
                          low=0.0, low_open=True, ui_high=1.0)
    # region (core.prune.region): the lsq refit, then each pruned MLP fitted layer by layer to the dense MLP's
    # output on the pruned model's own inputs (closed-form down refit, then optional Adam steps on gate/up/down)
    region_samples: int = knob(32, "region: calibration windows (of seq_len tokens) each MLP is reconstructed on",
                               low=1, ui_low=4, ui_high=128, step=4)
    region_steps: int = knob(0, "region: Adam steps per layer on gate/up/down after the closed-form down refit "
                             "(0 = closed form only)", low=0, ui_high=200)
    region_lr: float = knob(1e-3, "region: Adam learning rate of those steps", low=0.0, low_open=True, ui_low=1e-5,
                            ui_high=1e-2, step=1e-5)
    region_batch: int = knob(1024, "region: tokens per Adam step", low=1, ui_low=128, ui_high=8192, step=128)
    region_target: str = knob("local", "region: what each MLP is fitted to — local: the dense MLP's output on the "
                              "same input; stream: the dense residual stream after the layer (also corrects the error "
                              "arriving from below)",
                              choices=("local", "stream"))

    def to_dict(self) -> dict:
        """Every field, less the ``region_*`` knobs unless the method is ``region`` (what a run records)."""
        out = super().to_dict()
        return out if self.method == "region" else {k: v for k, v in out.items() if not k.startswith("region_")}

    def validate(self) -> None:
        if self.method not in COMPENSATIONS:  # checked first: these sentences predate the knobs
            raise PruneConfigError(f"Unknown compensation '{self.method}'; available: {', '.join(COMPENSATIONS)}.")
        check_damping(self.damping)
        super().validate()


@torch.no_grad()
def activation_grams(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = True,
                     stop: Callable[[], bool] | None = None) -> tuple[list[torch.Tensor], int]:
    """G_l = Σ_tokens a aᵀ at every down_proj input of the (dense) model.

    windows: (N, T) ids. Returns one fp64 (d_ff_l, d_ff_l) matrix per layer (on CPU) and the token count.
    """
    handles = mlp_handles(model)
    grams = [torch.zeros(h.width, h.width, dtype=torch.float64) for h in handles]

    def make_pre_hook(layer: int):
        def pre_hook(_module, args):
            a = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (B·T, d_ff)
            grams[layer].add_((a.T @ a).double().cpu())
        return pre_hook

    forward_with_down_hooks(model, windows, make_pre_hook, desc="compensation statistics", batch_size=batch_size,
                            progress=progress, stop=stop)
    return grams, int(windows.numel())


def compensated_down(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damping: float) -> torch.Tensor:
    """The refitted down_proj weight for the kept neurons.

    weight: (H, d_ff) dense down_proj weight; gram: (d_ff, d_ff) Σ a aᵀ; kept: (k,) ascending indices.
    Returns (H, k) in the weight's dtype: ``W_K + W_R G_RK (G_KK + λI)^{-1}``.
    """
    d_ff = weight.shape[1]
    kept = kept.to(torch.long).cpu()
    removed_mask = torch.ones(d_ff, dtype=torch.bool)
    removed_mask[kept] = False
    removed = removed_mask.nonzero().squeeze(1)
    w = weight.detach().double().cpu()
    if removed.numel() == 0:
        return weight.detach().index_select(1, kept.to(weight.device)).clone()
    g_kk = gram.index_select(0, kept).index_select(1, kept)
    g_rk = gram.index_select(0, removed).index_select(1, kept)
    lam = damping * float(g_kk.diagonal().mean().clamp_min(1e-12))
    g_kk = g_kk + lam * torch.eye(kept.numel(), dtype=torch.float64)
    # (G_KK + λI)^{-1} G_KR via Cholesky (G_KK + λI is symmetric positive definite for λ > 0).
    chol = torch.linalg.cholesky(g_kk)
    solved = torch.cholesky_solve(g_rk.T.contiguous(), chol)  # (k, r)
    new = w.index_select(1, kept) + w.index_select(1, removed) @ solved.T  # (H, k)
    return new.to(dtype=weight.dtype, device=weight.device)


def check_damping(damping: float) -> float:
    damping = float(damping)
    if not damping > 0.0 or damping != damping:
        raise PruneConfigError(f"The compensation damping must be a positive number, got {damping}.")
    return damping


@torch.no_grad()
def compensate_pruned(pruned: nn.Module, dense: nn.Module, kept: list[torch.Tensor], grams: list[torch.Tensor],
                      damping: float = 0.01) -> nn.Module:
    """Overwrite each pruned layer's down_proj weight (H, k_l) with the least-squares refit computed
    from the dense layer's weight and Gram matrix. ``pruned`` is modified in place and returned."""
    damping = check_damping(damping)
    dense_handles, pruned_handles = mlp_handles(dense), mlp_handles(pruned)
    if not (len(dense_handles) == len(pruned_handles) == len(kept) == len(grams)):
        raise PruneConfigError("Compensation needs one kept-index list and one Gram matrix per layer.")
    for d, p, index, gram in zip(dense_handles, pruned_handles, kept, grams):
        if gram.shape != (d.width, d.width) or p.width != index.numel():
            raise PruneConfigError(f"Layer {d.index}: the compensation statistics do not match the model's widths.")
        p.down.weight.copy_(compensated_down(d.down.weight, gram, index, damping))
    return pruned
