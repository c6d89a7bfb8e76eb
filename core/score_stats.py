"""What the dashboard's Importance / Prune / Compare views compute — kept here so the UI holds no math.

Two families of helpers:

* score-set statistics: per-layer summaries, histograms, the sorted layer × neuron matrix, ranks,
  Spearman ρ between two criteria, the overlap of the neurons each would remove, and the neurons
  the two disagree on most;
* model-vs-model views: seeded generation with identical settings for several models, the next-token
  distribution ("the whole menu") of several models for one context, and the per-token
  KL(p_original ‖ p_variant) along a text; plus the parameter / FLOP preview of a planned pruning.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import mlp_handles, mlp_widths
from .allocate import top_k_indices
from .bench import count_params, forward_flops_per_token, mlp_params_for_widths
from .errors import DataError, HFPruneError
from .evaluate import per_token_kl

# ----------------------------------------------------------------------------------------------
# score-set statistics
# ----------------------------------------------------------------------------------------------


def layer_summaries(scores: list[torch.Tensor]) -> list[dict]:
    """One row per layer: width, mean, median, std, max, max/mean and the share of the total score
    held by the top 10 % of neurons (how concentrated importance is)."""
    rows = []
    for layer, s in enumerate(scores):
        s = s.double()
        total = float(s.sum())
        top = max(1, int(math.ceil(0.1 * s.numel())))
        top_share = float(s.topk(top).values.sum()) / total if total > 0 else float("nan")
        mean = float(s.mean())
        rows.append({"layer": layer, "width": int(s.numel()), "mean": mean, "median": float(s.median()),
                     "std": float(s.std()) if s.numel() > 1 else 0.0, "max": float(s.max()),
                     "max_over_mean": float(s.max()) / mean if mean > 0 else float("nan"),
                     "top10_share": top_share})
    return rows


def _log10(values: torch.Tensor) -> torch.Tensor:
    """log10 with zeros (and negatives) floored just below the smallest positive value."""
    values = values.double()
    positive = values[values > 0]
    floor = float(positive.min()) / 10 if positive.numel() else 1e-12
    return values.clamp_min(floor).log10()


def histogram(values: torch.Tensor, bins: int = 40, log: bool = False,
              value_range: tuple[float, float] | None = None) -> tuple[list[float], list[int]]:
    """Bin ``values`` (optionally log10 first) → (bin edges (bins+1,), counts (bins,))."""
    data = _log10(values) if log else values.double()
    lo, hi = value_range if value_range is not None else (float(data.min()), float(data.max()))
    if hi <= lo:
        hi = lo + 1e-12
    counts = torch.histc(data.float(), bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    return edges.tolist(), [int(c) for c in counts.tolist()]


def shared_range(score_sets: list[torch.Tensor], log: bool = False) -> tuple[float, float]:
    """One (min, max) covering several score vectors, so overlaid histograms share their bins."""
    data = torch.cat([(_log10(s) if log else s.double()).flatten() for s in score_sets])
    return float(data.min()), float(data.max())


def sorted_score_matrix(scores: list[torch.Tensor], log: bool = True, columns: int | None = 256) -> torch.Tensor:
    """(layers, columns) matrix: each layer's scores sorted high → low and divided by the layer's mean
    (log10 if ``log``), so layers are comparable. Column c is the neuron at rank fraction
    c / (columns − 1) of its layer (``columns=None``: every neuron, NaN-padding narrower layers)."""
    width = max(s.numel() for s in scores)
    columns = width if columns is None else min(columns, width)
    matrix = torch.full((len(scores), columns), float("nan"), dtype=torch.float64)
    for layer, s in enumerate(scores):
        s = s.double()
        mean = float(s.mean())
        relative = s / mean if mean > 0 else s
        row = (_log10(relative) if log else relative).sort(descending=True).values
        if columns == width and s.numel() == width:
            matrix[layer] = row
        elif columns == width:
            matrix[layer, : s.numel()] = row
        else:
            picks = torch.linspace(0, s.numel() - 1, columns).round().long()
            matrix[layer] = row[picks]
    return matrix


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """Percentile rank of every neuron in its layer: 0 = least important, 1 = most (ties averaged)."""
    from scipy.stats import rankdata

    n = scores.numel()
    r = torch.from_numpy(rankdata(scores.double().numpy(), method="average"))
    return (r - 1) / max(1, n - 1)


def _check_pair(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    if [s.numel() for s in a] != [s.numel() for s in b]:
        raise HFPruneError("The two score sets come from models with different MLP widths.")


def spearman_per_layer(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    """Spearman rank correlation ρ between two criteria, per layer."""
    _check_pair(a, b)
    out = []
    for sa, sb in zip(a, b):
        ra, rb = ranks(sa), ranks(sb)
        ra, rb = ra - ra.mean(), rb - rb.mean()
        denominator = float(ra.norm() * rb.norm())
        out.append(float((ra * rb).sum()) / denominator if denominator > 0 else float("nan"))
    return out


def removed_indices(scores: list[torch.Tensor], widths: list[int]) -> list[torch.Tensor]:
    """Indices each layer would drop when keeping ``widths[l]`` top-scoring neurons (ascending)."""
    kept = top_k_indices(scores, widths)
    out = []
    for s, keep in zip(scores, kept):
        mask = torch.ones(s.numel(), dtype=torch.bool)
        mask[keep] = False
        out.append(mask.nonzero().flatten())
    return out


def removal_overlap(a: list[torch.Tensor], b: list[torch.Tensor], widths: list[int]) -> list[dict]:
    """Per layer: how many neurons each criterion removes, how many both remove, the fraction of
    A's removals that B also removes, and the Jaccard index of the two removed sets."""
    _check_pair(a, b)
    rows = []
    for layer, (ra, rb) in enumerate(zip(removed_indices(a, widths), removed_indices(b, widths))):
        set_a, set_b = set(ra.tolist()), set(rb.tolist())
        shared = len(set_a & set_b)
        union = len(set_a | set_b)
        rows.append({"layer": layer, "removed": len(set_a), "shared": shared,
                     "overlap": shared / len(set_a) if set_a else 1.0,
                     "jaccard": shared / union if union else 1.0})
    return rows


