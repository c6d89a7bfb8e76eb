"""Structured OBS selection of MLP neurons, optionally weighted by where the model's output depends on
the layer (the ``obs`` criterion).

A layer's down projection maps the activations a_t (d_ff,) of token t to y_t = W a_t (H,). Removing a
set R of neurons and refitting the kept columns to minimise the weighted reconstruction error
Σ_t w_t ‖W a_t − W' a_{t,K}‖² costs (Optimal Brain Surgeon in column form, as SparseGPT / SlimGPT use it)

    E(R) = tr(W_R [H⁻¹]_RR⁻¹ W_Rᵀ),        H = Σ_t w_t a_t a_tᵀ + λI,  λ = damping · mean diag,

and the optimal update of the kept columns is W ← W − W_R [H⁻¹]_RR⁻¹ [H⁻¹]_R,: . The greedy removes the
``block`` neurons of smallest single-neuron error ‖W_j‖² / [H⁻¹]_jj, applies the block's joint update to W
and H⁻¹, and repeats until no neuron is left. Each neuron's score is the cumulative error at its
removal (interpolated within its block, strictly increasing in removal order), so the top-k neurons at
any width are exactly the greedy's kept set, and the scores are in units of the layer's output error.

Weighting: w_t = ‖∂L/∂y_t‖^power, read in the backward of a Taylor criterion's loss L (the entropy of
the model's own next-token distribution by default): tokens where the model's output does not depend
on this layer's output barely count in H. ``power`` 0 (or no loss) gives plain, unweighted OBS from a
forward pass. The same backward also yields the loss's Taylor scores Σ|a·g|, returned alongside.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from core import distributed
from core.importance.taylor import TokenLoss, forward_with_down_hooks, taylor_scores
from core.models.adapters import mlp_handles
from core.progress import check_stop


class _OutputTap(torch.autograd.Function):
    """Identity on a down_proj output y (B, T, H) whose backward hands (a, g = ∂L/∂y) to ``accumulate``;
    ``a`` (B, T, d_ff), the same call's input, is kept for it (detached)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, a: torch.Tensor, accumulate: Callable[[torch.Tensor, torch.Tensor], None]):
        ctx.save_for_backward(a)
        ctx.accumulate = accumulate
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (a,) = ctx.saved_tensors
        ctx.accumulate(a, g)
        return g, None, None


def token_weights(g: torch.Tensor, power: float) -> torch.Tensor:
    """‖∂L/∂y_t‖^power per token: g (..., H) → (...,) fp32, non-negative (power 0 → all ones)."""
    return g.float().norm(dim=-1).pow(power)


@dataclass
class WeightedGrams:
    """Per-layer statistics of one pass: ``grams`` fp64 (d_ff_l, d_ff_l) Σ_t w_t a_t a_tᵀ on the CPU;
    ``taylor`` fp32 (d_ff_l,) Taylor scores of the weighting loss (None for a forward-only pass);
    ``weights`` fp32 (tokens,) per layer when asked for (tokens in window-major order); ``tokens``."""

    grams: list[torch.Tensor]
    taylor: list[torch.Tensor] | None
    weights: list[torch.Tensor] | None
    tokens: int


def weighted_grams(model: nn.Module, windows: torch.Tensor, loss: TokenLoss | None = None, *, power: float = 1.0,
                   batch_size: int = 4, progress: bool = True, stop: Callable[[], bool] | None = None,
                   data_parallel: bool = False, keep_weights: bool = False) -> WeightedGrams:
    """Σ_t w_t a_t a_tᵀ at every down_proj input over (N, T) ``windows``, w_t = ‖∂L/∂y_t‖^power with L
    the per-sample loss of ``loss`` (a Taylor criterion, e.g. entropy) and y_t the down_proj output. With
    ``loss`` None or ``power`` 0 the pass is forward-only and w_t = 1. ``data_parallel``: this rank takes
    its shard of the windows and the Grams (and Taylor scores) are summed over ranks; ``keep_weights``
    (single process) also returns each layer's (N·T,) weights."""
    handles = mlp_handles(model)
    grams = [torch.zeros(h.width, h.width, dtype=torch.float64) for h in handles]
    kept: list[list[torch.Tensor]] = [[] for _ in handles]

    def add(layer: int, a: torch.Tensor, w: torch.Tensor | None) -> None:
        a = a.detach().float().reshape(-1, a.shape[-1])  # (B·T, d_ff)
        if w is None:
            grams[layer].add_((a.T @ a).double().cpu())
            return
        w = w.reshape(-1).to(a.device)  # (B·T,)
        grams[layer].add_(((a * w.unsqueeze(1)).T @ a).double().cpu())
        if keep_weights:
            kept[layer].append(w.cpu())

    if loss is None or power == 0.0:
        def make_pre_hook(layer: int):
            def pre_hook(_module, args):
                add(layer, args[0], None)
            return pre_hook
        local = windows[distributed.shard(windows.shape[0])] if data_parallel else windows
        forward_with_down_hooks(model, local, make_pre_hook, desc="OBS statistics", batch_size=batch_size,
                                progress=progress, stop=stop)
        if data_parallel:
            distributed.all_reduce_sum(grams)
        ones = [torch.ones(windows.numel()) for _ in handles] if keep_weights else None
        return WeightedGrams(grams, None, ones, int(windows.numel()))

    def output_taps(taps_on: list) -> list:
        def make_hook(layer: int):
            def accumulate(a: torch.Tensor, g: torch.Tensor) -> None:
                add(layer, a, token_weights(g, power))

            def hook(_module, args, output):
                if output.requires_grad:
                    return _OutputTap.apply(output, args[0].detach(), accumulate)
                return None
            return hook
        return [h.down.register_forward_hook(make_hook(i)) for i, h in enumerate(taps_on)]

    taylor = taylor_scores(model, windows, loss, batch_size=batch_size, progress=progress, stop=stop,
                           data_parallel=data_parallel, extra_hooks=output_taps)
    if data_parallel:
        distributed.all_reduce_sum(grams)
    weights = [torch.cat(k) if k else torch.zeros(0) for k in kept] if keep_weights else None
    return WeightedGrams(grams, taylor, weights, int(windows.numel()))


