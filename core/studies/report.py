"""A stored run as one self-contained HTML file: settings, score histograms, per-layer widths, the
metrics table and next-token menus — with plotly.js inlined, so it opens offline and can be mailed.

    html = build_report("20261201-120000-prune-abc123", loaded=load_model("smollm2-135m"))
    write_report(html, "report.html")

The report's figures are built here with plotly's graph objects (plotly is an engine dependency; it
does not pull in gradio). They are not the dashboard's figure factories on purpose: core never
imports hfprune_ui, and ``python -m core report`` must work without the UI package. Every figure
carries a title and axis labels, and its modebar downloads it as PNG (camera) or SVG (the extra
button), client-side, with no server or browser automation involved. :func:`rebuild_run_model` is the
one way to get a stored prune / ddp / recover run's model back (the report and the dashboard use it).
"""
from __future__ import annotations

import copy
import html
import itertools
import json
import math
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from core import __version__
from core.data.text import evaluation_windows
from core.errors import HFPruneError
from core.files import write_text
from core.importance.stats import histogram, layer_summaries, shared_range
from core.measure.evaluate import QUICK_EVAL, evaluate
from core.measure.outputs import next_token_menus, shown_tokens
from core.methods.gates import DDPPlan
from core.methods.oneshot import ScoreResult, apply_compensation
from core.methods.recover import LoraOptions, apply_lora_state
from core.models.loading import LoadedModel
from core.models.slicing import pruned_view
from core.paths import ASSETS
from core.runs import Run, RunStore

