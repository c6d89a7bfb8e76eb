"""The HTML report of a stored run: self-contained (plotly.js inlined, no external URL), with the
settings, histograms, widths, metrics and menus; bad paths and run kinds are one sentence."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import run_cli as cli

from core.errors import HFPruneError
from core.runs import RunStore
from core.studies.report import build_report, write_report


def outside_bundle(html: str) -> str:
    """The document without the inlined plotly.js (whose source mentions URLs it never fetches here)."""
    start = html.index('<script id="plotlyjs">')
    return html[:start] + html[html.index("</script>", start):]


@pytest.fixture
def store(tmp_path):
    store = RunStore(tmp_path / "runs")
    widths = [64, 64]
    scores = [torch.rand(64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    score = store.create("score", {"model": "tiny-llama", "criterion": "entropy", "source": "wiki", "samples": 2,
                                   "seq_len": 16, "seed": 0}, results={"seconds": 1.0}, scores=scores)
    kept = [s.argsort(descending=True)[:48].sort().values for s in scores]
    meta = {"original_intermediate_sizes": widths, "intermediate_sizes": [48, 48], "achieved_ratio": 0.25,
            "compensation": {"method": "none"}}
    prune = store.create("prune", {"model": "tiny-llama", "name": "entropy-25%", "criterion": "entropy",
                                   "ratio": 0.25, "scores_run": score.run_id},
                         results={"widths": [48, 48], "meta": meta}, kept=kept)
    store.ids = (score.run_id, prune.run_id)  # type: ignore[attr-defined]
    return store


def test_report_is_self_contained_with_plots_and_tables(store, tiny_loaded):
    _score_id, prune_id = store.ids
    html = build_report(prune_id, store=store, loaded=tiny_loaded("llama"), contexts=["The history of"],
                        eval_windows=1, eval_seq_len=16)
    rest = outside_bundle(html)
    assert len(html) > 3_000_000 and "Plotly.newPlot" in rest  # plotly.js itself is inside
    assert not re.search(r"https?://|//cdn|src=|href=|@import", rest), "the report must not fetch anything"
    for title in ("entropy: neuron importance per layer", "MLP width per layer", "Next-token distribution after"):
        assert title in rest
    assert rest.count('class="plot"') == 3  # histograms, widths, one menu
    for heading in ("Settings", "Importance scores", "Widths", "Metrics", "Next-token menus"):
        assert f"<h2>{heading}" in rest
    assert "kl_to_reference" in rest and "entropy-25%" in rest
    assert '"title":{"text":"layer"}' in rest.replace(" ", "")  # axis labels travel with every figure


def test_report_without_model_and_bad_input(store, tmp_path):
    score_id, prune_id = store.ids
    html = build_report(score_id, store=store)
    assert outside_bundle(html).count('class="plot"') == 1
    other = store.create("recover", {"model": "tiny-llama"})
    with pytest.raises(HFPruneError, match="reports are made for score and prune runs"):
        build_report(other.run_id, store=store)
    target = write_report(html, tmp_path / "r.html")
    with pytest.raises(HFPruneError, match="already exists"):
        write_report(html, target)
    with pytest.raises(HFPruneError, match="ending in .html"):
        write_report(html, tmp_path / "r.txt")
    with pytest.raises(HFPruneError, match="does not exist"):
        write_report(html, tmp_path / "nope" / "r.html")
    run = cli("report", "--run", prune_id, "--runs-root", str(store.root), "--out", str(tmp_path / "cli.html"),
              "--no-model")
    assert run.returncode == 0, run.stderr
    assert "MLP width per layer" in (tmp_path / "cli.html").read_text()
