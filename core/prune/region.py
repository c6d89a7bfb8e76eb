"""Whole-MLP (region) reconstruction: the ``region`` compensation, run after the least-squares refit.

Layer by layer from the bottom, each pruned MLP (gate, up and down) is fitted so that its output
matches the dense MLP's output *on the same input* x, where x is what the pruned model itself feeds
that MLP — its layers below already reconstructed — so the fit sees the inputs it will get at
inference and errors do not compound. Per layer, on the calibration tokens (n = windows × T rows):

1. ``refit``: a closed-form step — down_proj solved by ridge least squares on the pruned MLP's own
   activations A (n, k), a = act(gate x) ⊙ up x:  W_down = argmin ‖A Wᵀ − Y‖² + λ‖W‖²,
   λ = damping · mean diag(AᵀA), with Y (n, H) the dense MLP's output on the same x;
2. ``steps`` Adam steps on gate, up and down together, each on ``batch_tokens`` rows drawn (seeded)
   from the n, minimising ‖mlp(x) − Y‖² / ‖Y‖² (the relative error reported per layer).

Then the layer is run again with its new MLP to give the next layer's inputs. Cost: two passes of the
decoder stack over the tokens, one dense-MLP pass, and the steps (about 3× an MLP forward on
``batch_tokens`` rows each). Weights keep their shapes: the result is an ordinary pruned model.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from core.errors import PruneConfigError
from core.models.adapters import decoder_layers, mlp_handles
from core.models.forward import base_forward, batches, hooks
from core.progress import check_stop


@dataclass
class RegionReport:
    """Relative MLP-output error ‖mlp(x) − Y‖² / ‖Y‖² per layer on the reconstruction tokens: at the
    start (after the lsq refit), after the closed-form down refit, and after the Adam steps; seconds."""

    start: list[float] = field(default_factory=list)
    refit: list[float] = field(default_factory=list)
    end: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        mean = (lambda xs: round(sum(xs) / len(xs), 5) if xs else None)  # noqa: E731
        return {"tokens": self.tokens, "seconds": round(self.seconds, 1), "mean_error_start": mean(self.start),
                "mean_error_refit": mean(self.refit), "mean_error_end": mean(self.end),
                "error_start": [round(e, 5) for e in self.start], "error_end": [round(e, 5) for e in self.end]}


@torch.no_grad()
def _layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int,
                  stop: Callable[[], bool] | None) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """One pass of the decoder stack: per batch, the first layer's input hidden states (B, T, H) and the
    keyword arguments every layer is called with (masks, position embeddings; references, not copies)."""
    layers = decoder_layers(model)
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = []

    def make_hook(index: int):
        def pre_hook(_module, args, kw):
            if index == 0:
                hidden.append((args[0] if args else kw["hidden_states"]).detach())
                kwargs.append([])
            kwargs[-1].append({k: v for k, v in kw.items() if k != "hidden_states"})
        return pre_hook

    registered = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    with hooks(registered):
        for batch in batches(windows, batch_size):
            check_stop(stop, "Region reconstruction was stopped.")
            base_forward(model, batch.to(device))
    return hidden, kwargs


@torch.no_grad()
def _run_layer(layer: nn.Module, mlp: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]
               ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run one decoder layer over every batch: (its outputs per batch, the MLP inputs (n, H) it saw)."""
    seen: list[torch.Tensor] = []
    handle = mlp.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with hooks([handle]):
        outs = [layer(h, **kw) for h, kw in zip(hidden, kwargs)]
    outs = [o[0] if isinstance(o, tuple) else o for o in outs]
    return outs, torch.cat(seen)


def _chunks(x: torch.Tensor, rows: int = 4096) -> list[torch.Tensor]:
    return list(torch.split(x, rows))


@torch.no_grad()
def _relative_error(mlp: nn.Module, x: torch.Tensor, y: torch.Tensor, y_energy: float) -> float:
    err = sum(float((mlp(cx) - cy).float().pow(2).sum()) for cx, cy in zip(_chunks(x), _chunks(y)))
    return err / y_energy


@torch.no_grad()
def refit_down(handle, x: torch.Tensor, y: torch.Tensor, damping: float) -> None:
    """Closed-form step: down_proj ← argmin ‖A Wᵀ − Y‖² + λ‖W‖² on the MLP's own activations A (n, k)
    for inputs x (n, H) and targets y (n, H); λ = damping · mean diag(AᵀA). In place."""
    k = handle.width
    gram = torch.zeros(k, k, dtype=torch.float64)
    cross = torch.zeros(k, y.shape[1], dtype=torch.float64)
    captured: list[torch.Tensor] = []
    tap = handle.down.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    with hooks([tap]):
        for cx, cy in zip(_chunks(x), _chunks(y)):
            captured.clear()
            handle.mlp(cx)
            a = captured[0].float().reshape(-1, k)
            gram += (a.T @ a).double().cpu()
            cross += (a.T @ cy.float()).double().cpu()
    lam = damping * max(float(gram.diagonal().mean()), 1e-12)
    chol = torch.linalg.cholesky(gram + lam * torch.eye(k, dtype=torch.float64))
    solved = torch.cholesky_solve(cross, chol)  # (k, H)
    handle.down.weight.copy_(solved.T.to(handle.down.weight.dtype))


