"""Tab 6 — Runs: every stored scoring / pruning run, reloadable after a restart, deletable."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core.errors import HFPruneError

from .. import texts
from ..context import PLAIN, Ctx, model_events
from ..guard import session_id, user_errors
from ..services import Services
from ..status import distinct

COLUMNS = ["run", "kind", "created (UTC)", "model", "criterion / method", "allocation", "compensation", "ratio",
           "data", "perplexity", "mine", "run id"]


def _compensation(config: dict) -> str:
    """'lsq (64 windows)' / 'none' / '' for runs that do not prune."""
    value = config.get("compensation")
    if not isinstance(value, dict):
        return ""
    method = value.get("method", "none")
    return f"{method} ({value.get('samples')} windows)" if method != "none" else "none"


def _source(config: dict) -> str:
    """'wiki', 'news' or an uploaded file's own name ('' when the run names none)."""
    source = str(config.get("source") or "")
    return source[len("upload:"):].rsplit("#", 1)[0] if source.startswith("upload:") else source


def _data(run, config: dict) -> str:
    """The text a run read, in words: 'wiki, 8 × 64 tokens, seed 0'; a recovery's windows per step; ''
    when the run records no windows (never 'None × None')."""
    if run.kind == "recover":
        options, train = config.get("recover_options") or {}, config.get("train") or {}
        if options.get("seq_len") and train.get("batch_size"):
            return f"{_source(options) or 'wiki'}, {train['batch_size']} × {options['seq_len']} tokens per step"
        return ""
    if not (config.get("samples") and config.get("seq_len")):
        return _source(config)
    text = f"{_source(config)}, {config['samples']} × {config['seq_len']} tokens, seed {config.get('seed', 0)}"
    return f"{text}, {config['draws']} draws" if run.kind == "stability" and config.get("draws") else text


def _method(run, config: dict, source_run) -> str:
    """What made the run: the criterion of a score or prune run, what a recovery trained (and the cut it
    started from), DDP's units, the criteria a stability run compared, a pipeline's order."""
    if run.kind == "recover":
        train = config.get("train") or {}
        budget = f"{train['steps']} steps" if train.get("steps") else f"{train.get('minutes', 0):g} min"
        cut = (source_run.config.get("criterion") if source_run else None) or "?"
        return f"{cut} cut, then recovery ({config.get('params', 'mlp')}, {budget})"
    if run.kind == "ddp":
        return f"DDP gates ({(config.get('ddp') or {}).get('units', 'mlp')})"
    if run.kind == "stability":
        return ", ".join(config.get("criteria") or [])
    if run.kind == "pipeline":
        return f"order {config.get('order')}"
    return str(config.get("criterion") or "")


def _title(run, config: dict) -> str:
    """One line that says what the run is: a variant's name, 'entropy scores', 'rank stability …'."""
    if config.get("name"):
        return str(config["name"])
    if run.kind == "score":
        return f"{config.get('criterion')} scores"
    if run.kind == "stability":
        return f"rank stability of {', '.join(config.get('criteria') or [])}"
    if run.kind == "pipeline":
        return f"pipeline {config.get('order')}"
    return run.kind


def describe(run, by_id: dict) -> dict:
    """A stored run as one row of the Runs table (no cell reads 'None'); ``by_id`` holds the other
    runs, so a recovery shows the cut it started from."""
    c = run.config
    source_run = by_id.get(c.get("source_run") or "")
    ratio = c.get("ratio", source_run.config.get("ratio") if source_run else None)
    metrics = run.results.get("metrics") or {}
    perplexity = metrics.get("perplexity") if isinstance(metrics, dict) else None
    return {"run": _title(run, c), "kind": run.kind, "created (UTC)": run.created_at[:16].replace("T", " "),
            "model": c.get("model") or "", "criterion / method": _method(run, c, source_run),
            "allocation": c.get("allocation") or (source_run.config.get("allocation") or "" if source_run else ""),
            "compensation": _compensation(c if run.kind != "recover" or not source_run else source_run.config),
            "ratio": f"{100 * float(ratio):g} %" if isinstance(ratio, (int, float)) else "",
            "data": _data(run, c), "perplexity": perplexity, "mine": "", "run id": run.run_id}


