"""One MLP neuron up close: its score and rank under every criterion, the calibration tokens where it
fires hardest, and what removing it alone does to the model's next-token distribution there.

    report = inspect_neuron(loaded, windows, layer=3, index=17, scores={"entropy": result})
    report.criteria[0].rank, report.contexts[0].tokens, report.contexts[0].kl

Neuron j of layer l contributes ``W_down[:, j] · a_j`` to the layer's output (``a`` is the
down_proj input, (B, T, d_ff)). Zeroing ``a_j`` at the down_proj input is therefore the same
function as slicing the neuron out of gate/up/down (what pruning does), without copying or touching
the shared weights: :func:`ablate_neuron` does that with a forward pre-hook.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from core import metrics
from core.data.text import bos_token
from core.errors import SelectionError
from core.importance.stats import ranks
from core.models.adapters import mlp_handles
from core.models.forward import base_forward, batches, hooks, lm_logits
from core.options import Options, knob
from core.progress import check_stop


@dataclass
class InspectOptions(Options):
    """How much of the neuron to show."""

    error = SelectionError
    top_k: int = knob(8, "top-activating calibration tokens to show", low=1, high=256, ui_high=32)
    context: int = knob(12, "tokens of text shown on each side of a top token", low=0, high=128, ui_high=32)
    menu_k: int = knob(5, "candidate next tokens per menu (union of before and after)", low=1, high=50, ui_high=20)
    by: str = knob("abs", "order tokens by |a_j| (abs) or by the signed value a_j (max)", choices=("abs", "max"))
    batch_size: int = knob(4, "windows per forward pass", low=1, ui_high=16)


@dataclass
class CriterionRank:
    """The neuron under one criterion: raw score, rank in its layer (1 = most important) and
    percentile rank (0 = least important, 1 = most; ties averaged, as in the rank scatter)."""

    criterion: str
    score: float
    rank: int
    percentile: float
    width: int


@dataclass
class NeuronContext:
    """One top-activating calibration token with its surrounding text and the ablation's effect there.

    ``tokens[center]`` is the token where the neuron fired (window ``window``, position
    ``position``); ``activations[i]`` is a_j at ``tokens[i]``. ``menu``: the next-token candidates
    after that token, ``p_before`` (dense) and ``p_after`` (this neuron removed); ``kl`` is
    KL(p_dense ‖ p_removed) at that position in nats."""

    window: int
    position: int
    activation: float
    tokens: list[str]
    activations: list[float]
    center: int
    next_token: str | None
    menu: list[dict]
    kl: float
    top1_before: str
    top1_after: str


@dataclass
class NeuronReport:
    layer: int
    index: int
    width: int
    layers: int
    criteria: list[CriterionRank]
    contexts: list[NeuronContext]
    activation: dict  # a_j over every calibration token: mean, mean_abs, min, max, positive_share
    tokens: int  # calibration tokens seen
    kl_mean: float  # mean KL at the shown contexts (nats)
    top1_changed: int  # contexts whose most likely next token changes when the neuron is removed
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def check_neuron(model: nn.Module, layer: int, index: int) -> None:
    """One sentence unless ``layer`` and ``index`` name an MLP neuron of ``model``."""
    widths = [h.width for h in mlp_handles(model)]
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(widths):
        raise SelectionError(f"Layer {layer} does not exist: the model has {len(widths)} layers (0–{len(widths) - 1}).")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < widths[layer]:
        raise SelectionError(f"Neuron {index} does not exist in layer {layer}, whose MLP has {widths[layer]} "
                             f"neurons (0–{widths[layer] - 1}).")


@contextlib.contextmanager
def ablate_neuron(model: nn.Module, layer: int, index: int,
                  rows: slice | None = None) -> Iterator[None]:
    """Within the block, neuron ``index`` of ``layer`` is removed: its down_proj input a_j is zeroed
    (for batch rows ``rows`` only, when given), which equals slicing it out of gate/up/down."""
    check_neuron(model, layer, index)

    def pre_hook(_module, args):
        a = args[0].clone()  # (B, T, d_ff)
        a[rows if rows is not None else slice(None), :, index] = 0
        return (a, *args[1:])

    with hooks([mlp_handles(model)[layer].down.register_forward_pre_hook(pre_hook)]):
        yield


@torch.no_grad()
def neuron_activations(model: nn.Module, windows: torch.Tensor, layer: int, index: int, *, batch_size: int = 4,
                       stop: Callable[[], bool] | None = None,
                       on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """a_j at every calibration token: (N, T) windows → (N, T) fp32, one forward pass of the decoder
    stack with one hook on ``layer``'s down_proj; ``on_batch(windows done)`` after each batch."""
    check_neuron(model, layer, index)
    out: list[torch.Tensor] = []

    def pre_hook(_module, args):
        out.append(args[0][..., index].detach().float().cpu())  # (B, T)

    device = next(model.parameters()).device
    with hooks([mlp_handles(model)[layer].down.register_forward_pre_hook(pre_hook)]):
        for batch in batches(windows, batch_size):
            check_stop(stop, "The neuron inspection was stopped.")
            base_forward(model, batch.to(device))
            if on_batch is not None:
                on_batch(sum(int(o.shape[0]) for o in out))
    return torch.cat(out)


