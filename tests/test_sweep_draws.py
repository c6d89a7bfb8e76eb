"""The sweep's optional KL error bars over K disjoint calibration draws (issue 16, item 2): the
dashboard's rows equal the engine's ``fidelity_over_draws`` on the same draws, K = 1 is the plain
sweep unchanged, bad K is one sentence that runs and stores nothing, and the figure draws error bars."""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import make_tiny

from core.data.text import evaluation_windows
from core.errors import SelectionError, Stopped
from core.studies.stability import StabilityOptions, draw_windows, fidelity_over_draws, score_draws
from core.studies.sweep import fidelity_sweep
from hfprune_ui import figures
from hfprune_ui.services import BASELINE
from hfprune_ui.tabs.prune import make_sweep

RATIOS = [0.2, 0.5]
EVAL = {"windows": 2, "seq_len": 16}


def _scored_services(folder, runs):
    """A Services on the tiny llama in ``folder`` with its entropy scores on 2 wiki windows × 16 tokens."""
    from hfprune_ui.services import Services

    services = Services(runs_root=runs)
    session = services.sessions.get("local")
    services.score(session, str(folder), services.data_spec("wiki", None, 2, 16, 0), "entropy")
    return services, session


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, real_tokenizer):
    """The tests/conftest.py ``tiny_services`` model (tiny llama, MLP width 64, the real tokenizer),
    saved once for this module."""
    folder = tmp_path_factory.mktemp("sweep-draws") / "tiny"
    make_tiny("llama", intermediate_size=64).save_pretrained(folder)
    real_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scored(tiny_folder):
    """One Services shared by the tests that do not count scoring passes (saves a setup each)."""
    return _scored_services(tiny_folder, tiny_folder.parent / "runs")


@pytest.fixture
def fresh(tiny_folder, tmp_path):
    """A Services of its own: nothing of another test in its score cache."""
    return _scored_services(tiny_folder, tmp_path / "runs")


def _ids(services, session):
    loaded = services.model(session.model_spec)
    return loaded, evaluation_windows(loaded.tokenizer, "wiki", EVAL["windows"], EVAL["seq_len"],
                                      max_length=loaded.max_length)


