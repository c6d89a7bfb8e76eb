"""Forward helpers every model-running module shares: frozen weights, hook lifetimes, batches,
the decoder stack without its head, and the LM head with soft-capping; plus the logit chunk size.

Shapes: windows (N, T) long; hidden states (B, T, H); logits (..., V).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from core import metrics

# Rows of (rows, vocab) fp32 logits materialised at once where a chunk's temporaries are kept for a backward:
# ~32 MiB (cache-friendly; measured faster than 256 MiB). Two budgets stay because a gradient-carrying chunk
# keeps about four fp32 (rows, V) copies until its backward (core.models.placement counts 4 × this), while a
# no-grad metric chunk (core.metrics.CHUNK_BYTES, 64 MiB) frees its temporaries before the next; one function
# (core.metrics.row_chunks / rows_per_chunk) turns either budget into rows.
LOGIT_CHUNK_BYTES = 32 * 2**20


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
    """Rows per chunk of gradient-carrying fp32 logits: ``metrics.rows_per_chunk`` at ``LOGIT_CHUNK_BYTES``."""
    return metrics.rows_per_chunk(vocab_size, LOGIT_CHUNK_BYTES)


def base_forward(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Run the decoder stack only: (B, T) ids → last hidden states (B, T, H)."""
    out = model.model(input_ids=input_ids, use_cache=False)
    return out.last_hidden_state
