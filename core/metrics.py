"""Distribution maths in one place: log-probabilities, entropy, KL, next-token NLL and top-k agreement.

Every function takes fp32-able tensors with the vocabulary last, ``(..., V)``, and returns one value
per position ``(...)``; none is decorated with ``no_grad``, so training losses can use them too.
``row_chunks`` splits (R, V) rows so that only a bounded slab of fp32 temporaries exists at once
(a (B·T, V) fp32 tensor is 1 GiB for 1024 positions of Gemma's 262k vocabulary); it is the one
chunking helper (``core.models.forward.chunk_rows`` is it with the training budget).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

# fp32 bytes of one chunk of rows for no-grad metrics: big enough for few kernel launches, small next
# to the logits.
CHUNK_BYTES = 64 * 2**20


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log softmax in fp32: (..., V) → (..., V)."""
    return F.log_softmax(logits.float(), dim=-1)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats from log-probabilities: (..., V) → (...)."""
    return -(logp.exp() * logp).sum(-1)


def kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p) in nats from log-probabilities: (..., V), (..., V) → (...)."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def cross(ref_probs: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Σ_v p_ref · log p: (..., V), (..., V) → (...); KL(p_ref ‖ p) = −H(p_ref) − cross(p_ref, log p)."""
    return (ref_probs * logp).sum(-1)


def per_token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p) per position from logits: (..., V) → (...)."""
    return kl(log_probs(ref_logits), log_probs(logits))


def nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log p(target) per position: (..., V), (...) long → (...)."""
    return -logp.gather(-1, targets[..., None]).squeeze(-1)


def topk_overlap(ref_top: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Fraction of the reference's top-k token ids that are also in the model's top-k: (..., k) × 2 → (...)."""
    return (ref_top[..., :, None] == top[..., None, :]).any(-1).sum(-1).double() / ref_top.shape[-1]


def rows_per_chunk(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows of fp32 (rows, V) in about ``chunk_bytes`` (at least 16)."""
    return max(16, chunk_bytes // (4 * max(1, vocab_size)))


def row_chunks(rows: int, vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[slice]:
    """Slices of ``rows`` with about ``chunk_bytes`` of fp32 (rows, V) each (at least 16 rows)."""
    step = rows_per_chunk(vocab_size, chunk_bytes)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))
