"""Perplexity and fidelity to a reference model on the same evaluation windows.

The maths per position lives in ``core.metrics``; a ``Reference`` (``core.models.reference``, the one
home of the dense pass, re-exported here) computes a dense model's distributions once so several
variants are compared without re-running it."""
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
from core.models.reference import REFERENCE_BUDGET_BYTES, Reference, ReferenceBatch
from core.progress import check_stop

__all__ = ["QUICK_EVAL", "REFERENCE_BUDGET_BYTES", "EvalResult", "Reference", "ReferenceBatch", "evaluate",
           "evaluate_reference"]

# held-out windows × tokens per window of the quick quality check: the dashboard's "quality at a glance"
# after Prune and the HTML report of a prune run (a few seconds on a CPU); perplexity on other windows differs
QUICK_EVAL = (4, 64)


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
    for index in tqdm(range(len(reference)), desc="evaluating", unit="batch", disable=not progress):
        check_stop(stop, "Evaluation was stopped.")
        ref = reference.batch(index)
        ids = reference.ids(index)
        sums.add(ref.logp.view(*ids.shape, -1), ids.to(ref.logp.device), None, is_logp=True)
    return sums.result(reference.model, reference.windows, False)
