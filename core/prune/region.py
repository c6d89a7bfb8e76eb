"""Whole-MLP (region) reconstruction: the ``region`` compensation, run after the least-squares refit.

Layer by layer from the bottom, each pruned MLP (gate, up and down) is fitted so that its output
matches the dense MLP's output *on the same input* x, where x is what the pruned model itself feeds
that MLP — its layers below already reconstructed — so the fit sees the inputs it will get at
inference and errors do not compound. Per layer, on the calibration tokens (n = windows × T rows):

1. ``refit``: a closed-form step — down_proj solved by ridge least squares on the pruned MLP's own
   activations A (n, k), a = act(gate x) ⊙ up x:  W_down = argmin ‖A Wᵀ − Y‖² + λ‖W − W₀‖², shrunk
   toward the lsq refit W₀ with λ = damping · mean diag(AᵀA), Y (n, H) the dense MLP's output on the same x;
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
               ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Run one decoder layer over every batch: its outputs per batch (B, T, H), and the MLP's inputs and
    outputs it saw, each (n, H) in window-major order."""
    seen: list[torch.Tensor] = []
    made: list[torch.Tensor] = []
    rows = (lambda t: t.detach().reshape(-1, t.shape[-1]))  # noqa: E731
    handles = [mlp.register_forward_pre_hook(lambda _m, args: seen.append(rows(args[0]))),
               mlp.register_forward_hook(lambda _m, _a, out: made.append(rows(out)))]
    with hooks(handles):
        outs = [layer(h, **kw) for h, kw in zip(hidden, kwargs)]
    outs = [o[0] if isinstance(o, tuple) else o for o in outs]
    return outs, torch.cat(seen), torch.cat(made)


def _chunks(x: torch.Tensor, rows: int = 4096) -> list[torch.Tensor]:
    return list(torch.split(x, rows))


class _Block:
    """What a layer adds to the residual stream from its MLP input x: ``post(mlp(x))``, where ``post`` is
    the norm some families apply to the MLP output (Gemma's post_feedforward_layernorm), else nothing."""

    def __init__(self, layer: nn.Module, handle) -> None:
        self.handle, self.post = handle, getattr(layer, "post_feedforward_layernorm", None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.handle.mlp(x)
        return self.post(out) if self.post is not None else out

    def modules(self) -> list[nn.Module]:
        return [self.handle.mlp] + ([self.post] if self.post is not None else [])


@torch.no_grad()
def _relative_error(block: Callable, x: torch.Tensor, y: torch.Tensor, y_energy: float) -> float:
    err = sum(float((block(cx) - cy).float().pow(2).sum()) for cx, cy in zip(_chunks(x), _chunks(y)))
    return err / y_energy


@torch.no_grad()
def refit_down(handle, x: torch.Tensor, y: torch.Tensor, damping: float) -> None:
    """Closed-form step: down_proj ← argmin ‖A Wᵀ − Y‖² + λ‖W − W₀‖² on the MLP's own activations A (n, k)
    for inputs x (n, H) and targets y (n, H), shrunk toward its current weight W₀ (the lsq refit);
    λ = damping · mean diag(AᵀA). In place."""
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
    current = handle.down.weight.detach().double().cpu().T  # W₀ᵀ (k, H)
    solved = torch.cholesky_solve(cross + lam * current, chol)  # (k, H)
    handle.down.weight.copy_(solved.T.to(handle.down.weight.dtype))


def _train_mlp(block: _Block, x: torch.Tensor, y: torch.Tensor, y_energy_per_row: float, *, steps: int, lr: float,
               batch_tokens: int, generator: torch.Generator, stop: Callable[[], bool] | None, bar) -> None:
    """``steps`` Adam steps on the MLP's gate / up / down (fp32 while training) on random rows of (x, y)."""
    handle = block.handle
    dtype = handle.down.weight.dtype
    params = [linear.weight for linear in handle.linears.values()] + [
        linear.bias for linear in handle.linears.values() if linear.bias is not None]
    saved = [(p, p.requires_grad) for m in block.modules() for p in m.parameters()]
    for p, _flag in saved:
        p.requires_grad_(False)
    for m in block.modules():
        m.float()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                check_stop(stop, "Region reconstruction was stopped.")
                rows = torch.randint(0, x.shape[0], (min(batch_tokens, x.shape[0]),), generator=generator)
                rows = rows.to(x.device)
                loss = (block(x[rows].float()) - y[rows].float()).pow(2).sum(-1).mean() / y_energy_per_row
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update(1)
    finally:
        for m in block.modules():
            m.to(dtype)
        for p, flag in saved:
            p.requires_grad_(flag)


def _snapshot(handle) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in handle.mlp.state_dict().items()}


def _restore(handle, saved: dict[str, torch.Tensor]) -> None:
    handle.mlp.load_state_dict(saved)


TARGETS = ("local", "stream")


