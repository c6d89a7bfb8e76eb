"""Perplexity and fidelity to a reference model on the same evaluation windows.

The maths per position lives in ``core.metrics``; a ``Reference`` computes a dense model's
distributions once so several variants are compared without re-running it."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from core import metrics
from core.models.counts import count_params
from core.models.forward import batches
from core.progress import check_stop


@dataclass
class EvalResult:
    """Metrics over ``windows`` × ``seq_len`` evaluation tokens. KL in nats per token."""

    perplexity: float
    kl_to_reference: float | None
    top1_agreement: float | None
    top10_overlap: float | None
    entropy: float  # mean next-token entropy of this model (nats)
    entropy_shift: float | None  # entropy − reference entropy
    params: int
    mlp_params: int
    windows: int
    seq_len: int
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


# A reference keeps its fp32 log-probabilities in memory up to this many bytes (about 200 MB for
# 8 × 128 SmolLM2 positions, 1 GiB for 8 × 128 Gemma-3 positions); batches beyond it are recomputed.
REFERENCE_BUDGET_BYTES = 1 << 30


@dataclass
class ReferenceBatch:
    """The reference model on one batch of windows, flattened to R = B·T positions."""

    logp: torch.Tensor  # (R, V) fp32 log-probabilities
    argmax: torch.Tensor  # (R,) most likely token
    top10: torch.Tensor  # (R, 10) ten most likely tokens


class Reference:
    """A reference model's next-token distributions on fixed windows, computed once per batch.

    Compare several models with one dense model without running it again for each:
    ``ref = Reference(dense, windows, batch_size)`` then ``evaluate(variant, windows, ref)`` for each
    variant; ``evaluate_reference(ref)`` gives the dense model's own metrics from the same pass.
    Batches are computed on first use and kept while the fp32 log-probabilities fit
    ``budget_bytes`` (a later batch is recomputed from the model when needed), so the results are
    exactly those of passing the model itself."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 4, *,
                 budget_bytes: int = REFERENCE_BUDGET_BYTES) -> None:
        self.model, self.windows, self.batch_size, self.budget_bytes = model, windows, int(batch_size), budget_bytes
        self._cache: dict[int, ReferenceBatch] = {}
        self.cached_bytes = 0

    def check(self, windows: torch.Tensor, batch_size: int) -> None:
        """The reference must cover exactly these windows, in the same batches."""
        if int(batch_size) != self.batch_size or windows.shape != self.windows.shape or not torch.equal(
                windows, self.windows):
            raise ValueError("This Reference was computed on other windows or another batch size.")

    @torch.no_grad()
    def batch(self, index: int) -> ReferenceBatch:
        """The reference on batch ``index`` of ``batches(windows, batch_size)``."""
        if index in self._cache:
            return self._cache[index]
        ids = self.windows[index * self.batch_size:(index + 1) * self.batch_size]
        self.model.eval()
        logits = self.model(input_ids=ids.to(next(self.model.parameters()).device), use_cache=False).logits
        logits = logits.flatten(0, 1)  # (R, V)
        logp = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        argmax = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        top10 = torch.empty(logits.shape[0], 10, dtype=torch.long, device=logits.device)
        for rows in metrics.row_chunks(logits.shape[0], logits.shape[-1]):
            chunk = logits[rows].float()
            logp[rows] = metrics.log_probs(chunk)
            argmax[rows] = chunk.argmax(-1)
            top10[rows] = chunk.topk(10, dim=-1).indices
        ref = ReferenceBatch(logp, argmax, top10)
        size = logp.numel() * logp.element_size()
        if self.cached_bytes + size <= self.budget_bytes:
            self._cache[index] = ref
            self.cached_bytes += size
        return ref


