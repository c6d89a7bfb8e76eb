"""The teacher, cached once: sparse logit targets for distillation without the teacher in the loop.

For every position of the training windows the teacher's distribution ``p = softmax(z_t / τ)`` (V,) is
stored as

- its ``top_k`` most likely tokens with their exact probabilities, and
- ``tail_samples`` tokens drawn with replacement from the rest of the vocabulary in proportion to
  ``p`` (importance sampling of the tail), each with weight ``m / tail_samples`` where ``m`` is the
  tail's mass,

plus the exact entropy ``H(p)``. The sparse target ``q`` (weights scattered onto their ids, duplicates
added) sums to 1 and its expectation over the draws is ``p`` itself, so the cross-entropy
``−Σ q log softmax(z_s/τ)`` and its gradient ``softmax(z_s/τ) − q`` are unbiased for the dense ones;
``CE − H(p)`` is an unbiased estimate of ``KL(p ‖ p_s)``. A plain top-k truncation (renormalised or
not) is biased; the sampled tail removes the bias at the price of some variance (the 2025
sparse-logit-sampling KD work, "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs").

Storage per position: ``(top_k + tail_samples)`` int32 ids and fp32 weights, and one fp32 entropy
(32 + 32 slots: 516 bytes, against 4·V bytes of dense logits: 197 kB for a 49k vocabulary). A cache is
built by one teacher forward pass over its windows and kept on disk (safetensors) under a key of the
teacher, the windows and the settings, so later runs against the same teacher — other ratios, other
criteria, a second recovery — skip the teacher entirely.

    cache = build_sparse_targets(teacher, windows, TeacherOptions(logits="cached"), tau=1.0)
    loss = sparse_distill_loss(student_logits, cache.ids[i], cache.weights[i], cache.entropy[i], targets)
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from core import metrics
from core.errors import HFPruneError
from core.files import write_safetensors
from core.models.forward import LOGIT_CHUNK_BYTES, base_forward, lm_logits
from core.options import Options, knob
from core.progress import check_stop

TEACHER_LOGITS = ("live", "cached")
CACHE_FORMAT = 1


class TeacherCacheError(HFPruneError):
    """A teacher-cache setting or file that cannot work."""


@dataclass
class TeacherOptions(Options):
    """Where the teacher's logits come from during distillation: ``live`` (the teacher runs on every
    batch) or ``cached`` (one teacher pass over ``windows`` training windows before training, stored as
    top-``top_k`` + ``tail_samples`` sampled tail tokens per position; each step then runs only the
    student)."""

    error = TeacherCacheError
    cli_prefix = "teacher-"

    logits: str = knob("live", "live: the teacher runs on every training batch; cached: its logits on the training "
                       "windows are computed once (top-k + an unbiased sample of the tail) and each step runs only "
                       "the student", choices=TEACHER_LOGITS)
    top_k: int = knob(32, "cached: most likely teacher tokens stored exactly per position", low=1, ui_high=256)
    tail_samples: int = knob(32, "cached: tail tokens sampled per position (importance weights keep the KD "
                             "gradient unbiased; 0 = biased top-k only)", low=0, ui_high=256)
    windows: int = knob(256, "cached: training windows whose teacher logits are cached (training cycles over them)",
                        low=1, ui_high=4096, step=16)
    seed: int = knob(0, "cached: seed of the tail draws", low=0)

    @property
    def cached(self) -> bool:
        return self.logits == "cached"


@dataclass
class SparseTargets:
    """The teacher on ``windows`` (N, T), sparsely: ``ids`` (N, T, S) int32 and ``weights`` (N, T, S) fp32
    with S = top_k + tail_samples (top-k first), ``entropy`` (N, T) fp32 exact H(p) at ``tau``."""

    windows: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    entropy: torch.Tensor
    tau: float
    top_k: int
    tail_samples: int
    seconds: float = 0.0  # what building it cost (wall seconds of the teacher pass)
    cpu_seconds: float = 0.0  # process CPU seconds of the teacher pass
    loaded_from: str | None = None  # the file it was read from, when it was not built in this process

    @property
    def tokens(self) -> int:
        return int(self.windows.numel())

    def tail_mass(self) -> float:
        """Mean teacher probability outside the top-k (what the sampled tail stands for)."""
        return float(self.weights[..., self.top_k:].sum(-1).mean()) if self.tail_samples else \
            float(1 - self.weights.sum(-1).mean())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ids, self.weights, self.entropy))

    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        meta = {"format": str(CACHE_FORMAT), "tau": repr(self.tau), "top_k": str(self.top_k),
                "tail_samples": str(self.tail_samples), "seconds": repr(self.seconds),
                "cpu_seconds": repr(self.cpu_seconds), "extra": json.dumps(metadata or {})}
        return write_safetensors(path, {"windows": self.windows, "ids": self.ids, "weights": self.weights,
                                        "entropy": self.entropy}, meta)

    @classmethod
    def load(cls, path: str | Path) -> SparseTargets:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in ("windows", "ids", "weights", "entropy")}
        except Exception as exc:  # a missing, truncated or foreign file: one sentence
            raise TeacherCacheError(f"Could not read the teacher cache {path}: {exc}") from exc
        if meta.get("format") != str(CACHE_FORMAT):
            raise TeacherCacheError(f"{path} is not a teacher cache of format {CACHE_FORMAT}.")
        return cls(tensors["windows"], tensors["ids"], tensors["weights"], tensors["entropy"], float(meta["tau"]),
                   int(meta["top_k"]), int(meta["tail_samples"]), float(meta.get("seconds", 0.0)),
                   float(meta.get("cpu_seconds", 0.0)), loaded_from=str(path))


def sparse_rows(logits: torch.Tensor, tau: float, top_k: int, tail_samples: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher logits (R, V) → (ids (R, S) int64, weights (R, S) fp32, entropy (R,) fp32), S = k + n.

    Top-k ids carry their probabilities; the n tail draws (with replacement, ∝ p outside the top-k)
    carry m/n each, m the row's tail mass, so the weights of a row sum to 1 and E[scatter(weights)] = p.
    A row whose tail is empty (all mass in the top-k) gets zero-weight tail slots on the top-1 id."""
    logp = F.log_softmax(logits.float() / tau, dim=-1)  # (R, V)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)  # (R,)
    top_p, top_ids = p.topk(min(top_k, p.shape[-1]), dim=-1)  # (R, k)
    if tail_samples == 0:
        return top_ids, top_p, entropy
    tail = p.scatter(1, top_ids, 0.0)  # (R, V): the distribution outside the top-k, unnormalised
    mass = tail.sum(-1)  # (R,)
    empty = mass <= 0
    if bool(empty.any()):
        tail[empty, top_ids[empty, 0]] = 1.0  # any valid draw; its weight is 0 below
    draws = torch.multinomial(tail, tail_samples, replacement=True, generator=generator)  # (R, n)
    weights = (mass.clamp_min(0) / tail_samples).unsqueeze(1).expand(-1, tail_samples)  # (R, n)
    return torch.cat([top_ids, draws], 1), torch.cat([top_p, weights], 1), entropy