def disagreements(a: list[torch.Tensor], b: list[torch.Tensor], top: int = 10) -> list[dict]:
    """The ``top`` neurons (over all layers) whose percentile rank differs most between A and B."""
    _check_pair(a, b)
    rows = []
    for layer, (sa, sb) in enumerate(zip(a, b)):
        ra, rb = ranks(sa), ranks(sb)
        gap = (ra - rb).abs()
        k = min(top, gap.numel())
        for index in gap.topk(k).indices.tolist():
            rows.append({"layer": layer, "neuron": index, "rank_a": float(ra[index]), "rank_b": float(rb[index]),
                         "gap": float(gap[index])})
    rows.sort(key=lambda row: (-row["gap"], row["layer"], row["neuron"]))
    return rows[:top]


# ----------------------------------------------------------------------------------------------
# pruning preview
# ----------------------------------------------------------------------------------------------


def prune_preview(model: nn.Module, widths: list[int], seq_len: int = 128) -> dict:
    """Parameters and forward FLOPs/token before → after keeping ``widths`` neurons per layer."""
    before_widths = mlp_widths(model)
    if len(widths) != len(before_widths):
        raise HFPruneError(f"Got widths for {len(widths)} layers; the model has {len(before_widths)}.")
    hidden = model.config.hidden_size
    bias = mlp_handles(model)[0].gate.bias is not None
    params = count_params(model)["params"]
    removed = mlp_params_for_widths(hidden, before_widths, bias) - mlp_params_for_widths(hidden, widths, bias)
    flops_before = forward_flops_per_token(model, seq_len, before_widths)
    flops_after = forward_flops_per_token(model, seq_len, widths)
    return {"widths_before": before_widths, "widths_after": list(widths),
            "params_before": params, "params_after": params - removed,
            "flops_before": flops_before, "flops_after": flops_after, "seq_len": seq_len}


# ----------------------------------------------------------------------------------------------
# model-vs-model views
# ----------------------------------------------------------------------------------------------


@dataclass
class GenerationSettings:
    """Identical settings for every model; temperature 0 means greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.95
    seed: int = 0


def _encode(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    if not text or not text.strip():
        raise DataError("The text is empty; type a prompt or a context first.")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, T)
    if ids.shape[1] == 0:
        raise DataError("The text produced no tokens.")
    return ids[:, :max_tokens] if max_tokens else ids


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask everything outside the top-k and the top-p nucleus with -inf: (V,) → (V,)."""
    if top_k and top_k > 0:
        kth = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, settings: GenerationSettings) -> str:
    """Continue ``prompt``; sampling draws from a private generator seeded by ``settings.seed``, so
    the same seed and settings give the same draws for every model (and never touch global RNG)."""
    if settings.max_new_tokens < 1:
        raise DataError("max_new_tokens must be at least 1.")
    device = next(model.parameters()).device
    ids = _encode(tokenizer, prompt).to(device)
    generator = torch.Generator().manual_seed(int(settings.seed))
    eos = tokenizer.eos_token_id
    out = model(input_ids=ids, use_cache=True)
    past, new = out.past_key_values, []
    for _ in range(int(settings.max_new_tokens)):
        logits = out.logits[0, -1].float().cpu()  # (V,)
        if settings.temperature <= 0:
            token = int(logits.argmax())
        else:
            filtered = _filter_logits(logits / settings.temperature, settings.top_k, settings.top_p)
            token = int(torch.multinomial(filtered.softmax(-1), 1, generator=generator))
        if eos is not None and token == eos:
            break
        new.append(token)
        out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return tokenizer.decode(new, skip_special_tokens=True)


