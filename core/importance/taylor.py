"""Hook machinery that turns a loss into per-neuron scores.

Taylor importance (HFPrune §3): capture ``a`` (B, T, d_ff) at the input of each ``down_proj``
and ``g = dL/da`` in the backward pass, and accumulate ``I_j = Σ_samples Σ_t |a_tj · g_tj|`` in
fp32. All weights are frozen; the gradient enters at the first MLP's input, so no weight gradient
is ever computed or stored. The loss over the vocabulary is evaluated in position chunks on the
final hidden states with a two-stage backward, so (B·T, V) fp32 logits never exist at once.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from core import distributed
from core.errors import HFPruneError
from core.models.adapters import mlp_handles
from core.models.forward import base_forward, batches, chunk_rows, frozen, hooks, lm_logits
from core.progress import check_stop


class TokenLoss(Protocol):
    """What a Taylor criterion supplies: a per-position loss from fp32 logits."""

    def token_loss(self, logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        """logits (R, V) fp32, targets (R,) long (-100 = no target) → per-row loss (R,)."""

    def position_weights(self, seq_len: int) -> torch.Tensor:
        """(T,) weights that turn per-position losses into the per-sample loss L."""


class _ScoreTap(torch.autograd.Function):
    """Identity on the down_proj input ``a`` (B, T, d_ff) whose backward hands (a, g = dL/da) to
    ``accumulate``. ``a`` is kept through ``save_for_backward`` (not a closure), so activation
    checkpointing drops it after the forward and recomputes it for the backward like any other
    saved activation; the backward runs once per real backward, never for a recompute."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, accumulate: Callable[[torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
        ctx.save_for_backward(a)
        ctx.accumulate = accumulate
        return a.view_as(a)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (a,) = ctx.saved_tensors
        ctx.accumulate(a.detach(), g)
        return g, None


