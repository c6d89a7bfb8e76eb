"""The launched dashboard driven through ``gradio_client``, on the embedded real model.

One app per module (its own temporary run store); each ``Client`` is its own browser session.
Settings are tiny (2 windows × 32 tokens) so the whole module stays well under a minute of model work.
"""
from __future__ import annotations

import json
import math
import time

import pytest

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def app(launch_dashboard, tmp_path_factory):
    """(url, services) of a dashboard with its own run store, launched for this module."""
    yield from launch_dashboard(tmp_path_factory.mktemp("runs"))


MODEL = "smollm2-135m"
DATA = ["wiki", None, 2, 32, 0]  # source, upload, samples, seq_len, seed


def client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def plot(value) -> dict:
    """The plotly figure JSON inside a gr.Plot output."""
    assert value["type"] == "plotly", value
    return json.loads(value["plot"])


def test_binds_localhost_only(app):
    url, _ = app
    assert url.startswith("http://127.0.0.1:")


def test_score_prune_compare_end_to_end(app):
    url, services = app
    c = client(url)
    status = c.predict(MODEL, *DATA, api_name="/load_model")
    assert "30 layers" in status and "134.5 M parameters" in status

    out = c.predict(["entropy", "cross_entropy"], MODEL, *DATA, [], [], True, None, api_name="/score")
    status, hist, heat, table = out[:4]
    assert "entropy" in status and "cross_entropy" in status and "computed" in status
    hist_fig = plot(hist)
    names = [trace["name"] for trace in hist_fig["data"]]
    assert names == [f"{c} · layer {i}" for c in ("entropy", "cross_entropy") for i in (0, 15, 29)]
    assert all(sum(trace["y"]) == 1536 for trace in hist_fig["data"])  # every neuron lands in one bin
    heat_fig = plot(heat)
    z = heat_fig["data"][0]["z"]
    assert len(z) == 30 and len(z[0]) == 256  # 1536 sorted neurons resampled to 256 columns
    assert all(row[i] >= row[i + 1] for row in z for i in range(255))  # sorted high → low
    assert len(table["data"]) == 60  # 30 layers × 2 criteria

    # Scoring again is served from the cache, and a redraw needs no model.
    started = time.perf_counter()
    status = c.predict(["entropy"], MODEL, *DATA, ["3"], ["entropy"], False, "entropy", api_name="/score")[0]
    assert "cached" in status and time.perf_counter() - started < 5
    hist, _, _ = c.predict(["3"], ["cross_entropy"], True, "entropy", api_name="/redraw")
    assert [t["name"] for t in plot(hist)["data"]] == ["cross_entropy · layer 3"]

    text, scatter, rho_bars, overlap_bars = c.predict("entropy", "cross_entropy", 5, 0.3, MODEL, *DATA,
                                                      api_name="/compare_criteria")[:4]
    rho = float(text.split("ρ = **")[1].split("**")[0])
    assert 0.3 < rho < 1.0  # related but different criteria
    assert len(plot(rho_bars)["data"][0]["y"]) == 30
    assert all(0 <= v <= 1.0001 for v in plot(overlap_bars)["data"][0]["y"])

    preview_text, widths = c.predict("entropy", 0.3, "uniform", "1", MODEL, api_name="/prune_preview")
    assert "134.52 M → 110.62 M" in preview_text
    assert plot(widths)["data"][1]["y"] == [1075] * 30

    status, variants, _, trace = c.predict("entropy", 0.3, "uniform", "1", "ent30", MODEL, *DATA, api_name="/prune")
    assert "ent30" in status and "1075–1075" in status
    assert plot(trace)["data"] == []  # the trace plot only fills for the adaptive allocation
    run_id = status.split("run `")[1].split("`")[0]
    assert (services.runs.root / run_id).is_dir()

    html = c.predict(["ent30"], "The capital of France is", 6, 0.0, 0, 1.0, 0, api_name="/generate")
    assert "original" in html and "ent30" in html

    menu_fig, menu_text = c.predict(["ent30"], "The capital of France is", 8, api_name="/menu")
    bars = plot(menu_fig)["data"]
    assert [b["name"].split(" (")[0] for b in bars] == ["original", "ent30"]
    assert all(0 < sum(b["y"]) <= 1.0001 for b in bars)
    assert "Paris" in menu_text

    kl_html, kl_text = c.predict("ent30", "The quick brown fox jumps over the lazy dog.", api_name="/token_kl")
    values = [float(v) for v in kl_html.split("KL = ")[1:] for v in [v.split(" ")[0]]]
    assert len(values) >= 8 and all(v >= 0 for v in values) and max(v for v in values) > 0

    table, scatter = c.predict(["ent30"], 2, 32, api_name="/evaluate")
    rows = {r[0]: dict(zip(table["headers"], r)) for r in table["data"]}
    assert rows["original"]["KL to original"] is None
    assert math.isfinite(rows["original"]["perplexity"]) and rows["original"]["perplexity"] > 1
    assert rows["ent30"]["KL to original"] > 0 and rows["ent30"]["perplexity"] > rows["original"]["perplexity"]
    assert rows["ent30"]["params"] == 110616768
    assert [t["name"] for t in plot(scatter)["data"]] == ["original", "ent30"]

    table, lines = c.predict(["entropy", "cross_entropy"], "0.3, 0.1", "uniform", "1", 2, 32, "kl_to_dense",
                             api_name="/sweep")
    cells = {(r[0], r[1]): dict(zip(table["headers"], r)) for r in table["data"]}
    assert sorted(cells) == [("cross_entropy", "0.10"), ("cross_entropy", "0.30"), ("entropy", "0.10"),
                             ("entropy", "0.30")]
    for name in ("entropy", "cross_entropy"):
        assert 0 < cells[(name, "0.10")]["kl_to_dense"] < cells[(name, "0.30")]["kl_to_dense"]
    assert [t["name"] for t in plot(lines)["data"]] == ["entropy", "cross_entropy"]

    status = c.predict("ent30", "torchao-int8", api_name="/quantize")[0]
    assert "ent30+torchao-int8" in status
    table, pareto = c.predict(["ent30", "ent30+torchao-int8"], 32, 4, 1, api_name="/bench")
    rows = {r[0]: dict(zip(table["headers"], r)) for r in table["data"]}
    assert set(rows) == {"original", "ent30", "ent30+torchao-int8"}
    assert rows["ent30+torchao-int8"]["weights"] == "torchao-int8" and rows["ent30"]["weights"] == "fp32"
    assert rows["ent30+torchao-int8"]["weight MB"] < 0.6 * rows["ent30"]["weight MB"] < rows["original"]["weight MB"]
    assert all(r["prefill ms (1×N)"] > 0 and r["decode tok/s"] > 0 for r in rows.values())
    assert rows["ent30"]["ideal speed-up (FLOPs)"] > 1.0
    assert {t["name"] for t in plot(pareto)["data"]} >= {"original", "ent30", "ent30+torchao-int8"}
    zero = c.predict(["ent30"], ["wiki_nextsent"], 10, api_name="/zeroshot")
    accs = {r[0]: dict(zip(zero["headers"], r)) for r in zero["data"]}
    assert set(accs) == {"original", "ent30"} and all(a["wiki_nextsent n"] == 10 for a in accs.values())
    assert all(0 <= a["wiki_nextsent acc"] <= 1 for a in accs.values())

    listed, _ = c.predict(False, api_name="/runs_list")
    kinds = sorted(r[1] for r in listed["data"])
    assert kinds == ["prune", "score", "score"]


