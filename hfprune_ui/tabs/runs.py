"""Tab 6 — Runs: every stored scoring / pruning run, reloadable after a restart, deletable."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core.errors import HFPruneError

from .. import texts
from ..context import PLAIN, Ctx, model_events
from ..guard import session_id, user_errors
from ..services import Services

COLUMNS = ["run id", "kind", "name", "created (UTC)", "model", "criterion", "allocation", "compensation", "ratio",
           "calibration", "perplexity", "mine"]


def _compensation(config: dict) -> str:
    """'lsq (64 windows)' / 'none' / '' for runs that do not prune."""
    value = config.get("compensation")
    if not isinstance(value, dict):
        return ""
    method = value.get("method", "none")
    return f"{method} ({value.get('samples')} windows)" if method != "none" else "none"


def runs_table(services: Services, mine_only: bool, me: str) -> pd.DataFrame:
    rows = []
    for run in services.runs.list():
        c, r = run.config, run.results
        if mine_only and c.get("session") != me:
            continue
        metrics = r.get("metrics") or {}
        source = str(c.get("source") or "")
        source = source[len("upload:"):].rsplit("#", 1)[0] if source.startswith("upload:") else source
        perplexity = metrics.get("perplexity") if isinstance(metrics, dict) else None
        rows.append({"run id": run.run_id, "kind": run.kind, "name": c.get("name") or "",
                     "created (UTC)": run.created_at[:19].replace("T", " "), "model": c.get("model"),
                     "criterion": c.get("criterion"), "allocation": c.get("allocation") or "",
                     "compensation": _compensation(c), "ratio": c.get("ratio", ""),
                     "calibration": f"{source}, {c.get('samples')} × {c.get('seq_len')}, seed {c.get('seed', 0)}",
                     "perplexity": round(perplexity, 3) if perplexity is not None else "",
                     "mine": "yes" if c.get("session") == me else ""})
    return pd.DataFrame(rows, columns=COLUMNS)


def make_list(services: Services):
    def list_runs(mine_only: bool, request: gr.Request = None):
        table = runs_table(services, bool(mine_only), session_id(request))
        ids = table["run id"].tolist()
        return table, gr.update(choices=ids, value=None)  # nothing pre-selected: Delete needs a deliberate pick
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
        table = gr.Dataframe(label="Stored runs (newest first)", interactive=False, max_height=360)
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
                                  api_name="run_delete", **model_events()))