@contextlib.contextmanager
def checkpointed(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Recompute each decoder layer's activations in the backward (transformers' gradient
    checkpointing, non-reentrant) while the model stays in eval mode. transformers only checkpoints
    a layer whose own ``training`` flag is set, so the flag is raised on the decoder-layer modules
    alone: dropout and every other submodule keep eval behaviour. Restored on exit."""
    if not enabled:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise HFPruneError(f"{type(model).__name__} does not support gradient checkpointing.")
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    saved = [m.training for m in layers]
    for m in layers:
        m.training = True  # this module only (not .train(), which would recurse into dropout)
    try:
        yield
    finally:
        for m, flag in zip(layers, saved):
            m.training = flag
        model.gradient_checkpointing_disable()


AGGREGATES = ("sum_abs", "abs_sum", "sq_sum")


def score_taps(handles: list, scores: list[torch.Tensor | None], aggregate: str) -> list:
    """Forward pre-hooks on every down projection (fc2) that route its input ``a`` (B, T, d_ff)
    through :class:`_ScoreTap`, so the backward adds the per-neuron aggregate of ``a·g`` to
    ``scores[layer]`` (fp32, created on first use): ``sum_abs`` Σ_b Σ_t |a·g| (HFPrune), ``abs_sum``
    Σ_b |Σ_t a·g| (AMP; divide by the number of examples afterwards), ``sq_sum`` Σ_b (Σ_t a·g)².
    Only activations that require grad are tapped. Returns the hook handles."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be 'sum_abs', 'abs_sum' or 'sq_sum', got {aggregate!r}")

    def make_accumulate(layer: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
        def accumulate(a: torch.Tensor, g: torch.Tensor) -> None:
            prod = a.float() * g.float()  # (B, T, d_ff)
            if aggregate == "sum_abs":
                per_batch = prod.abs().sum(dim=(0, 1))
            elif aggregate == "abs_sum":
                per_batch = prod.sum(dim=1).abs().sum(dim=0)
            else:  # sq_sum: (Σ_t a·g)² per window; windows of a batch do not mix in the backward
                per_batch = prod.sum(dim=1).pow(2).sum(dim=0)
            if scores[layer] is None:
                scores[layer] = torch.zeros_like(per_batch)
            scores[layer].add_(per_batch)
        return accumulate

    def make_pre_hook(layer: int):
        accumulate = make_accumulate(layer)

        def pre_hook(_module, args):
            a = args[0]  # (B, T, d_ff)
            if a.requires_grad:
                return (_ScoreTap.apply(a, accumulate), *args[1:])
            return None
        return pre_hook

    return [h.down.register_forward_pre_hook(make_pre_hook(i)) for i, h in enumerate(handles)]


def _input_requires_grad(_module, args, kwargs):
    """Forward pre-hook: the module's first input becomes a fresh leaf that requires grad, so the
    backward starts there (nothing below it, and no weight, needs a gradient)."""
    if args:
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
    key = next(iter(kwargs))
    return args, {**kwargs, key: kwargs[key].detach().requires_grad_(True)}


def loss_taylor_scores(model: nn.Module, data: torch.Tensor, loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                       *, batch_size: int = 32, aggregate: str = "abs_sum", progress: bool = True,
                       stop: Callable[[], bool] | None = None, desc: str = "scoring") -> list[torch.Tensor]:
    """Taylor importance for any model with MLP handles and any scalar loss of a batch (encoders:
    AMP's similarity entropy of the embeddings). ``data``: (N, ...) examples split along dim 0;
    ``loss_fn(model, batch)`` → scalar. Same taps and aggregates as :func:`taylor_scores`; the
    gradient enters at the first MLP's up projection (fc1). Returns fp32 (d_ff_l,) per layer, CPU;
    ``abs_sum`` is divided by N (AMP: the mean over images of |Σ_tokens a·g|)."""
    handles = mlp_handles(model)
    scores: list[torch.Tensor | None] = [None] * len(handles)
    registered = score_taps(handles, scores, aggregate)
    registered.append(handles[0].up.register_forward_pre_hook(_input_requires_grad, with_kwargs=True))
    device = next(model.parameters()).device
    bar = tqdm(total=int(data.shape[0]), desc=desc, unit="example", disable=not progress)
    with frozen(model), hooks(registered), torch.enable_grad(), bar:
        for batch in batches(data, batch_size):
            check_stop(stop, "Scoring was stopped.")
            loss = loss_fn(model, batch.to(device))
            loss.backward()
            bar.update(batch.shape[0])
    out = [(s if s is not None else torch.zeros(h.width)).float().cpu() for s, h in zip(scores, handles)]
    return [s / data.shape[0] for s in out] if aggregate == "abs_sum" else out


def taylor_scores(model: nn.Module, windows: torch.Tensor, criterion: TokenLoss, *, batch_size: int = 4,
                  aggregate: str = "sum_abs", teacher: nn.Module | None = None, teacher_temperature: float = 1.0,
                  progress: bool = True, stop: Callable[[], bool] | None = None, data_parallel: bool = False,
                  grad_checkpointing: bool = False,
                  extra_hooks: Callable[[list], list] | None = None) -> list[torch.Tensor]:
    """First-order Taylor importance of every MLP neuron.

    windows: (N, T) token ids. aggregate: ``sum_abs`` = Σ_samples Σ_t |a·g| (HFPrune),
    ``abs_sum`` = mean_samples |Σ_t a·g| (AMP) or ``sq_sum`` = Σ_samples (Σ_t a·g)² (Fisher). teacher: optional
    frozen model whose logits
    (divided by ``teacher_temperature``) are passed to the criterion. ``data_parallel``: inside a
    torch.distributed group, this rank scores only its shard of the windows and the per-window sums
    are all-reduced (every aggregate is a sum over windows; ``abs_sum`` divides by the global N
    after the reduction). ``grad_checkpointing``: recompute layer activations in the backward.
    ``extra_hooks(handles)``: registers more hooks for the same pass and returns their handles (removed
    with the taps; e.g. :mod:`core.importance.obs` reads ∂L/∂y at each down_proj output).
    Returns one fp32 (d_ff_l,) tensor per layer, on the CPU.
    """
    handles = mlp_handles(model)
    scores: list[torch.Tensor | None] = [None] * len(handles)  # fp32 (d_ff_l,) on the layer's device
    n_windows, seq_len = windows.shape
    ids = distributed.shard(n_windows) if data_parallel else torch.arange(n_windows)
    local = windows[ids]  # (N_rank, T)
    weights = criterion.position_weights(seq_len).to(torch.float32)  # (T,)
    rows_per_chunk = chunk_rows(model.config.vocab_size)
    row_uniforms = getattr(criterion, "row_uniforms", None)
    takes_uniforms = row_uniforms is not None and "uniforms" in inspect.signature(criterion.token_loss).parameters

    registered = score_taps(handles, scores, aggregate) + (extra_hooks(handles) if extra_hooks else [])
    # The gradient enters at the first MLP's input: nothing below it (embeddings, layer 0 attention)
    # needs a backward pass, and no weight ever needs a gradient.
    registered.append(handles[0].mlp.register_forward_pre_hook(_input_requires_grad, with_kwargs=True))
    device = next(model.parameters()).device
    bar = tqdm(total=int(local.shape[0]), desc="scoring", unit="window", disable=not progress)
    with frozen(model), hooks(registered), checkpointed(model, grad_checkpointing), torch.enable_grad(), bar:
        for batch_ids, batch in zip(batches(ids, batch_size), batches(local, batch_size)):
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
            row_weights = weights.repeat(batch.shape[0])  # (B·T,)
            teacher_flat = None if teacher_logits is None else teacher_logits.reshape(flat.shape[0], -1)
            uniforms = row_uniforms(batch_ids, seq_len) if takes_uniforms else None  # (B·T,)
            for start in range(0, flat.shape[0], rows_per_chunk):
                stop_row = start + rows_per_chunk
                logits = lm_logits(model, flat[start:stop_row]).float()  # (R, V), on lm_head's device
                here = logits.device
                chunk_teacher = None if teacher_flat is None else teacher_flat[start:stop_row].to(here)
                extra = {} if uniforms is None else {"uniforms": uniforms[start:stop_row].to(here)}
                per_row = criterion.token_loss(logits, targets[start:stop_row].to(here), chunk_teacher, **extra)  # (R,)
                (per_row * row_weights[start:stop_row].to(here)).sum().backward()
            hidden.backward(detached.grad)
            bar.update(batch.shape[0])
    out = [(s if s is not None else torch.zeros(h.width)).float().cpu() for s, h in zip(scores, handles)]
    if data_parallel:
        distributed.all_reduce_sum(out)
    if aggregate == "abs_sum":
        out = [s / n_windows for s in out]
    return out


def _next_token_targets(batch: torch.Tensor) -> torch.Tensor:
    """(B, T) ids → (B, T) targets: token t+1 at position t, -100 at the last position."""
    targets = torch.full_like(batch, -100)
    targets[:, :-1] = batch[:, 1:]
    return targets


@torch.no_grad()
def activation_sq_norms(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = True,
                        stop: Callable[[], bool] | None = None, data_parallel: bool = False,
                        forward: Callable[[nn.Module, torch.Tensor], object] | None = None,
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Forward-only statistics of ``a`` at each down_proj input over all calibration tokens.

    Returns (Σ a², Σ a, token count): two lists of fp32 (d_ff_l,) tensors and the number of tokens.
    ``data_parallel``: this rank runs its shard of the windows and the sums are all-reduced, so every
    rank returns the statistics of all windows. ``forward``: see :func:`forward_with_down_hooks`; the
    token count is then the number of activation rows seen (e.g. images × patches).
    """
    handles = mlp_handles(model)
    sq = [torch.zeros(h.width, dtype=torch.float32) for h in handles]
    total = [torch.zeros(h.width, dtype=torch.float32) for h in handles]
    rows = [0]  # activation rows seen by layer 0 (local)

    def make_pre_hook(layer: int):
        def pre_hook(_module, args):
            a = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (B·T, d_ff)
            sq[layer].add_(a.pow(2).sum(0).cpu())
            total[layer].add_(a.sum(0).cpu())
            if layer == 0:
                rows[0] += a.shape[0]
        return pre_hook

    local = windows[distributed.shard(windows.shape[0])] if data_parallel else windows  # (N_rank, T)
    forward_with_down_hooks(model, local, make_pre_hook, desc="activation statistics", batch_size=batch_size,
                            progress=progress, stop=stop, forward=forward)
    if data_parallel:
        distributed.all_reduce_sum(sq + total)
    return sq, total, int(windows.numel()) if forward is None else rows[0]


@torch.no_grad()
def forward_with_down_hooks(model: nn.Module, windows: torch.Tensor, make_pre_hook: Callable[[int], Callable], *,
                            desc: str, batch_size: int = 4, progress: bool = True,
                            stop: Callable[[], bool] | None = None,
                            forward: Callable[[nn.Module, torch.Tensor], object] | None = None) -> None:
    """Run the decoder stack over (N, T) windows with ``make_pre_hook(layer)`` as a forward pre-hook
    on every down_proj (it sees the (B, T, d_ff) activations); checks ``stop`` before each batch.
    ``forward(model, batch)`` replaces the decoder-stack call (encoders: pixels or token ids)."""
    forward = forward or base_forward
    registered = [h.down.register_forward_pre_hook(make_pre_hook(h.index)) for h in mlp_handles(model)]
    device = next(model.parameters()).device
    bar = tqdm(total=int(windows.shape[0]), desc=desc, unit="window", disable=not progress)
    with hooks(registered), bar:
        for batch in batches(windows, batch_size):
            check_stop(stop, f"Stopped while computing {desc}.")
            forward(model, batch.to(device))
            bar.update(batch.shape[0])
