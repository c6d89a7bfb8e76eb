"""AMP-style adaptive per-layer widths: binary-search each layer's smallest width whose fidelity-loss
increase stays within a tolerance, and bisect the tolerance to hit a global pruning ratio.

For layers from last to first, neurons are ordered by a criterion's scores and the search asks
"how few of the top-scoring neurons can this layer keep before the fidelity loss on a held-out
calibration slice rises by more than ``tol``?" (6–8 halvings of the width interval). An outer
bisection on ``tol`` (geometric) finds the tolerance whose widths keep the requested fraction of all
MLP neurons; a last small correction (interpolated on the traces, no extra forwards) lands on the
target exactly.

Nothing is re-sliced during the search: a forward pre-hook on each ``down_proj`` multiplies the
activations by a 0/1 mask. Layers before the one being searched are still dense, so their output is
cached once and the forward restarts at that layer. The held-out windows must come from the
calibration split and be disjoint from the scoring windows (see :func:`heldout_windows`), never from
the evaluation split.

Fidelity: ``kl`` = mean per-token KL(p_dense ‖ p_masked); ``entropy`` = mean next-token entropy of
the masked model (AMP's loss). The search sees the model only through a :class:`MaskedModel`
(per-layer masks + ``value(start)``): :class:`MaskedEvaluator` is the causal-LM one; encoders plug
in their own fidelity (``core.vision.EmbeddingEntropyEvaluator``: AMP's similarity entropy). Modes:
``sequential`` (AMP: later layers stay pruned at their chosen widths while an earlier layer is
searched; the increase is measured against that state) and
``independent`` (each layer alone against the dense model; cheaper, results reusable across ratios).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from core.data.text import _check_lengths, calibration_starts, token_stream, window_body, with_bos
from core.errors import DataError, PruneConfigError
from core.models.adapters import blocks, mlp_handles
from core.models.forward import base_forward, batches, hooks
from core.models.reference import REFERENCE_BUDGET_BYTES, Reference, entropy_sum, head_logits
from core.progress import check_stop
from core.prune.allocate import check_ratio
from core.prune.compensate import compensated_down

FIDELITIES = ("kl", "entropy")
MODES = ("sequential", "independent")


@dataclass
class LayerTrace:
    """The binary search of one layer at the final tolerance."""

    layer: int
    full_width: int
    tried: list[tuple[int, float]]  # (width tried, loss increase), in the order tried
    chosen: int  # width picked by the search (before the final correction)
    width: int  # final width (after the correction)


@dataclass
class AdaptiveResult:
    """Per-layer widths chosen by the adaptive search, with its traces."""

    widths: list[int]
    traces: list[LayerTrace]
    tolerance: float
    target_ratio: float
    achieved_ratio: float
    search_ratio: float  # ratio the tolerance alone reached, before the exact correction
    fidelity: str
    mode: str
    evaluations: int  # masked forwards actually run (memoised repeats excluded)
    seconds: float
    heldout_tokens: int
    outer: list[dict] = field(default_factory=list)  # [{"tolerance", "kept", "ratio"}] per outer step

    def to_dict(self) -> dict:
        return asdict(self)


def heldout_windows(tokenizer, source: str = "wiki", samples: int = 4, seq_len: int = 64, *, seed: int = 0,
                    score_samples: int = 0, score_seq_len: int = 128, max_length: int | None = None) -> torch.Tensor:
    """``samples`` windows from the *calibration* split that do not overlap the scoring windows that
    :func:`core.data.calibration_windows` draws with (``score_samples``, ``score_seq_len``, ``seed``).
    Chosen with a different generator, so the slice is held out from scoring and from evaluation."""
    _check_lengths(samples, seq_len, max_length, "held-out samples")
    stream = token_stream(tokenizer, source, "calibration")
    used = torch.zeros(len(stream), dtype=torch.bool)
    if score_samples > 0:
        _bos, score_body = window_body(tokenizer, score_seq_len)
        for s in calibration_starts(len(stream), score_samples, score_body, seed):
            used[s:s + score_body] = True
    bos, body = window_body(tokenizer, seq_len)
    slots = len(stream) // body
    free = [i for i in range(slots) if not used[i * body:(i + 1) * body].any()]
    if len(free) < samples:
        raise DataError(f"The calibration text has room for only {len(free)} held-out windows of {seq_len} tokens "
                        f"outside the scoring windows; {samples} were asked for.")
    generator = torch.Generator().manual_seed(seed + 1_000_003)
    pick = torch.randperm(len(free), generator=generator)[:samples].sort().values.tolist()
    return with_bos(torch.stack([stream[free[i] * body:(free[i] + 1) * body] for i in pick]), bos)


class _Cached(nn.Module):
    """Stands in for decoder layer 0: returns the cached input of the first layer that is run."""

    def __init__(self):
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        return self.value


class _Skip(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class MaskedModel:
    """What :func:`adaptive_search` needs from a model: 0/1 neuron masks at every down projection's
    input (top-``keep`` by score via :meth:`width_mask`), and a fidelity loss under the current masks.

    A subclass sets ``fidelity`` (its name), ``dense_value`` (the loss with no mask) and ``tokens``
    (held-out size, for the report), and implements :meth:`value`. Blocks before ``start`` are dense
    while layer ``start`` is searched, so a subclass may cache their output (see :meth:`_start_at`)."""

    fidelity: str = ""
    dense_value: float = 0.0
    tokens: int = 0

    def __init__(self, model: nn.Module, scores: list[torch.Tensor]):
        self.model = model
        self.handles = mlp_handles(model)
        if [int(s.numel()) for s in scores] != [h.width for h in self.handles]:
            raise PruneConfigError("The scores do not match this model's MLP widths.")
        self.device = next(model.parameters()).device
        self.orders = [torch.argsort(s.float(), descending=True, stable=True) for s in scores]
        self.masks: list[torch.Tensor | None] = [None] * len(self.handles)
        self.evaluations = 0

    def value(self, start: int = 0) -> float:
        """The fidelity loss with the current masks (lower is better); layers before ``start`` are dense."""
        raise NotImplementedError

    def _check_start(self, start: int) -> None:
        if any(m is not None for m in self.masks[:start]):
            raise RuntimeError("Layers before the restart point must be dense.")

    def width_mask(self, layer: int, keep: int) -> torch.Tensor | None:
        width = self.handles[layer].width
        if keep >= width:
            return None
        mask = torch.zeros(width, dtype=torch.float32, device=self.device)
        mask[self.orders[layer][:keep].to(self.device)] = 1.0
        return mask

    @contextlib.contextmanager
    def _mask_hooks(self) -> Iterator[None]:
        def make(layer: int):
            def pre_hook(_module, args):
                mask = self.masks[layer]
                if mask is None:
                    return None
                return (args[0] * mask.to(args[0].dtype),) + tuple(args[1:])
            return pre_hook

        with hooks([h.down.register_forward_pre_hook(make(h.index)) for h in self.handles]):
            yield

    def _layer_inputs(self, run: Callable[[], object]) -> tuple[list[torch.Tensor], object]:
        """Run ``run()`` (a dense forward) and return (the input of every block, run's result), so
        :meth:`_start_at` can restart later forwards at any block."""
        captured: list[torch.Tensor] = []

        def grab(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured.append(hidden.detach())

        with hooks([layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in blocks(self.model)]):
            result = run()
        return captured, result

    @contextlib.contextmanager
    def _start_at(self, start: int) -> Iterator[_Cached | None]:
        """Temporarily replace blocks [0, start) by a stub that returns the cached input of ``start``."""
        if start <= 0:
            yield None
            return
        layers = blocks(self.model)
        saved = [layers[i] for i in range(start)]
        stub = _Cached()
        try:
            layers[0] = stub
            for i in range(1, start):
                layers[i] = _Skip()
            yield stub
        finally:
            for i, module in enumerate(saved):
                layers[i] = module


class MaskedEvaluator(MaskedModel):
    """Causal-LM fidelity (KL to the dense model or next-token entropy) with per-layer neuron masks,
    on fixed held-out windows. The dense pass is a :class:`core.models.reference.Reference` (its
    log-probabilities kept within ``budget_bytes``, KL in row chunks); the same pass records every
    block's input so a probe of layer l restarts at block l."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, scores: list[torch.Tensor], fidelity: str = "kl",
                 batch_size: int = 4, budget_bytes: int = REFERENCE_BUDGET_BYTES):
        if fidelity not in FIDELITIES:
            raise PruneConfigError(f"Unknown fidelity '{fidelity}'; choose one of: {', '.join(FIDELITIES)}.")
        super().__init__(model, scores)
        self.fidelity = fidelity
        self.batches = [b.to(self.device) for b in batches(windows, batch_size)]
        self.tokens = int(windows.numel())
        self.vocab_size = int(model.config.vocab_size)
        # entropy needs only the dense model's mean entropy, so nothing of its pass is kept
        self.reference = Reference(model, windows, batch_size, budget_bytes=budget_bytes if fidelity == "kl" else 0,
                                   hidden_states=lambda ids: base_forward(model, ids))
        self.layer_inputs: list[list[torch.Tensor]] = []  # [batch][layer] → (B, T, H)
        self._dense_pass()

    @torch.no_grad()
    def _dense_pass(self) -> None:
        dense_entropy = 0.0
        for index in range(len(self.reference)):
            captured, dense = self._layer_inputs(lambda index=index: self.reference.batch(index))
            self.layer_inputs.append(captured)
            if self.fidelity == "entropy":
                dense_entropy += dense.entropy_sum()
        self.dense_value = 0.0 if self.fidelity == "kl" else dense_entropy / self.tokens

    @torch.no_grad()
    def value(self, start: int = 0) -> float:
        """Mean fidelity loss per token with the current masks; layers before ``start`` must be unmasked."""
        self._check_start(start)
        self.evaluations += 1
        total = 0.0
        for index, batch in enumerate(self.batches):
            # the dense batch first, outside the masks: one beyond the budget is recomputed unmasked
            dense = self.reference.batch(index) if self.fidelity == "kl" else None
            with self._mask_hooks(), self._start_at(start) as stub:
                if stub is not None:
                    stub.value = self.layer_inputs[index][start]
                hidden = base_forward(self.model, batch).flatten(0, 1)  # (R, H); the head is never masked
            logits_of = head_logits(self.model, hidden)
            total += dense.kl_sum(logits_of) if dense is not None else \
                entropy_sum(logits_of, hidden.shape[0], self.vocab_size)
        return total / self.tokens