def _train_mlp(handle, x: torch.Tensor, y: torch.Tensor, y_energy_per_row: float, *, steps: int, lr: float,
               batch_tokens: int, generator: torch.Generator, stop: Callable[[], bool] | None, bar) -> None:
    """``steps`` Adam steps on the MLP's gate / up / down (fp32 while training) on random rows of (x, y)."""
    mlp = handle.mlp
    dtype = handle.down.weight.dtype
    params = [linear.weight for linear in handle.linears.values()] + [
        linear.bias for linear in handle.linears.values() if linear.bias is not None]
    saved = [(p, p.requires_grad) for p in mlp.parameters()]
    for p in mlp.parameters():
        p.requires_grad_(False)
    mlp.float()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                check_stop(stop, "Region reconstruction was stopped.")
                rows = torch.randint(0, x.shape[0], (min(batch_tokens, x.shape[0]),), generator=generator)
                rows = rows.to(x.device)
                loss = (mlp(x[rows].float()) - y[rows].float()).pow(2).sum(-1).mean() / y_energy_per_row
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update(1)
    finally:
        mlp.to(dtype)
        for p, flag in saved:
            p.requires_grad_(flag)


def _snapshot(handle) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in handle.mlp.state_dict().items()}


def _restore(handle, saved: dict[str, torch.Tensor]) -> None:
    handle.mlp.load_state_dict(saved)


def _fit_layer(p, d, x: torch.Tensor, report: RegionReport, *, steps: int, lr: float, batch_tokens: int,
               refit: bool, damping: float, generator: torch.Generator, stop: Callable[[], bool] | None, bar) -> None:
    """Fit one pruned MLP ``p`` to the dense ``d`` on inputs x (n, H); each stage is kept only if it
    lowers the relative error (appended to ``report`` after each stage)."""
    with torch.no_grad():
        y = torch.cat([d.mlp(cx) for cx in _chunks(x)])  # the dense MLP on the same inputs (n, H)
    energy = max(float(y.float().pow(2).sum()), 1e-30)
    error = _relative_error(p.mlp, x, y, energy)
    report.start.append(error)
    if refit:
        before = _snapshot(p)
        refit_down(p, x, y, damping)
        after = _relative_error(p.mlp, x, y, energy)
        error = after if after <= error else (_restore(p, before) or error)
    report.refit.append(error)
    if steps:
        before = _snapshot(p)
        _train_mlp(p, x, y, energy / x.shape[0], steps=steps, lr=lr, batch_tokens=batch_tokens, generator=generator,
                   stop=stop, bar=bar)
        after = _relative_error(p.mlp, x, y, energy)
        error = after if after <= error else (_restore(p, before) or error)
    report.end.append(error)


def reconstruct_regions(pruned: nn.Module, dense: nn.Module, windows: torch.Tensor, *, steps: int = 0,
                        lr: float = 1e-3, batch_tokens: int = 1024, refit: bool = True, damping: float = 0.01,
                        seed: int = 0, batch_size: int = 4, progress: bool = True,
                        stop: Callable[[], bool] | None = None) -> RegionReport:
    """Fit every pruned MLP to the dense one on the pruned model's own inputs, bottom layer first (see
    the module docstring). windows: (N, T) calibration ids. ``pruned`` is changed in place (MLP weights
    only); a Stop leaves it partly reconstructed, so callers work on a copy. Returns the per-layer errors."""
    if steps < 0 or batch_tokens < 1 or not lr > 0:
        raise PruneConfigError("Region reconstruction needs steps ≥ 0, batch_tokens ≥ 1 and a positive lr.")
    start_time = time.perf_counter()
    d_handles, p_handles = mlp_handles(dense), mlp_handles(pruned)
    layers = decoder_layers(pruned)
    if len(d_handles) != len(p_handles):
        raise PruneConfigError("The pruned and the dense model have a different number of layers.")
    report = RegionReport(tokens=int(windows.numel()))
    generator = torch.Generator().manual_seed(seed)
    hidden, kwargs = _layer_inputs(pruned, windows, batch_size, stop)
    bar = tqdm(total=len(layers) * (steps + 1), desc="region reconstruction", unit="step", disable=not progress)
    with bar:
        for index, (layer, p, d) in enumerate(zip(layers, p_handles, d_handles)):
            check_stop(stop, "Region reconstruction was stopped.")
            _outs, x = _run_layer(layer, p.mlp, hidden, [kw[index] for kw in kwargs])
            _fit_layer(p, d, x, report, steps=steps, lr=lr, batch_tokens=batch_tokens, refit=refit, damping=damping,
                       generator=generator, stop=stop, bar=bar)
            del x
            bar.update(1)
            hidden, _x = _run_layer(layer, p.mlp, hidden, [kw[index] for kw in kwargs])  # the next layer's inputs
    report.seconds = time.perf_counter() - start_time
    return report