def test_three_draws_equal_the_engine_on_the_same_draws(fresh):
    services, session = fresh
    announced = []
    rows = list(services.sweep(session, ["entropy"], RATIOS, "uniform", 1, **EVAL, draws=3,
                               on_draw=lambda name, k, count: announced.append((name, k, count))))
    assert announced == [("entropy", 1, 3), ("entropy", 2, 3)]  # draw 0 is the session's own scores
    assert [(r["criterion"], r["ratio"], r["draws"]) for r in rows] == [("entropy", 0.2, 3), ("entropy", 0.5, 3)]

    draws = services.draw_scores(session, ["entropy"], 3, on_draw=lambda *a: announced.append(a))
    assert len(announced) == 2, "the draws are cached: asking again scores nothing"
    assert draws["entropy"][0].scores is session.scores["entropy"].scores
    # draw k ≥ 1 is the criterion on the k-th disjoint window set of the session's data
    loaded, ids = _ids(services, session)
    windows = draw_windows(loaded, StabilityOptions(draws=3, samples=2, seq_len=16, seed=0, source="wiki"))
    again = score_draws(loaded, ["entropy"], [windows[2]], batch_size=1)["entropy"][0]
    assert all((a == b).all() for a, b in zip(again, draws["entropy"][2].scores, strict=True))

    direct = fidelity_over_draws(loaded, {"entropy": [r.scores for r in draws["entropy"]]}, RATIOS, ids)
    for mine, theirs in zip(rows, direct, strict=True):
        assert mine["ratio"] == theirs["ratio"]
        for key in ("kl_mean", "kl_std", "kl_min", "kl_max"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-6)
        assert mine["kl_to_dense"] == mine["kl_mean"]
        assert mine["kl_std"] > 0
        mean = sum(mine["kl_draws"]) / 3
        assert mine["kl_std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in mine["kl_draws"]) / 2))
    # an independent path: the plain sweep with draw 1's scores gives that draw's KL
    single = list(fidelity_sweep(loaded, {"entropy": draws["entropy"][1]}, RATIOS, ids))
    assert [r["kl_to_dense"] for r in single] == pytest.approx([r["kl_draws"][1] for r in rows], abs=1e-6)


def test_one_draw_is_the_plain_sweep(scored):
    services, session = scored
    before = list(services.sweep(session, ["entropy"], RATIOS, "uniform", 1, **EVAL, baseline=True))
    one = list(services.sweep(session, ["entropy"], RATIOS, "uniform", 1, **EVAL, baseline=True, draws=1))
    assert one == before
    assert all("kl_std" not in r and "draws" not in r for r in one)
    assert [r["criterion"] for r in one] == ["entropy", "entropy", BASELINE, BASELINE]
    # K = 3's draw 0 is exactly the K = 1 row (same scores, same windows), the baseline's too
    three = list(services.sweep(session, ["entropy"], RATIOS, "uniform", 1, **EVAL, baseline=True, draws=3))
    assert [r["kl_draws"][0] for r in three] == pytest.approx([r["kl_to_dense"] for r in one], abs=1e-6)
    assert three[-1]["criterion"] == BASELINE and three[-1]["kl_std"] > 0  # random seeds seed + k
    figure = figures.sweep_lines(one)
    assert all(trace.error_y.array is None for trace in figure.data)


def test_lsq_over_draws_reuses_the_refit_statistics(scored):
    services, session = scored
    plain = list(services.sweep(session, ["entropy"], [0.5], "uniform+lsq", 1, **EVAL, compensate_windows=2))
    two = list(services.sweep(session, ["entropy"], [0.5], "uniform+lsq", 1, **EVAL, compensate_windows=2,
                              draws=2))
    assert two[0]["allocation"] == "uniform+lsq" and two[0]["draws"] == 2
    assert two[0]["kl_draws"][0] == pytest.approx(plain[0]["kl_to_dense"], abs=1e-6)


@pytest.mark.parametrize("draws, allocation", [(0, "uniform"), (9, "uniform"), (2.5, "uniform"), (2, "adaptive")])
def test_bad_draws_is_one_sentence_and_stores_nothing(scored, draws, allocation):
    services, session = scored
    runs, cached = len(services.runs.list()), len(services.scores._scores)
    with pytest.raises(SelectionError) as caught:
        next(services.sweep(session, ["entropy"], RATIOS, allocation, 1, **EVAL, draws=draws))
    text = str(caught.value)
    assert "\n" not in text and text.endswith(".") and text.count(". ") == 0
    assert (len(services.runs.list()), len(services.scores._scores)) == (runs, cached)
    # the dashboard: a toast (the handler yields nothing, the outputs stay as they were)
    assert list(make_sweep(services)(["entropy"], "0.2", allocation, "1", 2, 16, "kl_to_dense", 64, True,
                                     draws)) == []


def test_stop_before_a_draw_is_scored_stores_nothing(fresh):
    services, session = fresh
    cached = len(services.scores._scores)
    with pytest.raises(Stopped):
        next(services.sweep(session, ["entropy"], RATIOS, "uniform", 1, **EVAL, draws=2, stop=lambda: True))
    assert len(services.scores._scores) == cached


def test_the_lock_is_free_between_rows_over_draws(scored):
    services, session = scored
    rows = services.sweep(session, ["entropy"], RATIOS, "uniform", 1, **EVAL, draws=2)
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(next, rows).result(timeout=120)
    assert first["draws"] == 2
    free = threading.Event()

    def probe():
        if services.model_lock.acquire(timeout=5):
            services.model_lock.release()
            free.set()

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(probe).result()
    assert free.is_set(), "the lock is held while the sweep over draws waits at a yield"
    rows.close()


def test_dashboard_handler_table_and_error_bars(scored):
    services, session = scored
    handler = make_sweep(services)
    outputs = list(handler(["entropy"], "0.2, 0.5", "uniform", "1", 2, 16, "kl_to_dense", 64, True, 3))
    table, figure, note = outputs[-1]
    assert list(table["criterion"]) == ["entropy", "entropy", BASELINE, BASELINE]
    assert list(table["draws"]) == [3] * 4
    assert all(" ± " in cell for cell in table["KL to dense (mean ± std)"])
    assert all(len(cell.split(", ")) == 3 for cell in table["KL per draw"])
    assert note.startswith("4 of 4 rows measured") and "mean ± std over 3 disjoint calibration draws" in note
    for trace in figure.data:  # the bars are the table's std (shown to 4 decimals), the points its mean
        mine = table[table["criterion"] == trace.name]
        shown = [[float(v) for v in cell.split(" ± ")] for cell in mine["KL to dense (mean ± std)"]]
        assert list(trace.y) == pytest.approx([m for m, _ in shown], abs=6e-5)
        assert list(trace.error_y.array) == pytest.approx([s for _, s in shown], abs=6e-5)
        assert trace.error_y.visible and trace.error_y.type == "data"
        assert all(s > 0 for s in trace.error_y.array)
    assert "± 1 std over 3 calibration draws" in figure.layout.title.text


def test_refit_sweep_on_uploaded_text_reads_the_file(tiny_services, tmp_path):
    """Scores of an uploaded file carry the file's label as their source; the ``+lsq`` sweep must still
    compute its refit statistics on the file itself (not on the label)."""
    services, session, folder = tiny_services
    text = tmp_path / "notes.txt"
    text.write_text(" ".join(f"Sentence {i} tells about rivers, towns and the weather of the valley." for i in range(400)))
    data = services.data_spec("upload", str(text), 2, 16, 0)
    assert data.label.startswith("upload:notes.txt#")
    services.score(session, str(folder), data, "entropy")
    rows = list(services.sweep(session, ["entropy"], [0.25], "uniform+lsq", 1, 2, 16, compensate_windows=4))
    assert len(rows) == 1 and rows[0]["allocation"] == "uniform+lsq" and math.isfinite(rows[0]["kl_to_dense"])