class _Sums:
    """Running double-precision sums of the per-position metrics."""

    def __init__(self) -> None:
        self.nll = self.kl = self.agree = self.overlap = self.entropy = self.ref_entropy = 0.0
        self.nll_count = self.positions = 0

    def add(self, logits_or_logp: torch.Tensor, batch: torch.Tensor, ref: ReferenceBatch | None,
            is_logp: bool = False) -> None:
        """logits (B, T, V) in any dtype (or fp32 log-probs with ``is_logp``), batch (B, T) ids."""
        rows_all = logits_or_logp.flatten(0, 1)  # (R, V)
        targets = torch.full_like(batch, -1)
        targets[:, :-1] = batch[:, 1:]
        targets = targets.flatten().to(rows_all.device)  # (R,), -1 where no next token
        for rows in metrics.row_chunks(rows_all.shape[0], rows_all.shape[-1]):
            chunk = rows_all[rows]
            logp = chunk if is_logp else metrics.log_probs(chunk)
            has_target = targets[rows] >= 0
            nll = metrics.nll(logp[has_target], targets[rows][has_target])
            self.nll += nll.double().sum().item()
            self.nll_count += nll.numel()
            self.entropy += metrics.entropy(logp).double().sum().item()
            if ref is not None:
                ref_logp = ref.logp[rows].to(logp.device)
                self.kl += metrics.kl(ref_logp, logp).double().sum().item()
                self.ref_entropy += metrics.entropy(ref_logp).double().sum().item()
                scores = logp if is_logp else chunk.float()
                self.agree += (ref.argmax[rows].to(logp.device) == scores.argmax(-1)).double().sum().item()
                top = scores.topk(10, dim=-1).indices
                self.overlap += metrics.topk_overlap(ref.top10[rows].to(logp.device), top).sum().item()
        self.positions += batch.numel()

    def result(self, model: nn.Module, windows: torch.Tensor, has_ref: bool) -> EvalResult:
        counts = count_params(model)
        mean_entropy = self.entropy / self.positions
        return EvalResult(
            perplexity=math.exp(self.nll / self.nll_count),
            kl_to_reference=self.kl / self.positions if has_ref else None,
            top1_agreement=self.agree / self.positions if has_ref else None,
            top10_overlap=self.overlap / self.positions if has_ref else None,
            entropy=mean_entropy,
            entropy_shift=mean_entropy - self.ref_entropy / self.positions if has_ref else None,
            params=counts["params"],
            mlp_params=counts["mlp_params"],
            windows=int(windows.shape[0]),
            seq_len=int(windows.shape[1]),
            tokens=int(windows.numel()),
        )


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, reference: nn.Module | Reference | None = None, *,
             batch_size: int = 4, progress: bool = True, stop: Callable[[], bool] | None = None) -> EvalResult:
    """windows (K, T) token ids. Perplexity over the K·(T−1) next-token predictions of
    non-overlapping windows; with a reference (a model, or a ``Reference`` computed once on the same
    windows and batch size), mean per-token KL(p_ref ‖ p_model), top-1 agreement and top-10 overlap
    over all K·T positions."""
    if isinstance(reference, nn.Module):
        reference = Reference(reference, windows, batch_size, budget_bytes=0)  # one batch at a time
    elif reference is not None:
        reference.check(windows, batch_size)
    model.eval()
    device = next(model.parameters()).device
    sums = _Sums()
    for index, batch in enumerate(tqdm(batches(windows, batch_size), desc="evaluating", unit="batch",
                                       disable=not progress)):
        check_stop(stop, "Evaluation was stopped.")
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
        sums.add(logits, batch, reference.batch(index) if reference is not None else None)
    return sums.result(model, windows, reference is not None)


@torch.no_grad()
def evaluate_reference(reference: Reference, *, progress: bool = True,
                       stop: Callable[[], bool] | None = None) -> EvalResult:
    """The reference model's own metrics (as ``evaluate(reference.model, windows)``) from its cached pass."""
    sums = _Sums()
    count = math.ceil(reference.windows.shape[0] / reference.batch_size)
    for index in tqdm(range(count), desc="evaluating", unit="batch", disable=not progress):
        check_stop(stop, "Evaluation was stopped.")
        ref = reference.batch(index)
        ids = reference.windows[index * reference.batch_size:(index + 1) * reference.batch_size]
        sums.add(ref.logp.view(*ids.shape, -1), ids.to(ref.logp.device), None, is_logp=True)
    return sums.result(reference.model, reference.windows, False)