def runs_table(services: Services, mine_only: bool, me: str) -> pd.DataFrame:
    """Every stored run (this session's only, with ``mine_only``), newest first, one described row each."""
    runs = services.runs.list()
    by_id = {run.run_id: run for run in runs}
    rows = []
    for run in runs:
        if mine_only and run.config.get("session") != me:
            continue
        rows.append({**describe(run, by_id), "mine": "yes" if run.config.get("session") == me else ""})
    for row, value in zip(rows, distinct([r["perplexity"] for r in rows]), strict=True):
        row["perplexity"] = "" if value is None else value
    return pd.DataFrame(rows, columns=COLUMNS)


def run_choices(table: pd.DataFrame) -> list[tuple[str, str]]:
    """(label, run id) for the run picker: what the run is and when, not a bare id."""
    return [(f"{r['run']} · {r['kind']} · {r['model']} · {r['created (UTC)']}", r["run id"])
            for _, r in table.iterrows()]


def make_list(services: Services):
    def list_runs(mine_only: bool, request: gr.Request = None):
        table = runs_table(services, bool(mine_only), session_id(request))
        # nothing pre-selected: Delete needs a deliberate pick
        return table, gr.update(choices=run_choices(table), value=None)
    return list_runs


def make_details(services: Services):
    @user_errors
    def details(run_id: str | None) -> dict:
        if not run_id:
            return {}
        run = services.runs.load(run_id)
        results = {k: v for k, v in run.results.items() if k != "meta"}
        return {"config": run.config, "results": results, "files": sorted(p.name for p in run.folder.iterdir())}
    return details


def make_load(services: Services):
    @user_errors
    def load(run_id: str | None, request: gr.Request = None, progress=PLAIN) -> str:
        if not run_id:
            raise HFPruneError("Pick a run to load.")
        progress(0.2, desc=f"loading {run_id}")
        return services.load_run(services.sessions.get(session_id(request)), run_id)
    return load


def make_delete(services: Services):
    @user_errors
    def delete(run_id: str | None, mine_only: bool, request: gr.Request = None):
        if not run_id:
            raise HFPruneError("Pick a run to delete.")
        services.delete_run(run_id, services.sessions.get(session_id(request)))
        table, ids = make_list(services)(mine_only, request)
        return f"Deleted run `{run_id}`.", table, ids
    return delete


def build(ctx: Ctx) -> None:
    services = ctx.services
    with gr.Tab("Runs", id="runs") as tab:
        gr.Markdown(texts.RUNS, elem_classes="teach")
        with gr.Row():
            mine_only = gr.Checkbox(False, label="Only this session's runs")
            refresh = gr.Button("Refresh", size="sm")
        table = gr.Dataframe(label="Stored runs (newest first)", headers=COLUMNS, interactive=False, max_height=360)
        with gr.Row():
            run_id = gr.Dropdown([], value=None, allow_custom_value=True, label="Run", scale=3)
            load_button = gr.Button("Load into this session", variant="primary")
            delete_button = gr.Button("Delete", variant="stop")
        status = gr.Markdown("")
        details = gr.JSON(label="Run details")
    list_runs = make_list(services)
    refresh.click(list_runs, mine_only, [table, run_id], api_name="runs_list")
    for trigger in (tab.select, mine_only.input):
        trigger(list_runs, mine_only, [table, run_id], api_visibility="private")
    run_id.change(make_details(services), run_id, details, api_name="run_details")
    ctx.after(load_button.click(make_load(services), run_id, status, api_name="run_load", **model_events()))
    ctx.after(delete_button.click(make_delete(services), [run_id, mine_only], [status, table, run_id],
                                  api_name="run_delete", show_progress_on=status, **model_events()))
