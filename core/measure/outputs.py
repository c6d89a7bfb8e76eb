"""What models say, side by side: seeded generation with identical settings for several models, the
next-token distribution ("the whole menu") of several models for one context, and the per-token
KL(p_original ‖ p_variant) along a text.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from core.errors import DataError
from core.metrics import entropy, log_probs, per_token_kl

# whitespace a bar label would otherwise show as nothing (or as a gap that looks like nothing)
VISIBLE_WHITESPACE = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍", "\u00a0": "⍽"}


def shown_token(token: str) -> str:
    """A token as a label people can see: spaces as '␣', newlines as '⏎', tabs as '⇥', other control
    characters escaped ('\\x00'), the empty string as '∅'. ' Paris' → '␣Paris', ' ' → '␣'."""
    out = "".join(VISIBLE_WHITESPACE.get(ch) or (repr(ch)[1:-1] if not ch.isprintable() else ch) for ch in token)
    return out or "∅"


def shown_tokens(tokens: list[str]) -> list[str]:
    """:func:`shown_token` of each, kept apart: a token that would read like another one already shown
    (a literal '␣' next to a space token) gets a trailing ' ·2', so no two bars share a label."""
    seen: dict[str, int] = {}
    out = []
    for token in tokens:
        label = shown_token(token)
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ·{seen[label]}")
    return out


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
        dists[name] = log_probs(logits.cpu())  # (V,)
    union: list[int] = []
    for logp in dists.values():
        for token in logp.topk(k).indices.tolist():
            if token not in union:
                union.append(token)
    names = list(dists)
    union.sort(key=lambda t: tuple(-float(dists[n][t]) for n in names))
    probs = {n: [float(dists[n][t].exp()) for t in union] for n in names}
    entropies = {n: float(entropy(dists[n])) for n in names}
    top1 = {n: tokenizer.decode([int(dists[n].argmax())]) for n in names}
    return TokenMenu(context, union, [tokenizer.decode([t]) for t in union], probs, entropies, top1)


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
