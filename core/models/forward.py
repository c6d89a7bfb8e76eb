"""Forward helpers every model-running module shares: frozen weights, hook lifetimes, batches,
the decoder stack without its head, and the LM head with soft-capping; plus the logit chunk size.

Shapes: windows (N, T) long; hidden states (B, T, H); logits (..., V).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

# Rows of (rows, vocab) fp32 logits materialised at once: ~32 MiB (cache-friendly; measured faster than 256 MiB).
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
    return max(16, LOGIT_CHUNK_BYTES // (4 * vocab_size))


def base_forward(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Run the decoder stack only: (B, T) ids → last hidden states (B, T, H)."""
    out = model.model(input_ids=input_ids, use_cache=False)
    return out.last_hidden_state
