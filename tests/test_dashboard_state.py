"""Dashboard state and plumbing without a model (issue 10): notices when scores are set aside, the
variant limit with a chosen replacement, the status line, errors as toasts, the progress line, the
layer-list message. Fast: no model is loaded."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import gradio as gr
import pytest
import torch

from core.errors import PruneConfigError, Stopped
from core.methods.oneshot import ScoreResult
from hfprune_ui import guard
from hfprune_ui.progress import JobProgress, duration, eta_text
from hfprune_ui.state import MAX_VARIANTS_PER_SESSION, DataSpec, Session, Variant
from hfprune_ui.status import count, status_markdown
from hfprune_ui.tabs.importance import pick_layers

WIKI = DataSpec("wiki", "wiki", 8, 64, 0)


def scores() -> ScoreResult:
    return ScoreResult([torch.rand(8)], {"criterion": "entropy"}, 1.0)


def variant(name: str) -> Variant:
    return Variant(name, "m", torch.nn.Linear(1, 1), [6], {"criterion": "entropy", "ratio": 0.2})


def test_changing_the_data_sets_scores_aside_and_says_so():
    session = Session("s")
    session.set_context("m", WIKI)
    session.scores["entropy"] = scores()
    session.set_context("m", DataSpec("wiki", "wiki", 8, 64, 1))
    assert not session.scores
    [notice] = session.take_notices()
    assert notice.startswith("Scores for entropy were set aside because the calibration data changed (seed 0 → 1)")
    assert session.take_notices() == [] and "seed 0 → 1" in session.set_aside  # toast once, status line keeps it
    upload = DataSpec("/x/abc.txt", "upload:notes.txt#abc", 4, 32, 1)
    assert WIKI.changes(upload) == "source wiki → notes.txt, windows 8 → 4, tokens per window 64 → 32, seed 0 → 1"


def test_a_full_session_replaces_the_chosen_variant_and_says_so():
    session = Session("s")
    names = [f"v{i}" for i in range(MAX_VARIANTS_PER_SESSION)]
    for name in names:
        assert session.add_variant(variant(name)) is None
    assert session.next_to_drop() == "v0"  # the oldest by default
    session.replace = "v2"
    assert session.next_to_drop() == "v2"
    assert session.add_variant(variant("new")) == "v2"
    assert list(session.variants) == ["v0", "v1", "v3", "new"] and session.replace is None
    assert "'v2' was dropped to make room for 'new'" in session.take_notices()[0]
    session.drop_variant("v0")
    assert session.next_to_drop() is None


def test_status_line_names_model_data_scores_and_variants():
    services = SimpleNamespace(models=SimpleNamespace(cached=lambda spec: False))
    session = Session("s")
    assert "Nothing loaded yet" in status_markdown(services, session)
    session.set_context("smollm2-135m", WIKI)
    precomputed = scores()
    precomputed.config["precomputed"] = True
    session.scores.update({"entropy": precomputed, "cross_entropy": scores()})
    for name in ("a", "b", "c", "d"):
        session.add_variant(variant(name))
    line = status_markdown(services, session)
    assert "**Model** smollm2-135m" in line and "**Data** wiki, 8 × 64 tokens, seed 0" in line
    assert "**Scored** entropy (precomputed), cross_entropy" in line
    assert "**Variants** 4 of 4: a, b, c, d — full: the next one replaces **a**" in line


def test_numbers_are_formatted_for_people():
    assert [count(134515008), count(110616768), count(1536), count(2.5e9), count(None)] == \
        ["134.5 M", "110.6 M", "1,536", "2.5 B", "—"]
    assert duration(45) == "45 s" and duration(200) == "3 min 20 s" and duration(3900) == "1 h 05 min"
    assert eta_text(0.01, 30) == "estimating time left" and eta_text(0.5, 30) == "about 30 s left"


def test_progress_line_says_stage_work_and_time_left():
    job = JobProgress(None, "Measure", stages=3)  # outside an event: nothing is sent, the text still forms
    job.stage(1, "ent30")
    job.started = time.monotonic() - 20
    line = job.line(0.5, "decode repeat 3/6")
    assert line.startswith("Measure · model 2 of 3 (ent30) · decode repeat 3/6 · 50 %")
    assert line.endswith("about 20 s left")


def test_layer_lists_with_bad_entries_get_a_message():
    assert pick_layers(["1", "5"], 30) == ([1, 5], "")
    assert pick_layers([], 30) == ([0, 15, 29], "")
    layers, message = pick_layers(["3", "40", "x"], 30)
    assert layers == [3]
    assert message == "'40', 'x' are not layers of this model (layers are 0–29); showing layers 3."


def _request(api: bool):
    return SimpleNamespace(session_hash="sid-" + str(api), headers={"x-gradio-user": "api"} if api else {})


def test_errors_are_toasts_in_the_browser_and_errors_for_api_clients(monkeypatch):
    shown = []
    monkeypatch.setattr(gr, "Warning", lambda text, *a, **k: shown.append(("warning", text)))
    monkeypatch.setattr(gr, "Info", lambda text, *a, **k: shown.append(("info", text)))
    gr_request = type("Req", (), {})
    monkeypatch.setattr(gr, "Request", gr_request)  # the guard finds the request by type

    @guard.user_errors
    def handler(value, request=None):
        raise PruneConfigError(f"Ratio must be in [0, 1), got {value}.")

    def request(api):
        r = gr_request()
        r.session_hash, r.headers = _request(api).session_hash, _request(api).headers
        return r

    assert handler(2, request=request(False)) == gr.skip()  # outputs untouched, inputs stay usable
    assert shown == [("warning", "Ratio must be in [0, 1), got 2.")]
    with pytest.raises(gr.Error, match="Ratio must be in"):
        handler(2, request=request(True))

    @guard.user_errors
    def rows(request=None):
        yield 1
        raise Stopped("The sweep was stopped.")

    assert list(rows(request=request(False))) == [1]  # rows already yielded stay
    assert shown[-1] == ("info", "Stopped: The sweep was stopped. Nothing half-done was stored.")


def test_activity_lets_stop_wait_for_the_work_to_end():
    activity = guard.Activity()
    activity.begin("s")
    assert activity.busy("s") and not activity.wait_idle("s", 0.05)
    threading.Timer(0.1, activity.end, args=("s",)).start()
    started = time.monotonic()
    assert activity.wait_idle("s", 5) and time.monotonic() - started < 2
    assert not activity.busy("s")