def _fit_layer(block: _Block, x: torch.Tensor, y: torch.Tensor, held: int, report: RegionReport, *, steps: int,
               lr: float, batch_tokens: int, refit: bool, damping: float, generator: torch.Generator,
               stop: Callable[[], bool] | None, bar) -> None:
    """Fit one pruned MLP so ``block(x)`` matches targets y (n, H) on inputs x (n, H). The last ``held`` rows
    are held out: the fit uses the others, and each stage (the closed-form refit, only where the block is
    linear in down_proj, i.e. no norm after the MLP; the Adam steps) is kept only if it lowers the
    relative error on the held-out rows (all rows when ``held`` is 0), which ``report`` gets."""
    p = block.handle
    fit = slice(0, x.shape[0] - held) if held else slice(None)
    judge = slice(x.shape[0] - held, None) if held else slice(None)
    x_fit, y_fit, x_judge, y_judge = x[fit], y[fit], x[judge], y[judge]
    energy = max(float(y_judge.float().pow(2).sum()), 1e-30)
    error = _relative_error(block, x_judge, y_judge, energy)
    report.start.append(error)
    if refit and block.post is None:
        before = _snapshot(p)
        refit_down(p, x_fit, y_fit, damping)
        after = _relative_error(block, x_judge, y_judge, energy)
        error = after if after <= error else (_restore(p, before) or error)
    report.refit.append(error)
    if steps:
        before = _snapshot(p)
        fit_energy = max(float(y_fit.float().pow(2).sum()), 1e-30) / x_fit.shape[0]
        _train_mlp(block, x_fit, y_fit, fit_energy, steps=steps, lr=lr, batch_tokens=batch_tokens,
                   generator=generator, stop=stop, bar=bar)
        after = _relative_error(block, x_judge, y_judge, energy)
        error = after if after <= error else (_restore(p, before) or error)
    report.end.append(error)


def reconstruct_regions(pruned: nn.Module, dense: nn.Module, windows: torch.Tensor, *, steps: int = 0,
                        lr: float = 1e-3, batch_tokens: int = 1024, refit: bool = True, damping: float = 0.01,
                        target: str = "local", holdout: float = 0.125, seed: int = 0, batch_size: int = 4,
                        progress: bool = True, stop: Callable[[], bool] | None = None) -> RegionReport:
    """Fit every pruned MLP on the pruned model's own inputs, bottom layer first (see the module
    docstring). windows: (N, T) calibration ids. ``target``: ``local`` = the dense MLP's output on the same
    input; ``stream`` = what this MLP must add for the layer's output to equal the dense model's residual
    stream there (it also corrects the error that reaches it from below). With a norm after the MLP
    (Gemma) the fit goes through that norm and there is no closed-form step. ``holdout``: share of the
    windows (at least one when N > 1) held out to judge each stage. ``pruned`` is changed in place (MLP
    weights only); a Stop leaves it partly reconstructed, so callers work on a copy. Returns the per-layer
    held-out errors."""
    if steps < 0 or batch_tokens < 1 or not lr > 0 or not 0 <= holdout < 1 or target not in TARGETS:
        raise PruneConfigError("Region reconstruction needs steps ≥ 0, batch_tokens ≥ 1, a positive lr, a holdout "
                               f"share in [0, 1) and a target in {', '.join(TARGETS)}.")
    start_time = time.perf_counter()
    d_handles, p_handles = mlp_handles(dense), mlp_handles(pruned)
    p_layers, d_layers = decoder_layers(pruned), decoder_layers(dense)
    if len(d_handles) != len(p_handles):
        raise PruneConfigError("The pruned and the dense model have a different number of layers.")
    report = RegionReport(tokens=int(windows.numel()))
    n_windows = windows.shape[0]
    held = (max(1, round(holdout * n_windows)) if holdout > 0 and n_windows > 1 else 0) * windows.shape[1]
    generator = torch.Generator().manual_seed(seed)
    hidden, kwargs = _layer_inputs(pruned, windows, batch_size, stop)
    dense_hidden = hidden
    bar = tqdm(total=len(p_layers) * (steps + 1), desc="region reconstruction", unit="step", disable=not progress)
    with bar:
        for index, (p, d) in enumerate(zip(p_handles, d_handles)):
            check_stop(stop, "Region reconstruction was stopped.")
            calls = [kw[index] for kw in kwargs]
            block, dense_block = _Block(p_layers[index], p), _Block(d_layers[index], d)
            outs, x, made = _run_layer(p_layers[index], p.mlp, hidden, calls)
            with torch.no_grad():
                if target == "stream":
                    dense_hidden, _dx, _dm = _run_layer(d_layers[index], d.mlp, dense_hidden, calls)
                    added = torch.cat([block.post(c) for c in _chunks(made)]) if block.post is not None else made
                    residual = torch.cat([o.reshape(-1, o.shape[-1]) for o in outs]) - added  # (n, H) before it
                    y = torch.cat([o.reshape(-1, o.shape[-1]) for o in dense_hidden]) - residual
                else:
                    y = torch.cat([dense_block(cx) for cx in _chunks(x)])  # the dense block on the same inputs
            _fit_layer(block, x, y, held, report, steps=steps, lr=lr, batch_tokens=batch_tokens, refit=refit,
                       damping=damping, generator=generator, stop=stop, bar=bar)
            bar.update(1)
            if target == "stream":  # the layer's new output without running its attention again
                with torch.no_grad():
                    rows = residual + torch.cat([block(cx) for cx in _chunks(x)])
                hidden = list(rows.split([o.shape[0] * o.shape[1] for o in outs]))
                hidden = [h.reshape(o.shape) for h, o in zip(hidden, outs)]
            else:
                hidden, _x, _m = _run_layer(p_layers[index], p.mlp, hidden, calls)  # the next layer's inputs
            del x, y, made
    report.seconds = time.perf_counter() - start_time
    return report
