"""Perplexity and fidelity to a reference model on the same evaluation windows."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .counts import count_params
from .progress import check_stop
from .scoring import batches


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


@torch.no_grad()
def per_token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p) per position: (..., V) fp32 logits → (...)."""
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, reference: nn.Module | None = None, *, batch_size: int = 4,
             progress: bool = True, stop: Callable[[], bool] | None = None) -> EvalResult:
    """windows (K, T) token ids. Perplexity over the K·(T−1) next-token predictions of
    non-overlapping windows; with a reference, mean per-token KL(p_ref ‖ p_model), top-1 agreement
    and top-10 overlap over all K·T positions."""
    model.eval()
    device = next(model.parameters()).device
    nll_sum, nll_count = 0.0, 0
    kl_sum = agree = overlap = ent_sum = ref_ent_sum = 0.0
    positions = 0
    for batch in tqdm(batches(windows, batch_size), desc="evaluating", unit="batch", disable=not progress):
        check_stop(stop, "Evaluation was stopped.")
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()  # (B, T, V)
        logp = F.log_softmax(logits, dim=-1)
        nll = -logp[:, :-1].gather(-1, batch[:, 1:, None]).squeeze(-1)  # (B, T-1)
        nll_sum += nll.double().sum().item()
        nll_count += nll.numel()
        ent_sum += -(logp.exp() * logp).sum(-1).double().sum().item()
        positions += batch.numel()
        if reference is not None:
            ref_logits = reference(input_ids=batch.to(next(reference.parameters()).device), use_cache=False).logits
            ref_logits = ref_logits.float().to(device)
            ref_logp = F.log_softmax(ref_logits, dim=-1)
            kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum(-1).double().sum().item()
            ref_ent_sum += -(ref_logp.exp() * ref_logp).sum(-1).double().sum().item()
            agree += (ref_logits.argmax(-1) == logits.argmax(-1)).double().sum().item()
            ref_top = ref_logits.topk(10, dim=-1).indices  # (B, T, 10)
            top = logits.topk(10, dim=-1).indices
            overlap += (ref_top[..., :, None] == top[..., None, :]).any(-1).double().sum().item() / 10.0
    counts = count_params(model)
    has_ref = reference is not None
    mean_entropy = ent_sum / positions
    return EvalResult(
        perplexity=math.exp(nll_sum / nll_count),
        kl_to_reference=kl_sum / positions if has_ref else None,
        top1_agreement=agree / positions if has_ref else None,
        top10_overlap=overlap / positions if has_ref else None,
        entropy=mean_entropy,
        entropy_shift=mean_entropy - ref_ent_sum / positions if has_ref else None,
        params=counts["params"],
        mlp_params=counts["mlp_params"],
        windows=int(windows.shape[0]),
        seq_len=int(windows.shape[1]),
        tokens=int(windows.numel()),
    )
