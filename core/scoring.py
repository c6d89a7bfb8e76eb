"""Hook machinery that turns a loss into per-neuron scores.

Taylor importance (HFPrune §3): capture ``a`` (B, T, d_ff) at the input of each ``down_proj``
and ``g = dL/da`` in the backward pass, and accumulate ``I_j = Σ_samples Σ_t |a_tj · g_tj|`` in
fp32. All weights are frozen; the gradient enters at the first MLP's input, so no weight gradient
is ever computed or stored. The loss over the vocabulary is evaluated in position chunks on the
final hidden states with a two-stage backward, so (B·T, V) fp32 logits never exist at once.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import mlp_handles
from .progress import check_stop

# Rows of (rows, vocab) fp32 logits materialised at once: ~32 MiB (cache-friendly; measured faster than 256 MiB).
LOGIT_CHUNK_BYTES = 32 * 2**20


class TokenLoss(Protocol):
    """What a Taylor criterion supplies: a per-position loss from fp32 logits."""

    def token_loss(self, logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        """logits (R, V) fp32, targets (R,) long (-100 = no target) → per-row loss (R,)."""

    def position_weights(self, seq_len: int) -> torch.Tensor:
        """(T,) weights that turn per-position losses into the per-sample loss L."""


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Temporarily set requires_grad=False on every parameter."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextlib.contextmanager
def hooks(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split (N, T) windows into (≤batch_size, T) batches."""
    return list(torch.split(windows, max(1, batch_size)))


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final hidden states (..., H) → logits (..., V), with the config's logit soft-capping if any."""
    logits = model.lm_head(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def chunk_rows(vocab_size: int) -> int:
    return max(16, LOGIT_CHUNK_BYTES // (4 * vocab_size))


def base_forward(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Run the decoder stack only: (B, T) ids → last hidden states (B, T, H)."""
    out = model.model(input_ids=input_ids, use_cache=False)
    return out.last_hidden_state


def taylor_scores(model: nn.Module, windows: torch.Tensor, criterion: TokenLoss, *, batch_size: int = 4,
                  aggregate: str = "sum_abs", teacher: nn.Module | None = None, teacher_temperature: float = 1.0,
                  progress: bool = True, stop: Callable[[], bool] | None = None) -> list[torch.Tensor]:
    """First-order Taylor importance of every MLP neuron.

    windows: (N, T) token ids. aggregate: ``sum_abs`` = Σ_samples Σ_t |a·g| (HFPrune),
    ``abs_sum`` = mean_samples |Σ_t a·g| (AMP) or ``sq_sum`` = Σ_samples (Σ_t a·g)² (Fisher). teacher: optional frozen model whose logits
    (divided by ``teacher_temperature``) are passed to the criterion. Returns one fp32 (d_ff_l,)
    tensor per layer.
    """
    if aggregate not in ("sum_abs", "abs_sum", "sq_sum"):
        raise ValueError(f"aggregate must be 'sum_abs', 'abs_sum' or 'sq_sum', got {aggregate!r}")
    handles = mlp_handles(model)
    scores = [torch.zeros(h.width, dtype=torch.float32) for h in handles]
    seq_len = windows.shape[1]
    weights = criterion.position_weights(seq_len).to(torch.float32)  # (T,)
    rows_per_chunk = chunk_rows(model.config.vocab_size)

    def make_pre_hook(layer: int):
        def pre_hook(_module, args):
            a = args[0]  # (B, T, d_ff)
            if a.requires_grad:
                def grad_hook(g: torch.Tensor) -> None:
                    prod = a.detach().float() * g.float()  # (B, T, d_ff)
                    if aggregate == "sum_abs":
                        per_batch = prod.abs().sum(dim=(0, 1))
                    elif aggregate == "abs_sum":
                        per_batch = prod.sum(dim=1).abs().sum(dim=0)
                    else:  # sq_sum: (Σ_t a·g)² per window; windows of a batch do not mix in the backward
                        per_batch = prod.sum(dim=1).pow(2).sum(dim=0)
                    scores[layer].add_(per_batch.to(scores[layer].device))
                a.register_hook(grad_hook)
        return pre_hook

    def grad_entry_hook(_module, args, kwargs):
        # The gradient enters at the first MLP's input: nothing below it (embeddings, layer 0
        # attention) needs a backward pass, and no weight ever needs a gradient.
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: kwargs[key].detach().requires_grad_(True)}

    registered = [h.down.register_forward_pre_hook(make_pre_hook(h.index)) for h in handles]
    registered.append(handles[0].mlp.register_forward_pre_hook(grad_entry_hook, with_kwargs=True))
    device = next(model.parameters()).device
    bar = tqdm(total=int(windows.shape[0]), desc="scoring", unit="window", disable=not progress)
    with frozen(model), hooks(registered), torch.enable_grad(), bar:
        for batch in batches(windows, batch_size):
            check_stop(stop, "Scoring was stopped.")
            batch = batch.to(device)
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=batch, use_cache=False).logits.float() / teacher_temperature
            hidden = base_forward(model, batch)  # (B, T, H)
            detached = hidden.detach().requires_grad_(True)
            flat = detached.reshape(-1, hidden.shape[-1])  # (B·T, H)
            targets = _next_token_targets(batch).reshape(-1)  # (B·T,)
            row_weights = weights.to(device).repeat(batch.shape[0])  # (B·T,)
            teacher_flat = None if teacher_logits is None else teacher_logits.reshape(flat.shape[0], -1)
            for start in range(0, flat.shape[0], rows_per_chunk):
                stop_row = start + rows_per_chunk
                logits = lm_logits(model, flat[start:stop_row]).float()  # (R, V)
                chunk_teacher = None if teacher_flat is None else teacher_flat[start:stop_row]
                per_row = criterion.token_loss(logits, targets[start:stop_row], chunk_teacher)  # (R,)
                (per_row * row_weights[start:stop_row]).sum().backward()
            hidden.backward(detached.grad)
            bar.update(batch.shape[0])
    if aggregate == "abs_sum":
        scores = [s / windows.shape[0] for s in scores]
    return scores


def _next_token_targets(batch: torch.Tensor) -> torch.Tensor:
    """(B, T) ids → (B, T) targets: token t+1 at position t, -100 at the last position."""
    targets = torch.full_like(batch, -100)
    targets[:, :-1] = batch[:, 1:]
    return targets


@torch.no_grad()
def activation_sq_norms(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = True,
                        stop: Callable[[], bool] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Forward-only statistics of ``a`` at each down_proj input over all calibration tokens.

    Returns (Σ a², Σ a, token count): two lists of fp32 (d_ff_l,) tensors and the number of tokens.
    """
    handles = mlp_handles(model)
    sq = [torch.zeros(h.width, dtype=torch.float32) for h in handles]
    total = [torch.zeros(h.width, dtype=torch.float32) for h in handles]

    def make_pre_hook(layer: int):
        def pre_hook(_module, args):
            a = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (B·T, d_ff)
            sq[layer].add_(a.pow(2).sum(0).cpu())
            total[layer].add_(a.sum(0).cpu())
        return pre_hook

    forward_with_down_hooks(model, windows, make_pre_hook, desc="activation statistics", batch_size=batch_size,
                            progress=progress, stop=stop)
    return sq, total, int(windows.numel())


@torch.no_grad()
def forward_with_down_hooks(model: nn.Module, windows: torch.Tensor, make_pre_hook: Callable[[int], Callable], *,
                            desc: str, batch_size: int = 4, progress: bool = True,
                            stop: Callable[[], bool] | None = None) -> None:
    """Run the decoder stack over (N, T) windows with ``make_pre_hook(layer)`` as a forward pre-hook
    on every down_proj (it sees the (B, T, d_ff) activations); checks ``stop`` before each batch."""
    registered = [h.down.register_forward_pre_hook(make_pre_hook(h.index)) for h in mlp_handles(model)]
    device = next(model.parameters()).device
    bar = tqdm(total=int(windows.shape[0]), desc=desc, unit="window", disable=not progress)
    with hooks(registered), bar:
        for batch in batches(windows, batch_size):
            check_stop(stop, f"Stopped while computing {desc}.")
            base_forward(model, batch.to(device))
            bar.update(batch.shape[0])