class RefitMaskedEvaluator(MaskedEvaluator):
    """A :class:`MaskedEvaluator` whose probes apply the least-squares refit that the ``lsq``
    compensation applies after the cut, so the search asks how much a layer loses *after* the refit.

    While layer l keeps its top-k neurons K, its ``down_proj`` weight (H, d_ff) is swapped for one whose
    K columns are the refit ``W_K + W_R G_RK (G_KK + λI)^{-1}`` (:func:`compensated_down`) and whose other
    columns are zero (the mask zeroes their inputs too). ``grams``: per layer the dense model's
    ``down_proj`` input Gram Σ a aᵀ (d_ff, d_ff) fp64 — the very statistics the refit uses afterwards, so
    they are computed once; ``damping``: its λ as a share of mean diag G_KK. One Cholesky solve per probe
    (k × k, fp64), small beside the probe's forward through the rest of the model and the head."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, scores: list[torch.Tensor], grams: list[torch.Tensor],
                 damping: float, fidelity: str = "kl", batch_size: int = 4,
                 budget_bytes: int = REFERENCE_BUDGET_BYTES):
        super().__init__(model, windows, scores, fidelity, batch_size, budget_bytes)
        if [tuple(g.shape) for g in grams] != [(h.width, h.width) for h in self.handles]:
            raise PruneConfigError("The refit statistics do not match this model's MLP widths.")
        self.grams, self.damping = grams, damping
        self.refit: list[torch.Tensor | None] = [None] * len(self.handles)  # the swapped-in weight per layer

    def width_mask(self, layer: int, keep: int) -> torch.Tensor | None:
        """The 0/1 mask of the top ``keep`` neurons; also prepares the layer's refitted weight."""
        mask = super().width_mask(layer, keep)
        self.refit[layer] = None
        if mask is not None:
            down = self.handles[layer].down.weight
            kept = self.orders[layer][:keep].sort().values  # (k,) ascending
            weight = torch.zeros_like(down)  # (H, d_ff); removed columns stay 0
            weight[:, kept.to(down.device)] = compensated_down(down, self.grams[layer], kept, self.damping)
            self.refit[layer] = weight
        return mask

    @contextlib.contextmanager
    def _mask_hooks(self) -> Iterator[None]:
        swapped: dict[int, torch.Tensor] = {}
        try:
            for h in self.handles:
                if self.masks[h.index] is not None and self.refit[h.index] is not None:
                    swapped[h.index] = h.down.weight.data
                    h.down.weight.data = self.refit[h.index]
            with super()._mask_hooks():
                yield
        finally:
            for index, weight in swapped.items():
                self.handles[index].down.weight.data = weight