def generate_side_by_side(models: dict[str, nn.Module], tokenizer, prompt: str,
                          settings: GenerationSettings) -> dict[str, str]:
    """The same prompt, seed and settings for every model: {name: continuation}."""
    return {name: generate(model, tokenizer, prompt, settings) for name, model in models.items()}


@dataclass
class TokenMenu:
    """Next-token distributions of several models for one context, on the union of their top-k."""

    context: str
    token_ids: list[int]
    tokens: list[str]
    probs: dict[str, list[float]]  # model name → probability of each token in ``tokens``
    entropy: dict[str, float]  # model name → entropy (nats) of its full next-token distribution
    top1: dict[str, str] = field(default_factory=dict)


@torch.no_grad()
def next_token_menus(models: dict[str, nn.Module], tokenizer, context: str, k: int = 10) -> TokenMenu:
    """Each model's full next-token distribution after ``context``; tokens = union of every model's
    top-k, ordered by the first model's probability (ties by the others)."""
    if k < 1:
        raise DataError("k must be at least 1.")
    ids = _encode(tokenizer, context)
    dists = {}
    for name, model in models.items():
        logits = model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits[0, -1]
        dists[name] = logits.float().cpu().log_softmax(-1)  # (V,)
    union: list[int] = []
    for logp in dists.values():
        for token in logp.topk(k).indices.tolist():
            if token not in union:
                union.append(token)
    names = list(dists)
    union.sort(key=lambda t: tuple(-float(dists[n][t]) for n in names))
    probs = {n: [float(dists[n][t].exp()) for t in union] for n in names}
    entropy = {n: float(-(dists[n].exp() * dists[n]).sum()) for n in names}
    top1 = {n: tokenizer.decode([int(dists[n].argmax())]) for n in names}
    return TokenMenu(context, union, [tokenizer.decode([t]) for t in union], probs, entropy, top1)


@dataclass
class TokenKL:
    """Per-token KL(p_original ‖ p_variant) of the distribution that predicted each token.

    ``kl[i]`` belongs to ``tokens[i]``; the first token has no prediction (None)."""

    tokens: list[str]
    kl: list[float | None]
    mean: float
    max: float


@torch.no_grad()
def per_token_kl_text(reference: nn.Module, model: nn.Module, tokenizer, text: str,
                      max_tokens: int = 256) -> TokenKL:
    """Run both models on ``text`` (first ``max_tokens`` tokens) and attach to every token the KL of
    the next-token distributions at the position that predicted it."""
    ids = _encode(tokenizer, text, max_tokens)
    if ids.shape[1] < 2:
        raise DataError("The text needs at least two tokens to compare predictions.")
    ref_logits = reference(input_ids=ids.to(next(reference.parameters()).device), use_cache=False).logits[0]
    logits = model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits[0]
    kl = per_token_kl(ref_logits.float().cpu(), logits.float().cpu())[:-1].clamp_min(0.0)  # (T-1,)
    tokens = [tokenizer.decode([t]) for t in ids[0].tolist()]
    values = [None] + [float(v) for v in kl]
    return TokenKL(tokens, values, float(kl.mean()), float(kl.max()))


def pruned_view(model: nn.Module, kept: list[torch.Tensor], weights_from: nn.Module | None = None) -> nn.Module:
    """A pruned copy that shares every non-MLP tensor (embeddings, attention, norms) with ``model``.

    Only the sliced MLP weights are new memory, so several variants of one base model stay cheap.
    ``weights_from``: a pruned model of the same widths whose MLP weights (e.g. a least-squares
    refit) replace the plain slices. Meant for inference and export; training it would also change
    the original.
    """
    from .prune import prune_mlp_neurons

    handles = mlp_handles(model)
    memo: dict[int, object] = {}
    for h in handles:  # never copy the full-size MLP weights: they are replaced by sliced ones
        for linear in (h.gate, h.up, h.down):
            memo[id(linear)] = linear
    mlp_ids = {id(p) for h in handles for p in h.mlp.parameters()}
    for p in model.parameters():
        if id(p) not in mlp_ids:
            memo[id(p)] = p
    for b in model.buffers():
        memo[id(b)] = b
    clone = copy.deepcopy(model, memo)
    view = prune_mlp_neurons(clone, kept, inplace=True)
    if weights_from is not None:
        with torch.no_grad():
            for mine, theirs in zip(mlp_handles(view), mlp_handles(weights_from)):
                for name in ("gate", "up", "down"):
                    getattr(mine, name).weight.copy_(getattr(theirs, name).weight)
    return view
