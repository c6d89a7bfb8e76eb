"""The HTML report of a stored run: self-contained (plotly.js inlined, no external URL), with the
settings, histograms, widths, metrics and menus; bad paths and run kinds are one sentence."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import run_cli as cli

from core.errors import HFPruneError
from core.paths import ASSETS
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


def test_report_says_where_scores_and_perplexity_come_from(store, tiny_loaded):
    """Issue 20: a pruning made from the Tour's shipped scores reads them from assets/tour (not 'no longer
    stored'), and every metrics row names the held-out windows it was measured on."""
    shipped = "smollm2-135m_entropy_wiki_8x64_seed0.safetensors"
    assert (ASSETS / "tour" / shipped).is_file()
    score_id, prune_id = store.ids
    base = store.load(prune_id)
    tour = store.create("prune", {**{k: v for k, v in base.config.items() if k != "scores_run"},
                                  "scores_precomputed": shipped},
                        results={**base.results, "metrics": {"perplexity": 91.6, "windows": 4, "seq_len": 64}},
                        kept=base.kept())
    rest = outside_bundle(build_report(tour.run_id, store=store))
    assert f"shipped precomputed scores (assets/tour/{shipped})" in rest and "no longer stored" not in rest
    assert "entropy: neuron importance per layer" in rest  # their histograms are drawn
    assert "<td>4 × 64 tokens</td>" in rest and "these are the same windows as the dashboard's quality at a glance" \
        in rest
    gone = store.create("prune", {**tour.config, "scores_precomputed": "missing.safetensors"}, results=base.results,
                        kept=base.kept())
    rest = outside_bundle(build_report(gone.run_id, store=store))
    assert "This pruning used the shipped precomputed scores (assets/tour/missing.safetensors)" in rest
    assert "not in this checkout" in rest and "no longer stored" not in rest
    store.delete(score_id)
    assert "The score run behind this pruning is no longer stored." in outside_bundle(build_report(prune_id,
                                                                                                   store=store))
    html = build_report(prune_id, store=store, loaded=tiny_loaded("llama"), contexts=["The"], eval_windows=1,
                        eval_seq_len=16)
    rest = outside_bundle(html)
    assert "<td>1 × 16 tokens of wiki</td>" in rest and "Measured on 1 × 16 held-out tokens" in rest
    assert "uses 4 × 64 tokens, so its perplexity differs from these" in rest


def test_a_prune_of_shipped_scores_records_their_file(tiny_services, tmp_path):
    from hfprune_ui.services import tour_file

    services, session, folder = tiny_services
    data = session.data
    shipped = tmp_path / "tour"
    shipped.mkdir()
    session.scores["entropy"].save(shipped / tour_file(str(folder), data, "entropy"))
    assert services.tour_scores(session, str(folder), data, ["entropy"], shipped) == {"entropy": "precomputed"}
    variant, _ = services.prune(session, "entropy", 0.25, "uniform", 1, "from-shipped")
    config = services.runs.load(variant.run_id).config
    assert config["scores_precomputed"] == tour_file(str(folder), data, "entropy") and not config["scores_run"]
    rest = outside_bundle(build_report(variant.run_id, store=services.runs))
    assert "This pruning used the shipped precomputed scores (assets/tour/" in rest and "no longer" not in rest