# Probes (masked forwards) a search runs, relative to layers × (halvings + 1): the outer bisection on
# the tolerance re-asks most (layer, width) pairs, which independent mode memoises; sequential mode
# re-probes each layer against a new state at every outer step. Measured on SmolLM2-135M
# (benchmarks/dashboard.py); used for the progress bar and core.timing's estimate.
INDEPENDENT_REUSE = 2.0
SEQUENTIAL_OUTER = 8.0


def expected_probes(layers: int, halvings: int, mode: str = "independent") -> int:
    """About how many masked forwards :func:`adaptive_search` runs (an estimate, not a bound)."""
    factor = SEQUENTIAL_OUTER if mode == "sequential" else INDEPENDENT_REUSE
    return max(1, round(layers * (halvings + 1) * factor))


class _ProbeBar:
    """Progress over the search's masked forwards against :func:`expected_probes`; when the estimate
    runs out a fresh 'refining' bar takes over, so the shown fraction never sits at 100 %."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled, self.total = enabled, total
        self.bar = tqdm(total=total, desc="adaptive search: masked forwards", unit="probe", disable=not enabled)

    def tick(self) -> None:
        self.bar.update(1)
        if self.bar.n >= self.bar.total:
            self.total = max(8, self.total // 2)
            self.bar.close()
            self.bar = tqdm(total=self.total, desc="adaptive search: refining", unit="probe", disable=not self.enabled)

    def note(self, **postfix) -> None:
        self.bar.set_postfix(**postfix)

    def close(self) -> None:
        self.bar.close()


def _interpolate(points: dict[int, float], width: int, full: int) -> float:
    """Loss increase at ``width`` by linear interpolation of the known (width, increase) points."""
    known = sorted({**points, full: points.get(full, 0.0)}.items())
    if width in points:
        return points[width]
    below = [(k, v) for k, v in known if k < width]
    above = [(k, v) for k, v in known if k > width]
    if not below:
        k, v = above[0]
        return v * (1.0 + (k - width) / max(k, 1))  # extrapolate: grows as the width shrinks
    if not above:
        return below[-1][1]
    (k0, v0), (k1, v1) = below[-1], above[0]
    return v0 + (v1 - v0) * (width - k0) / (k1 - k0)


def _check_search(ratio: float, mode: str, halvings: int, round_to: int, min_keep: float) -> float:
    ratio = check_ratio(ratio)
    if mode not in MODES:
        raise PruneConfigError(f"Unknown adaptive mode '{mode}'; choose one of: {', '.join(MODES)}.")
    if not 1 <= halvings <= 16:
        raise PruneConfigError(f"halvings must be between 1 and 16, got {halvings}.")
    if round_to < 1:
        raise PruneConfigError(f"round_to must be a positive integer, got {round_to}.")
    if not 0.0 < min_keep <= 1.0:
        raise PruneConfigError(f"min_keep must be in (0, 1], got {min_keep}.")
    return ratio


class _LayerSearch:
    """The inner search at one tolerance: for layers last to first, the smallest width (binary search
    over ``halvings`` steps between the layer's floor and its full width) whose loss increase stays
    within ``tol``. Every masked forward is memoised on the evaluator, keyed by (layer, width, state)
    where state = the later layers' widths in sequential mode, () in independent mode."""

    def __init__(self, ev: MaskedModel, fulls: list[int], floors: list[int], *, mode: str, halvings: int,
                 round_to: int, stop: Callable[[], bool] | None, bar: _ProbeBar) -> None:
        self.ev, self.fulls, self.floors = ev, fulls, floors
        self.mode, self.halvings, self.round_to, self.stop, self.bar = mode, halvings, round_to, stop, bar
        self.memo: dict = getattr(ev, "_memo", {})
        ev._memo = self.memo

    def increase(self, layer: int, keep: int, state: tuple, base: float) -> float:
        """Loss increase when ``layer`` keeps its top ``keep`` neurons (the later layers as in ``state``)."""
        key = (layer, keep, state)
        if key not in self.memo:
            check_stop(self.stop, "Adaptive search was stopped.")
            self.ev.masks[layer] = self.ev.width_mask(layer, keep)
            self.memo[key] = self.ev.value(start=layer) - base
            self.ev.masks[layer] = None
            self.bar.tick()
        return self.memo[key]

    def base_value(self, layer: int, state: tuple) -> float:
        """The loss before ``layer`` is masked: dense (independent) or with the later layers pruned."""
        key = (layer, "base", state)
        if key not in self.memo:
            self.memo[key] = self.ev.dense_value if self.mode == "independent" else self.ev.value(start=layer)
            if self.mode != "independent":
                self.bar.tick()
        return self.memo[key]

    def layer_width(self, layer: int, tol: float, state: tuple) -> tuple[int, list[tuple[int, float]]]:
        """(chosen width, the (width, increase) probes tried) for one layer."""
        base = self.base_value(layer, state)
        tried: list[tuple[int, float]] = []

        def probe(keep: int) -> float:
            value = self.increase(layer, keep, state, base)
            tried.append((keep, value))
            return value

        lo, hi = self.floors[layer], self.fulls[layer]
        if lo >= hi or probe(lo) <= tol:
            return lo, tried
        for _ in range(self.halvings):
            if hi - lo <= self.round_to:
                break
            mid = lo + max(1, (hi - lo) // (2 * self.round_to)) * self.round_to
            if mid >= hi:
                break
            if probe(mid) <= tol:
                hi = mid
            else:
                lo = mid
        return hi, tried

    def __call__(self, tol: float) -> tuple[list[int], list[LayerTrace]]:
        n_layers, ev = len(self.fulls), self.ev
        widths = list(self.fulls)
        traces: list[LayerTrace | None] = [None] * n_layers
        ev.masks = [None] * n_layers
        try:
            for layer in reversed(range(n_layers)):
                state = tuple(widths[layer + 1:]) if self.mode == "sequential" else ()
                if self.mode == "sequential":
                    for later in range(layer + 1, n_layers):
                        ev.masks[later] = ev.width_mask(later, widths[later])
                chosen, tried = self.layer_width(layer, tol, state)
                widths[layer] = chosen
                traces[layer] = LayerTrace(layer, self.fulls[layer], tried, chosen, chosen)
        finally:
            ev.masks = [None] * n_layers
        return widths, traces  # type: ignore[return-value]


def _next_tolerance(tol: float, lo_tol: float | None, hi_tol: float | None) -> float | None:
    """The outer bisection's next tolerance (×10 up or down until the target is bracketed, then
    geometric midpoints), or None when it cannot move any further."""
    if hi_tol is None:
        return None if tol >= 1e6 else tol * 10.0
    if lo_tol is None:
        return None if tol <= 1e-12 else tol / 10.0
    if hi_tol / lo_tol < 1.0 + 1e-6:
        return None
    return math.sqrt(lo_tol * hi_tol)


def _bisect_tolerance(run: Callable[[float], tuple[list[int], list[LayerTrace], int]], target: int, limit: float,
                      max_outer: int) -> tuple[list[int], list[LayerTrace], int, float]:
    """Outer loop: the tolerance whose widths keep ``target`` neurons (± ``limit``); returns the best
    (widths, traces, kept, tolerance) seen."""
    tol: float | None = 1e-3
    best = None
    lo_tol = hi_tol = None  # lo_tol kept too many neurons (kept > target); hi_tol kept too few
    for _ in range(max_outer):
        widths, traces, kept = run(tol)
        if best is None or abs(kept - target) < abs(best[2] - target):
            best = (widths, traces, kept, tol)
        if abs(kept - target) <= limit:
            break  # within the ratio tolerance; the correction (if exact) removes the rest
        if kept > target:
            lo_tol = tol if lo_tol is None else max(lo_tol, tol)
        else:
            hi_tol = tol if hi_tol is None else min(hi_tol, tol)
        tol = _next_tolerance(tol, lo_tol, hi_tol)
        if tol is None:
            break
    return best


def adaptive_search(model: nn.Module, scores: list[torch.Tensor], ratio: float, windows: torch.Tensor | None, *,
                    fidelity: str = "kl", mode: str = "independent", halvings: int = 6, min_keep: float = 0.05,
                    round_to: int = 1, ratio_tolerance: float = 0.005, max_outer: int = 16, exact: bool = True,
                    batch_size: int = 4, progress: bool = True, stop: Callable[[], bool] | None = None,
                    evaluator: MaskedModel | None = None) -> AdaptiveResult:
    """Per-layer widths that keep ``(1 − ratio)`` of all MLP neurons, chosen by the fidelity search.

    scores: the criterion's per-layer scores (they order neurons inside a layer). windows: held-out
    calibration windows (N, T). Returns widths, the per-layer traces at the final tolerance and the
    outer bisection steps. Pass ``evaluator`` to reuse the dense pass (and, in ``independent`` mode,
    every memoised evaluation) across ratios, or to search with another fidelity (any
    :class:`MaskedModel`, e.g. an encoder's; ``windows`` and ``fidelity`` are then unused).
    """
    ratio = _check_search(ratio, mode, halvings, round_to, min_keep)
    start_time = time.perf_counter()
    ev = evaluator or MaskedEvaluator(model, windows, scores, fidelity, batch_size)
    fulls = [h.width for h in ev.handles]
    total_full = sum(fulls)
    target = int(round((1.0 - ratio) * total_full))
    floors = [min(d, max(round_to, int(math.ceil(min_keep * d / round_to - 1e-9)) * round_to)) for d in fulls]
    if sum(floors) > target:
        raise PruneConfigError(f"Ratio {ratio} keeps {target} neurons, fewer than the adaptive minimum per layer "
                               f"({sum(floors)}); lower the ratio or min_keep.")
    evals_before = ev.evaluations
    bar = _ProbeBar(expected_probes(len(fulls), halvings, mode), progress)
    search = _LayerSearch(ev, fulls, floors, mode=mode, halvings=halvings, round_to=round_to, stop=stop, bar=bar)
    outer: list[dict] = []

    def run(tol: float) -> tuple[list[int], list[LayerTrace], int]:
        widths, traces = search(tol)
        kept = sum(widths)
        outer.append({"tolerance": tol, "kept": kept, "ratio": 1.0 - kept / total_full})
        bar.note(step=len(outer), tol=f"{tol:.2e}", ratio=f"{1.0 - kept / total_full:.4f}",
                 evals=ev.evaluations - evals_before)
        return widths, traces, kept

    try:
        widths, traces, kept, tol = _bisect_tolerance(run, target, ratio_tolerance * total_full, max_outer)
    finally:
        bar.close()
    search_ratio = 1.0 - kept / total_full
    if exact and kept != target:
        widths = _correct(widths, traces, fulls, floors, target, round_to, search.memo, mode)
        for trace, width in zip(traces, widths):
            trace.width = width
    achieved = 1.0 - sum(widths) / total_full
    return AdaptiveResult(widths=widths, traces=traces, tolerance=tol, target_ratio=ratio, achieved_ratio=achieved,
                          search_ratio=search_ratio, fidelity=ev.fidelity, mode=mode,
                          evaluations=ev.evaluations - evals_before, seconds=time.perf_counter() - start_time,
                          heldout_tokens=ev.tokens, outer=outer)


def _correct(widths: list[int], traces: list[LayerTrace], fulls: list[int], floors: list[int], target: int,
             round_to: int, memo: dict, mode: str) -> list[int]:
    """Move the total onto ``target`` (±round_to/2) one step at a time, each step on the layer whose
    interpolated loss increase changes least — no extra forwards."""
    points = [dict(t.tried) for t in traces]
    for layer, full in enumerate(fulls):
        points[layer].setdefault(full, 0.0)
        if mode == "independent":  # every memoised width of this layer is a valid point
            for key, value in memo.items():
                if key[0] == layer and isinstance(key[1], int):
                    points[layer].setdefault(key[1], value)
    widths = list(widths)
    total = sum(widths)
    while abs(total - target) > round_to / 2:
        if total > target:  # remove: cheapest next step down
            options = [(_interpolate(points[i], w - round_to, fulls[i]) - _interpolate(points[i], w, fulls[i]), i)
                       for i, w in enumerate(widths) if w - round_to >= floors[i]]
            if not options:
                break
            _, layer = min(options)
            step = min(round_to, total - target) if round_to == 1 else round_to
            widths[layer] -= step
            total -= step
        else:  # add back: the step that saves the most
            options = [(_interpolate(points[i], w, fulls[i])
                        - _interpolate(points[i], min(fulls[i], w + round_to), fulls[i]), i)
                       for i, w in enumerate(widths) if w < fulls[i]]
            if not options:
                break
            _, layer = max(options)
            step = min(round_to, fulls[layer] - widths[layer], target - total) if round_to == 1 else \
                min(round_to, fulls[layer] - widths[layer])
            widths[layer] += step
            total += step
    return widths