DEFAULT_CONTEXTS = ("The history of the city begins in", "In mathematics, a function is")
PALETTE = ("#1f6feb", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#0b7285")
LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 60, "b": 50}, "height": 380,
          "legend": {"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0}}

# The modebar's camera saves PNG; this extra button saves SVG (plotly.js does both in the page).
_DOWNLOAD_JS = """
function hfpruneConfig(name) {
  return {displaylogo: false, responsive: true,
          toImageButtonOptions: {format: 'png', filename: name, scale: 2},
          modeBarButtonsToAdd: [{name: 'Download plot as SVG', icon: Plotly.Icons.disk,
                                 click: function (gd) { Plotly.downloadImage(gd, {format: 'svg', filename: name}); }}]};
}
"""

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 1100px; margin: 2em auto;
       color: #212529; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #dee2e6; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .9em; }
td, th { border: 1px solid #dee2e6; padding: .25em .6em; text-align: left; }
th { background: #f1f3f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.plot { width: 100%; min-height: 380px; } .note { color: #6c757d; font-size: .9em; }
"""


def _figure(traces: list[dict], title: str, x_title: str, y_title: str, **layout) -> dict:
    """A plotly figure as plain JSON (data + layout) with a title and both axis labels."""
    return {"data": traces, "layout": {**LAYOUT, "title": {"text": title}, "xaxis": {"title": {"text": x_title}},
                                       "yaxis": {"title": {"text": y_title}}, **layout}}


def histogram_figure(scores: list[torch.Tensor], criterion: str, layers: Sequence[int], bins: int = 40) -> dict:
    """Overlaid log10-score histograms of ``layers``, sharing their bins."""
    value_range = shared_range([scores[layer] for layer in layers], log=True)
    traces = []
    for i, layer in enumerate(layers):
        edges, counts = histogram(scores[layer], bins, log=True, value_range=value_range)
        traces.append({"type": "bar", "x": [(a + b) / 2 for a, b in itertools.pairwise(edges)], "y": counts,
                       "width": edges[1] - edges[0], "name": f"layer {layer}", "opacity": 0.55,
                       "marker": {"color": PALETTE[i % len(PALETTE)]}})
    return _figure(traces, f"{criterion}: neuron importance per layer", "log10(score)", "neurons", barmode="overlay")


def widths_figure(before: Sequence[int], after: Sequence[int]) -> dict:
    layers = list(range(len(before)))
    return _figure([{"type": "bar", "x": layers, "y": list(before), "name": "original", "marker": {"color": "#ced4da"}},
                    {"type": "bar", "x": layers, "y": list(after), "name": "kept", "marker": {"color": PALETTE[0]}}],
                   "MLP width per layer", "layer", "neurons", barmode="overlay")


def menu_figure(menu) -> dict:
    """Grouped bars: each model's probability of the same candidate next tokens (a TokenMenu)."""
    labels = shown_tokens(list(menu.tokens))  # ' ' → '␣', '\n' → '⏎': no blank bar labels
    traces = [{"type": "bar", "x": labels, "y": list(p), "name": f"{name} (H={menu.entropy[name]:.2f} nats)",
               "marker": {"color": PALETTE[i % len(PALETTE)]}} for i, (name, p) in enumerate(menu.probs.items())]
    short = menu.context if len(menu.context) <= 60 else "…" + menu.context[-59:]
    return _figure(traces, f"Next-token distribution after “{short}”", "candidate next token", "probability",
                   barmode="group")


def _cell(value) -> str:
    if isinstance(value, float):
        text = "nan" if math.isnan(value) else f"{value:.4g}"
        return f'<td class="num">{text}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    if isinstance(value, (list, dict)):
        value = json.dumps(value)
        value = value if len(value) <= 160 else value[:157] + "…"
    return f"<td>{html.escape(str(value))}</td>"


def table_html(rows: list[dict]) -> str:
    if not rows:
        return '<p class="note">(nothing)</p>'
    columns = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(row.get(c, "")) for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _settings_rows(run: Run) -> list[dict]:
    hidden = {"session", "source_path", "kept_indices"}
    rows = [{"setting": k, "value": v} for k, v in run.config.items() if k not in hidden]
    meta = run.results.get("meta") or {}
    for key in ("achieved_ratio", "criterion_params", "compensation", "calibration"):
        if key in meta:
            rows.append({"setting": f"meta.{key}", "value": meta[key]})
    return rows


def _precomputed_scores(name: str | bool) -> tuple[list[torch.Tensor] | None, str]:
    """(scores, sentence) for a pruning made from the Tour's shipped precomputed scores (``name``: their
    file in assets/tour, or True when an older run did not record it); None when the file is not here."""
    where = f"assets/tour/{name}" if isinstance(name, str) else "assets/tour"
    said = (f"These are the shipped precomputed scores ({where}) the Tour reads instead of scoring on this "
            "machine; no score run is stored for them.")
    path = ASSETS / "tour" / name if isinstance(name, str) else None
    if path is None or not path.is_file():
        return None, said.replace("These are", "This pruning used") + " The file is not in this checkout."
    try:
        return ScoreResult.load(path).scores, said
    except HFPruneError:
        return None, said.replace("These are", "This pruning used") + " The file could not be read."


def _with_windows(row: dict) -> dict:
    """A metrics row with the held-out text it was measured on beside its numbers ('4 × 64 tokens of
    wiki'), in place of the bare windows / seq_len / source fields."""
    if not (row.get("windows") and row.get("seq_len")):
        return row
    text = f"{row['windows']} × {row['seq_len']} tokens" + (f" of {row['source']}" if row.get("source") else "")
    rest = {k: v for k, v in row.items() if k not in ("model", "windows", "seq_len", "source")}
    return {"model": row.get("model", ""), "held-out text": text, **rest}


def metrics_note(rows: list[dict]) -> str:
    """One sentence under the Metrics heading: which held-out windows the numbers come from and whether
    the dashboard's quality at a glance (``QUICK_EVAL``) used the same ones."""
    shapes = sorted({(r["windows"], r["seq_len"]) for r in rows if r.get("windows") and r.get("seq_len")})
    if not shapes:
        return '<p class="note">The held-out windows these metrics were measured on are not recorded.</p>'
    shown = " and ".join(f"{w} × {t}" for w, t in shapes)
    quick = f"{QUICK_EVAL[0]} × {QUICK_EVAL[1]}"
    same = ("the same windows as the dashboard's quality at a glance after Prune, so the numbers agree with it"
            if shapes == [QUICK_EVAL] else
            f"the dashboard's quality at a glance after Prune uses {quick} tokens, so its perplexity differs from "
            "these")
    return (f'<p class="note">Measured on {shown} held-out tokens (the column <i>held-out text</i>). Perplexity '
            f"depends on the windows it is measured on: these are {same}.</p>")


def pick_layers(count: int) -> list[int]:
    """First, middle and last layer."""
    return sorted({0, count // 2, count - 1})


def report_sections(run: Run, store: RunStore, *, metrics: list[dict] | None = None,
                    menus: Sequence | None = None) -> list[tuple[str, list]]:
    """The report's content from a stored run: [(section title, [html string | figure dict, ...])]."""
    sections: list[tuple[str, list]] = [("Settings", [table_html(_settings_rows(run))])]
    scores, criterion = None, run.config.get("criterion")
    if run.kind == "score" and run.has_scores():
        scores = run.scores()
    elif run.config.get("scores_run"):
        try:
            scores = store.load(run.config["scores_run"]).scores()
        except HFPruneError:
            scores = None  # the score run was deleted; the rest of the report still stands
    origin = ""
    if scores is None and run.config.get("scores_precomputed"):
        scores, origin = _precomputed_scores(run.config["scores_precomputed"])
    if scores is not None:
        summaries = [{k: v for k, v in row.items()} for row in layer_summaries(scores)]
        sections.append(("Importance scores", [*([f'<p class="note">{html.escape(origin)}</p>'] if origin else []),
                                               histogram_figure(scores, criterion or "scores",
                                                                pick_layers(len(scores))),
                                               table_html(summaries)]))
    elif run.kind == "prune":
        note = origin or ("The score run behind this pruning is no longer stored." if run.config.get("scores_run")
                          else "This pruning names no stored score run.")
        sections.append(("Importance scores", [f'<p class="note">{html.escape(note)}</p>']))
    meta = run.results.get("meta") or {}
    before = meta.get("original_intermediate_sizes")
    after = run.results.get("widths") or meta.get("intermediate_sizes")
    if before and after:
        rows = [{"layer": i, "original": b, "kept": a, "removed %": 100 * (1 - a / b)}
                for i, (b, a) in enumerate(zip(before, after))]
        sections.append(("Widths", [widths_figure(before, after), table_html(rows)]))
    stored = run.results.get("metrics")
    rows = list(metrics or ([{"model": run.config.get("name") or run.run_id, **stored}] if stored else []))
    if rows:
        sections.append(("Metrics", [metrics_note(rows), table_html([_with_windows(row) for row in rows])]))
    if menus:
        sections.append(("Next-token menus (original vs pruned)", [menu_figure(m) for m in menus]))
    return sections


def rebuild_run_model(run: Run, loaded: LoadedModel, store: RunStore, *, progress: bool = True) -> nn.Module:
    """The model of a stored prune, ddp or recover run, rebuilt on ``loaded`` (its base model): a prune
    run's kept neurons sliced out again (its least-squares refit redone), a ddp run's plan folded and
    sliced again, a recover run's source run rebuilt first and its stored tensors or LoRA adapters applied."""
    if run.kind == "prune":
        kept = run.kept()
        model = pruned_view(loaded.model, kept)
        apply_compensation(loaded, model, kept, run.results.get("meta") or {}, progress=progress)
        return model
    if run.kind == "ddp":  # kept units + gate values: fold and slice the original again
        return DDPPlan.from_tensors(run.weights()).apply(loaded.model)
    if run.kind != "recover":
        raise HFPruneError(f"Run {run.run_id} is of kind '{run.kind}', which holds no model.")
    source_id = run.config.get("source_run")
    if not source_id:
        raise HFPruneError(f"Recover run {run.run_id} does not name the run of the variant it started from.")
    model = rebuild_run_model(store.load(source_id), loaded, store, progress=progress)
    params = run.config.get("params")
    if params != "mlp":  # a pruned view shares attention and embeddings with the original: copy first
        model = copy.deepcopy(model)
    if params == "lora":
        return apply_lora_state(model, LoraOptions.from_dict(run.config.get("lora")), run.weights())
    return _copy_tensors(model, run)


def _copy_tensors(model: nn.Module, run: Run) -> nn.Module:
    """``model`` with a recover run's stored tensors copied into its parameters of the same names."""
    weights = run.weights()
    with torch.no_grad():
        named = dict(model.named_parameters())
        missing = sorted(set(weights) - set(named))
        if missing:
            raise HFPruneError(f"Recover run {run.run_id} stores tensors this model lacks ({missing[0]}, ...).")
        for key, tensor in weights.items():
            named[key].copy_(tensor)
    return model


def render_html(title: str, sections: list[tuple[str, list]], subtitle: str = "") -> str:
    """One HTML document, plotly.js inlined once, every figure drawn by an inline script."""
    import plotly.graph_objects as go
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    body, scripts = [], []
    count = 0
    for heading, items in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        for item in items:
            if isinstance(item, str):
                body.append(item)
                continue
            count += 1
            name = "".join(c if c.isalnum() else "-" for c in item["layout"]["title"]["text"].lower()).strip("-")[:60]
            body.append(f'<div class="plot" id="figure-{count}"></div>')
            figure = pio.to_json(go.Figure(item)).replace("</", "<\\/")  # resolves the named template
            scripts.append(f"var f{count} = {figure};\n"
                           f"Plotly.newPlot('figure-{count}', f{count}.data, f{count}.layout, "
                           f"hfpruneConfig({json.dumps(name or f'figure-{count}')}));")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
            f'<script id="plotlyjs">{get_plotlyjs()}</script><script>{_DOWNLOAD_JS}</script></head><body>'
            f"<h1>{html.escape(title)}</h1><p class=\"note\">{html.escape(subtitle)}</p>" + "\n".join(body)
            + f"<script>{chr(10).join(scripts)}</script></body></html>\n")


# what build_report does, in order, as its on_step callback names it
REPORT_STEPS = ("rebuilding the pruned model", "drawing the next-token menus", "measuring it on held-out text",
                "writing the page")


def build_report(run_id: str, *, store: RunStore | None = None, loaded=None, model=None,
                 contexts: Sequence[str] = DEFAULT_CONTEXTS, menu_k: int = 8, eval_windows: int = 0,
                 eval_seq_len: int = QUICK_EVAL[1], progress: bool = False,
                 on_step: Callable[[int, str], None] | None = None) -> str:
    """HTML report of a stored run. For a prune run and a ``loaded`` base model, the pruned model is
    rebuilt from the run's kept indices (or ``model`` is used) to draw the next-token menus for
    ``contexts``, and — when the run has no stored metrics and ``eval_windows`` > 0 — to evaluate it
    on ``eval_windows`` × ``eval_seq_len`` held-out tokens of the run's corpus (wiki for an upload;
    the dashboard's quality at a glance uses ``QUICK_EVAL``, 4 × 64). The report names the windows.
    ``on_step(k, what)`` as each of :data:`REPORT_STEPS` starts (a score run has only the last)."""
    step = on_step or (lambda _k, _what: None)
    store = store or RunStore()
    run = store.load(run_id)
    if run.kind not in ("score", "prune"):
        raise HFPruneError(f"Run {run_id} is of kind '{run.kind}'; reports are made for score and prune runs.")
    menus, metrics = [], None
    if run.kind == "prune" and loaded is not None:
        if loaded.spec != run.config.get("model"):
            raise HFPruneError(f"Run {run_id} pruned {run.config.get('model')}, not {loaded.spec}.")
        if model is None:
            step(0, REPORT_STEPS[0])
            model = rebuild_run_model(run, loaded, store, progress=progress)
        name = run.config.get("name") or "pruned"
        step(1, REPORT_STEPS[1])
        menus = [next_token_menus({"original": loaded.model, name: model}, loaded.tokenizer, c, menu_k)
                 for c in contexts if c.strip()]
        if not run.results.get("metrics") and eval_windows > 0:
            step(2, REPORT_STEPS[2])
            source = run.config.get("source") if run.config.get("source") in ("wiki", "news") else "wiki"
            ids = evaluation_windows(loaded.tokenizer, source, eval_windows, eval_seq_len, max_length=loaded.max_length)
            original = evaluate(loaded.model, ids, progress=progress).to_dict()
            pruned = evaluate(model, ids, loaded.model, progress=progress).to_dict()
            metrics = [{"model": "original", "source": source, **original},
                       {"model": name, "source": source, **pruned}]
    step(3, REPORT_STEPS[3])
    title = f"HFPrune Studio report — {run.kind} run {run.run_id}"
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = (f"model {run.config.get('model')}; criterion {run.config.get('criterion')}; created "
                f"{run.created_at}; report written {stamp} by HFPrune Studio {__version__}")
    return render_html(title, report_sections(run, store, metrics=metrics, menus=menus), subtitle)


def check_report_path(out: str | os.PathLike) -> Path:
    """One sentence unless ``out`` is a new .html file in an existing folder."""
    target = Path(out)
    if target.exists():
        raise HFPruneError(f"{target} already exists; choose a new file name.")
    if not target.parent.is_dir():
        raise HFPruneError(f"Folder {target.parent} does not exist.")
    if target.suffix.lower() not in (".html", ".htm"):
        raise HFPruneError(f"The report is an HTML file; use a name ending in .html, not '{target.name}'.")
    return target


def write_report(text: str, out: str | os.PathLike) -> Path:
    """Write the report atomically (temporary file + rename); refuses to overwrite an existing file."""
    target = check_report_path(out)
    return write_text(target, text)
