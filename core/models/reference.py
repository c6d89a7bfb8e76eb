"""The dense reference, once: a model's next-token distributions on fixed windows, computed once per
batch and compared with other models' logits in row chunks.

One memory policy for everything that compares a model with a dense (or teacher) model — evaluation
(``core.measure.evaluate``), the adaptive width search (``core.prune.adaptive``) and the training
loop's held-out KL (``core.train.loop``): per batch of windows, the reference's fp32 log-probabilities
(R = B·T rows × V) are computed on first use and kept while their bytes fit ``budget_bytes``; a batch
beyond the budget is recomputed from the model when asked for again, so the numbers are the same
whatever the budget. KL and entropy run in the row chunks of ``core.metrics.row_chunks``, so at most
one chunk of the compared model's fp32 log-probabilities exists at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from core import metrics
from core.models.forward import lm_logits

# Cached fp32 log-probabilities per Reference (about 200 MB for 8 × 128 SmolLM2 positions, 1 GiB for
# 8 × 128 Gemma-3 positions); batches beyond it are recomputed.
REFERENCE_BUDGET_BYTES = 1 << 30

LogitsOf = Callable[[slice], torch.Tensor]  # a slice of the R rows → their logits (r, V), any float dtype


def row_sum(rows: int, vocab_size: int, per_row: Callable[[slice], torch.Tensor]) -> float:
    """Σ over ``rows`` of the per-position values ``per_row(chunk)`` → (r,), chunk by chunk
    (``metrics.row_chunks``), summed in fp64."""
    return sum((float(per_row(chunk).double().sum()) for chunk in metrics.row_chunks(rows, vocab_size)), 0.0)


def entropy_sum(logits_of: LogitsOf, rows: int, vocab_size: int) -> float:
    """Σ over ``rows`` positions of the next-token entropy (nats) of ``logits_of(chunk)`` (r, V)."""
    return row_sum(rows, vocab_size, lambda chunk: metrics.entropy(metrics.log_probs(logits_of(chunk))))


def head_logits(model: nn.Module, hidden: torch.Tensor) -> LogitsOf:
    """The LM head (with soft-capping) on final hidden states (R, H), asked for by rows → (r, V)."""
    def logits_of(rows: slice) -> torch.Tensor:
        return lm_logits(model, hidden[rows])  # (r, V)
    return logits_of


@dataclass
class ReferenceBatch:
    """The reference model on one batch of windows, flattened to R = B·T positions."""

    logp: torch.Tensor  # (R, V) fp32 log-probabilities
    argmax: torch.Tensor  # (R,) most likely token
    top10: torch.Tensor  # (R, 10) ten most likely tokens

    @property
    def nbytes(self) -> int:
        """Bytes of the fp32 log-probabilities (what the budget counts)."""
        return self.logp.numel() * self.logp.element_size()

    def kl_sum(self, logits_of: LogitsOf) -> float:
        """Σ over the R positions of KL(p_ref ‖ p) in nats, p = softmax(``logits_of(chunk)``) (r, V);
        the compared logits are asked for one row chunk at a time."""
        rows, vocab = self.logp.shape

        def per_row(chunk: slice) -> torch.Tensor:
            logp = metrics.log_probs(logits_of(chunk))  # (r, V) fp32
            return metrics.kl(self.logp[chunk].to(logp.device), logp)  # (r,)

        return row_sum(rows, vocab, per_row)

    def entropy_sum(self) -> float:
        """Σ over the R positions of the reference's own next-token entropy (nats)."""
        rows, vocab = self.logp.shape
        return row_sum(rows, vocab, lambda chunk: metrics.entropy(self.logp[chunk]))


class Reference:
    """A reference model's next-token distributions on fixed windows (N, T), computed once per batch.

    Compare several models with one dense model without running it again for each: batch ``index``
    of ``torch.split(windows, batch_size)`` is computed on first use (:meth:`batch`) and kept while
    the cached fp32 log-probabilities fit ``budget_bytes`` (0: nothing is kept). ``hidden_states``:
    ids (B, T) → the final hidden states (B, T, H), for a reference that is a causal LM run another
    way (e.g. the same model with its gates off); its logits are then made per row chunk through
    the LM head, never (B·T, V) at once. Without it the model's own ``forward(...).logits`` is used."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 4, *,
                 budget_bytes: int = REFERENCE_BUDGET_BYTES,
                 hidden_states: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.model, self.windows, self.batch_size, self.budget_bytes = model, windows, int(batch_size), budget_bytes
        self.hidden_states = hidden_states
        self._cache: dict[int, ReferenceBatch] = {}
        self.cached_bytes = 0

    def __len__(self) -> int:
        """Number of batches."""
        return -(-int(self.windows.shape[0]) // self.batch_size)

    def ids(self, index: int) -> torch.Tensor:
        """Batch ``index`` of the windows: (B, T) token ids (on the windows' device)."""
        return self.windows[index * self.batch_size:(index + 1) * self.batch_size]

    def check(self, windows: torch.Tensor, batch_size: int) -> None:
        """The reference must cover exactly these windows, in the same batches."""
        if int(batch_size) != self.batch_size or windows.shape != self.windows.shape or not torch.equal(
                windows, self.windows):
            raise ValueError("This Reference was computed on other windows or another batch size.")

    def _logits_of(self, ids: torch.Tensor) -> tuple[LogitsOf, int]:
        """(the reference's logits of batch ids (B, T) by rows of the R = B·T positions, V)."""
        if self.hidden_states is None:
            logits = self.model(input_ids=ids, use_cache=False).logits.flatten(0, 1)  # (R, V)
            return (lambda rows: logits[rows]), int(logits.shape[-1])
        hidden = self.hidden_states(ids).flatten(0, 1)  # (R, H)
        return head_logits(self.model, hidden), int(self.model.config.vocab_size)

    @torch.no_grad()
    def batch(self, index: int) -> ReferenceBatch:
        """The reference on batch ``index`` (cached, or computed now and kept if it fits the budget)."""
        if index in self._cache:
            return self._cache[index]
        ids = self.ids(index)
        self.model.eval()
        logits_of, vocab = self._logits_of(ids.to(next(self.model.parameters()).device))
        rows = ids.numel()
        logp = argmax = top10 = None
        for chunk in metrics.row_chunks(rows, vocab):
            logits = logits_of(chunk).float()  # (r, V)
            if logp is None:  # (R, V) fp32, (R,), (R, 10) on the model's output device
                logp = torch.empty(rows, logits.shape[-1], dtype=torch.float32, device=logits.device)
                argmax = torch.empty(rows, dtype=torch.long, device=logits.device)
                top10 = torch.empty(rows, 10, dtype=torch.long, device=logits.device)
            logp[chunk] = metrics.log_probs(logits)
            argmax[chunk] = logits.argmax(-1)
            top10[chunk] = logits.topk(10, dim=-1).indices
        ref = ReferenceBatch(logp, argmax, top10)
        if self.cached_bytes + ref.nbytes <= self.budget_bytes:
            self._cache[index] = ref
            self.cached_bytes += ref.nbytes
        return ref