def test_sessions_do_not_see_each_other(app):
    from gradio_client.exceptions import AppError

    url, _ = app
    alice, bob = client(url), client(url)
    alice.predict(["entropy"], MODEL, *DATA, [], [], True, None, api_name="/score")
    alice.predict("entropy", 0.2, "uniform", "1", "alice-only", MODEL, *DATA, api_name="/prune")
    bob.predict(MODEL, *DATA, api_name="/load_model")
    with pytest.raises(AppError, match="No variant named 'alice-only'"):
        bob.predict(["alice-only"], "Hello", 3, api_name="/menu")
    mine, _ = bob.predict(True, api_name="/runs_list")
    assert mine["data"] == [] or all(row[-1] != "yes" for row in mine["data"])


def test_bad_input_is_a_clear_message_and_keeps_runs(app, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    url, services = app
    c = client(url)
    before = sorted(p.name for p in services.runs.root.iterdir())
    with pytest.raises(AppError, match="(?i)not.*found|unknown model|offline|no such"):
        c.predict("no-such-org/no-such-model-xyz", *DATA, api_name="/load_model")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(AppError, match="empty"):
        c.predict(MODEL, "upload", handle_file(str(empty)), 2, 32, 0, api_name="/load_model")
    with pytest.raises(AppError, match="after uploading"):
        c.predict(MODEL, "upload", None, 2, 32, 0, api_name="/load_model")
    c.predict(["entropy"], MODEL, *DATA, [], [], True, None, api_name="/score")
    with pytest.raises(AppError, match="greater than maximum value 0.95"):
        c.predict("entropy", 1.0, "uniform", "128", "too-far", MODEL, *DATA, api_name="/prune")
    with pytest.raises(AppError, match="Not scored yet: wanda"):
        c.predict(["entropy", "wanda"], "0.2", "uniform", "1", 2, 32, "kl_to_dense", api_name="/sweep")
    with pytest.raises(AppError, match="Ratios must be numbers"):
        c.predict(["entropy"], "0.2, lots", "uniform", "1", 2, 32, "kl_to_dense", api_name="/sweep")
    with pytest.raises(AppError, match=r"\[0, 1\)|between 0 and 1|0 ≤"):
        c.predict(["entropy"], "1.5", "uniform", "1", 2, 32, "kl_to_dense", api_name="/sweep")
    with pytest.raises(AppError, match="'original' names the unpruned model"):
        c.predict("entropy", 0.2, "uniform", "1", "original", MODEL, *DATA, api_name="/prune")
    after = sorted(p.name for p in services.runs.root.iterdir())
    assert set(before) <= set(after)
    assert len(after) - len(before) <= 1  # at most the new score run, never a failed prune