@torch.no_grad()
def build_sparse_targets(teacher: nn.Module, windows: torch.Tensor, options: TeacherOptions, *, tau: float = 1.0,
                         batch_size: int = 4, progress: bool = False,
                         stop: Callable[[], bool] | None = None) -> SparseTargets:
    """One teacher pass over ``windows`` (N, T) → :class:`SparseTargets` (on the CPU). Stop-aware between
    batches; the draws are seeded by ``options.seed``."""
    teacher.eval()
    device = next(teacher.parameters()).device
    generator = torch.Generator(device=device).manual_seed(options.seed)
    n, t = windows.shape
    slots = min(options.top_k, int(teacher.config.vocab_size)) + options.tail_samples
    ids = torch.empty(n, t, slots, dtype=torch.int32)
    weights = torch.empty(n, t, slots, dtype=torch.float32)
    entropy = torch.empty(n, t, dtype=torch.float32)
    start, cpu = time.perf_counter(), time.process_time()
    bar = tqdm(total=n, desc="teacher cache", unit="window", disable=not progress)
    for first in range(0, n, batch_size):
        check_stop(stop, "Building the teacher cache was stopped; nothing was trained.")
        batch = windows[first:first + batch_size].to(device)
        hidden = base_forward(teacher, batch).flatten(0, 1)  # (B·T, H)
        rows = hidden.shape[0]
        flat_ids = torch.empty(rows, slots, dtype=torch.int32)
        flat_w = torch.empty(rows, slots)
        flat_h = torch.empty(rows)
        for chunk in metrics.row_chunks(rows, int(teacher.config.vocab_size), LOGIT_CHUNK_BYTES):
            i, w, h = sparse_rows(lm_logits(teacher, hidden[chunk]), tau, options.top_k, options.tail_samples,
                                  generator)
            flat_ids[chunk], flat_w[chunk], flat_h[chunk] = i.int().cpu(), w.cpu(), h.cpu()
        b = batch.shape[0]
        ids[first:first + b] = flat_ids.view(b, t, slots)
        weights[first:first + b] = flat_w.view(b, t, slots)
        entropy[first:first + b] = flat_h.view(b, t)
        bar.update(b)
    bar.close()
    return SparseTargets(windows.cpu().clone(), ids, weights, entropy, float(tau), min(options.top_k, slots),
                         options.tail_samples, time.perf_counter() - start, time.process_time() - cpu)