def obs_removal_scores(weight: torch.Tensor, gram: torch.Tensor, damping: float = 0.01, block: int = 16,
                       stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Greedy structured OBS over one layer's neurons (see the module docstring).

    weight: (H, d_ff) down_proj weight; gram: (d_ff, d_ff) Σ_t w_t a_t a_tᵀ. Removes ``block`` neurons at a
    time until none is left. Returns fp32 (d_ff,) scores, strictly increasing in removal order (the
    neurons removed last score highest), equal to the cumulative weighted reconstruction error."""
    d = weight.shape[1]
    w = weight.detach().double().cpu().clone()  # (H, d)
    h = gram.detach().double().cpu()
    lam = damping * max(float(h.diagonal().mean()), 1e-12)
    eye = torch.eye(d, dtype=torch.float64)
    h_inv = torch.cholesky_solve(eye, torch.linalg.cholesky(h + lam * eye))  # (d, d); faster than cholesky_inverse
    index = torch.arange(d)  # original neuron index of each column still present
    scores = torch.empty(d, dtype=torch.float64)
    total = 0.0
    while index.numel():
        check_stop(stop, "OBS selection was stopped.")
        single = w.pow(2).sum(0) / h_inv.diagonal().clamp_min(1e-300)  # (n,) error of removing each alone
        b = min(int(block), index.numel())
        pick = torch.topk(single, b, largest=False, sorted=True).indices  # smallest errors first
        inv_rr = torch.linalg.inv(h_inv[pick][:, pick])  # [H⁻¹]_RR⁻¹ (b, b)
        w_r = w[:, pick]  # (H, b)
        step = inv_rr @ h_inv[pick]  # (b, n)
        joint = float(((w_r @ inv_rr) * w_r).sum().clamp_min(0.0))  # tr(W_R [H⁻¹]_RR⁻¹ W_Rᵀ)
        w.addmm_(w_r, step, alpha=-1.0)  # the kept columns absorb the removed ones
        h_inv.addmm_(h_inv[:, pick], step, alpha=-1.0)  # H⁻¹ of the kept set (removed rows / columns → 0)
        scores[index[pick]] = total + joint * torch.arange(1, b + 1, dtype=torch.float64) / b
        total += joint
        keep = torch.ones(index.numel(), dtype=torch.bool)
        keep[pick] = False
        kept = keep.nonzero().squeeze(1)  # drop the removed columns: later steps work on smaller matrices
        w, h_inv, index = w.index_select(1, kept), h_inv.index_select(0, kept).index_select(1, kept), index[kept]
    return _strictly_increasing(scores)


def _strictly_increasing(scores: torch.Tensor) -> torch.Tensor:
    """fp64 (d,) scores → fp32 with the same order and no ties (each at least the next float above the
    one removed before it), so a top-k of the fp32 scores is the greedy's kept set."""
    order = torch.argsort(scores, stable=True)
    ranked = scores[order].float()
    for i in range(1, ranked.numel()):
        if ranked[i] <= ranked[i - 1]:
            ranked[i] = torch.nextafter(ranked[i - 1], torch.tensor(float("inf")))
    out = torch.empty_like(ranked)
    out[order] = ranked
    return out


def obs_scores(model: nn.Module, stats: WeightedGrams, damping: float = 0.01, block: int = 16, *,
               progress: bool = True, stop: Callable[[], bool] | None = None) -> list[torch.Tensor]:
    """:func:`obs_removal_scores` for every layer of ``model`` from its Grams: fp32 (d_ff_l,) per layer."""
    handles = mlp_handles(model)
    out = []
    for h, gram in tqdm(list(zip(handles, stats.grams)), desc="OBS selection", unit="layer", disable=not progress):
        out.append(obs_removal_scores(h.down.weight, gram, damping, block, stop=stop))
    return out