def top_positions(activations: torch.Tensor, k: int, by: str = "abs",
                  skip_first: bool = False) -> list[tuple[int, int]]:
    """(window, position) of the ``k`` tokens with the largest |a_j| (``abs``) or a_j (``max``),
    strongest first; ties by (window, position). ``skip_first`` leaves out position 0 (a BOS token)."""
    key = activations.abs() if by == "abs" else activations.clone()  # (N, T)
    if skip_first:
        key[:, 0] = float("-inf")
    flat = key.flatten()
    order = torch.argsort(flat, descending=True, stable=True)[: min(k, flat.numel() - skip_first * key.shape[0])]
    columns = activations.shape[1]
    return [(int(i) // columns, int(i) % columns) for i in order]


def neuron_at_rank(scores: torch.Tensor, fraction: float) -> int:
    """The neuron at rank fraction ``fraction`` of a layer sorted high → low (0 = most important,
    1 = least; the heatmap's columns): its index in the layer."""
    order = torch.argsort(scores.float(), descending=True, stable=True)
    position = round(min(max(float(fraction), 0.0), 1.0) * (order.numel() - 1))
    return int(order[position])


def criterion_ranks(scores: Mapping[str, object], layer: int, index: int, widths: list[int]) -> list[CriterionRank]:
    """Score and rank of one neuron under each criterion (``ScoreResult`` or list of (d_ff_l,) tensors)."""
    rows = []
    for name, result in scores.items():
        per_layer = getattr(result, "scores", result)
        if [int(s.numel()) for s in per_layer] != widths:
            raise SelectionError(f"The '{name}' scores were computed for a model with different MLP widths.")
        s = per_layer[layer].float()
        value = float(s[index])
        rows.append(CriterionRank(name, value, int((s > value).sum()) + 1, float(ranks(s)[index]), int(s.numel())))
    return rows


def _menu(dense: torch.Tensor, removed: torch.Tensor, k: int, decode: Callable[[int], str]) -> list[dict]:
    """Union of both top-k next tokens, ordered by the dense probability: (V,) log-probs each."""
    union = list(dict.fromkeys([*dense.topk(k).indices.tolist(), *removed.topk(k).indices.tolist()]))
    union.sort(key=lambda t: -float(dense[t]))
    return [{"token": decode(t), "token_id": int(t), "p_before": float(dense[t].exp()),
             "p_after": float(removed[t].exp())} for t in union]


@torch.no_grad()
def inspect_neuron(loaded, windows: torch.Tensor, layer: int, index: int, *,
                   scores: Mapping[str, object] | None = None, options: InspectOptions | None = None,
                   stop: Callable[[], bool] | None = None,
                   on_progress: Callable[[str, float], None] | None = None) -> NeuronReport:
    """Everything about neuron ``index`` of ``layer``: ranks under ``scores`` (criterion → scores),
    its top-activating tokens in ``windows`` (N, T) with their text, and the next-token menu and KL
    at each of them when this neuron alone is removed.

    Cost: one forward pass of the decoder stack over ``windows``, then one of the full model over the
    (≤ top_k) windows that hold the shown tokens, dense and ablated rows in one batch, each cut after
    its last shown token. ``on_progress(what, fraction)``: after each batch, with the share of those
    tokens done (never decreasing; the second pass is counted at its largest until its size is known)."""
    options = options or InspectOptions()
    model, tokenizer = loaded.model, loaded.tokenizer
    check_neuron(model, layer, index)
    widths = [h.width for h in mlp_handles(model)]
    ranked = criterion_ranks(scores or {}, layer, index, widths)
    n, T = int(windows.shape[0]), int(windows.shape[1])
    first, second = n * T, 2 * min(options.top_k, n) * T  # tokens through the model: pass 1, pass 2 at most
    report = on_progress or (lambda _what, _fraction: None)
    acts = neuron_activations(model, windows, layer, index, batch_size=options.batch_size, stop=stop,
                              on_batch=lambda done: report(f"activations over {done} of {n} calibration windows",
                                                           done * T / (first + second)))  # (N, T)
    has_bos = bos_token(tokenizer) is not None and bool((windows[:, 0] == bos_token(tokenizer)).all())
    picks = top_positions(acts, options.top_k, options.by, skip_first=has_bos)

    def decode(token: int) -> str:
        return tokenizer.decode([int(token)])

    # Dense and ablated logits at the picked positions: rows [0, W) dense, [W, 2W) ablated.
    chosen = sorted({w for w, _ in picks})
    last = {w: max(p for ww, p in picks if ww == w) for w in chosen}
    logp: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    device = next(model.parameters()).device
    step = max(1, options.batch_size // 2)
    second = 2 * sum(last[w] + 1 for w in chosen)  # its real size: each shown window up to its last shown token
    done = 0
    for start in range(0, len(chosen), step):
        check_stop(stop, "The neuron inspection was stopped.")
        group = chosen[start:start + step]
        length = max(last[w] for w in group) + 1
        ids = windows[group, :length].to(device)  # (G, t)
        with ablate_neuron(model, layer, index, rows=slice(len(group), None)):
            hidden = base_forward(model, torch.cat([ids, ids]))  # (2G, t, H)
        done += 2 * sum(last[w] + 1 for w in group)
        report(f"removing the neuron: {min(start + step, len(chosen))} of {len(chosen)} windows",
               (first + done) / (first + second))
        for row, w in enumerate(group):
            for ww, p in picks:
                if ww == w:
                    pair = lm_logits(model, hidden[[row, row + len(group)], p]).float().log_softmax(-1).cpu()
                    logp[(w, p)] = (pair[0], pair[1])  # (V,) each

    contexts = []
    T = windows.shape[1]
    for w, p in picks:
        dense, removed = logp[(w, p)]
        lo, hi = max(0, p - options.context), min(T, p + options.context + 1)
        ids = windows[w, lo:hi].tolist()
        kl = float(metrics.kl(dense, removed).clamp_min(0.0))
        contexts.append(NeuronContext(
            window=w, position=p, activation=float(acts[w, p]), tokens=[decode(t) for t in ids],
            activations=[float(v) for v in acts[w, lo:hi]], center=p - lo,
            next_token=decode(int(windows[w, p + 1])) if p + 1 < T else None,
            menu=_menu(dense, removed, options.menu_k, decode), kl=kl,
            top1_before=decode(int(dense.argmax())), top1_after=decode(int(removed.argmax()))))
    flat = acts.flatten()
    return NeuronReport(
        layer=layer, index=index, width=widths[layer], layers=len(widths), criteria=ranked, contexts=contexts,
        activation={"mean": float(flat.mean()), "mean_abs": float(flat.abs().mean()), "min": float(flat.min()),
                    "max": float(flat.max()), "positive_share": float((flat > 0).float().mean())},
        tokens=int(windows.numel()), kl_mean=sum(c.kl for c in contexts) / max(1, len(contexts)),
        top1_changed=sum(c.top1_before != c.top1_after for c in contexts), options=options.to_dict())