def cache_key(teacher_spec: str, windows: torch.Tensor, options: TeacherOptions, tau: float) -> str:
    """A file name for a cache of ``teacher_spec`` on exactly these windows with these settings."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"teacher": teacher_spec, "tau": tau, "top_k": options.top_k,
                              "tail": options.tail_samples, "seed": options.seed, "format": CACHE_FORMAT},
                             sort_keys=True).encode())
    digest.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def cached_sparse_targets(teacher: nn.Module, teacher_spec: str, windows: torch.Tensor, options: TeacherOptions,
                          folder: Path, *, tau: float = 1.0, batch_size: int = 4, progress: bool = False,
                          stop: Callable[[], bool] | None = None) -> SparseTargets:
    """The cache for these windows from ``folder`` when one was built before, else built now and stored."""
    path = Path(folder) / f"{cache_key(teacher_spec, windows, options, tau)}.safetensors"
    if path.exists():
        try:
            targets = SparseTargets.load(path)
            if torch.equal(targets.windows, windows.cpu()):
                return targets
        except TeacherCacheError:
            pass  # an unreadable file is rebuilt below
    targets = build_sparse_targets(teacher, windows, options, tau=tau, batch_size=batch_size, progress=progress,
                                   stop=stop)
    path.parent.mkdir(parents=True, exist_ok=True)
    targets.save(path, {"teacher": teacher_spec})
    return targets


class _SparseDistillCE(torch.autograd.Function):
    """Per row: ``α·τ²·(−Σ_s w_s log softmax(z/τ)[id_s] − H) + (1−α)·CE(z, y)``.

    d/dz = α·τ·(softmax(z/τ) − scatter(w)) + (1−α)·(softmax(z) − onehot(y)); keeps one (R, V) tensor
    (two when τ ≠ 1 and α < 1)."""

    @staticmethod
    def forward(ctx, logits, ids, weights, entropy, targets, tau: float, alpha: float):  # (R, V), (R, S) ×2, (R,) ×2
        loss = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
        p_tau = p_one = None
        if alpha > 0:
            log_s = F.log_softmax(logits / tau, dim=-1)  # (R, V)
            cross = -(weights * log_s.gather(1, ids)).sum(-1)  # (R,)
            loss = loss + alpha * tau * tau * (cross - entropy)
            p_tau = log_s.exp_()
        valid = targets >= 0
        safe = targets.clamp_min(0)
        if alpha < 1:
            lse = torch.logsumexp(logits, dim=-1)
            loss = loss + (1 - alpha) * (lse - logits.gather(1, safe.unsqueeze(1)).squeeze(1)) * valid
            p_one = p_tau if (p_tau is not None and tau == 1.0) else torch.exp(logits - lse.unsqueeze(-1))
        ctx.save_for_backward(p_tau, p_one, ids, weights, safe, valid)
        ctx.tau, ctx.alpha = tau, alpha
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        p_tau, p_one, ids, weights, safe, valid = ctx.saved_tensors
        tau, alpha = ctx.tau, ctx.alpha
        grad = None
        if alpha > 0:
            grad = p_tau.clone() if (alpha < 1 and p_one is p_tau) else p_tau
            grad.scatter_add_(1, ids, -weights)
            grad.mul_(alpha * tau)
        if alpha < 1:
            ce = p_one.clone()
            ce.scatter_add_(1, safe.unsqueeze(1), torch.full_like(safe, -1, dtype=p_one.dtype).unsqueeze(1))
            ce.mul_(((1 - alpha) * valid).unsqueeze(-1))
            grad = ce if grad is None else grad.add_(ce)
        return grad.mul_(grad_loss.unsqueeze(-1)), None, None, None, None, None, None


def sparse_distill_loss(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, entropy: torch.Tensor,
                        targets: torch.Tensor, tau: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """Per-row ``α·τ²·KL̂(p_t ‖ p_s) + (1−α)·CE``: logits (R, V) fp32, the teacher's sparse target ids /
    weights (R, S) and entropy (R,), next-token targets (R,) (−100 = none) → (R,), differentiable in
    ``logits``. Its expectation over the cache's tail draws is the dense :func:`core.train.loop.distill_loss`."""
    return _SparseDistillCE.apply(logits, ids.long(), weights.to(logits.dtype), entropy.to(logits.dtype), targets,
                                  float(tau), float(alpha))
