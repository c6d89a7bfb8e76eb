"""Every action keeps its word on progress (issue 20, §3 and §5): one bar per action; Prune's bar weighs
its parts by their cost; the Tour's Recompute claims no time it has not measured and step 1 moves by
criterion; the inspector and the report export say what they are doing in words; uploads state the rule
before refusing, name the user's file and clear a refused one; the tabs sit in groups that fit one row;
nothing the dashboard runs draws a tqdm bar in the server's log. Tiny models only."""
from __future__ import annotations

import inspect
import json
import os
import re
import socket
import subprocess
import sys
import time

import gradio as gr
import pytest
import torch

from conftest import ROOT, make_tiny

from core.data.text import HELD_OUT_EVERY, MIN_PART_CHARS
from core.importance.criteria import parameter_knobs

DATA = ["wiki", None, 2, 32, 0]
CRIT = [cls.ui(field)["value"] for _c, cls, field in parameter_knobs()]  # every criterion knob at its default
SLOW_S = 0.04  # every forward through the tiny model's decoder stack waits this long: progress has time to show
BAR = re.compile(r"\d+%\|.*\|")  # a tqdm bar as it prints: ' 40%|████      | 2/5 [...]'


def slow(model: torch.nn.Module, seconds: float = SLOW_S) -> None:
    """Each decoder layer waits ``seconds`` / layers before its forward (a probe, a scoring window, a partial
    forward of the adaptive search all pay their share)."""
    layers = model.model.layers
    for layer in layers:
        layer.register_forward_pre_hook(lambda *_: time.sleep(seconds / len(layers)))


def watch(client, *args, api_name: str) -> tuple[object, list[tuple[str, float]]]:
    """Run an event through the queue; (its result, the distinct progress lines the page was sent)."""
    job = client.submit(*args, api_name=api_name)
    lines: list[tuple[str, float]] = []
    while not job.done():
        units = job.status().progress_data or []
        if units and units[0].desc and (not lines or units[0].desc != lines[-1][0]):
            lines.append((units[0].desc, float(units[0].progress or 0.0)))
        time.sleep(0.01)
    return job.result(), lines


def monotone(lines: list[tuple[str, float]]) -> bool:
    fractions = [f for _, f in lines]
    return fractions == sorted(fractions)


@pytest.fixture(scope="module")
def app(tmp_path_factory, real_tokenizer):
    """(client, services, model folder) of a launched dashboard on a slowed tiny llama; the Tour runs on it
    too, with no shipped scores (so step 1 and Recompute both score here)."""
    from gradio_client import Client

    from hfprune_ui import build_demo, launch_options, queue
    from hfprune_ui.services import Services
    from hfprune_ui.tabs import tour

    root = tmp_path_factory.mktemp("progress-app")
    make_tiny("llama", intermediate_size=64).save_pretrained(root / "tiny")
    real_tokenizer.save_pretrained(root / "tiny")
    (root / "no-assets").mkdir()
    spec = str(root / "tiny")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tour, "DEFAULT_MODEL", spec)
        patch.setattr(tour, "ASSETS", root / "no-assets")
        services = Services(runs_root=root / "runs")
        slow(services.model(spec).model)
        demo = queue(build_demo(services))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, **launch_options())
        try:
            yield Client(f"http://127.0.0.1:{port}/", verbose=False), services, spec
        finally:
            demo.close()


# -- one bar per action ----------------------------------------------------------------------------------
def takes_progress(fn) -> bool:
    try:
        return any(isinstance(p.default, gr.Progress) for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False


def test_every_action_draws_one_progress_bar(tiny_services):
    """Gradio draws a progress overlay on every output of an event unless told where: each event that runs a
    model or reports progress names exactly one output, and Prune, the sweep, Score and Evaluate name theirs."""
    from hfprune_ui import build_demo

    services, _session, _folder = tiny_services
    demo = build_demo(services)
    several = [fn for fn in demo.fns.values() if len(fn.outputs) > 1 and fn.show_progress != "hidden"
               and (fn.concurrency_id == "model" or takes_progress(fn.fn))]
    assert len(several) >= 20
    loose = [fn.api_name or fn.name for fn in several if not fn.show_progress_on or len(fn.show_progress_on) != 1]
    assert not loose, f"events that draw a progress bar on several outputs: {loose}"
    where = {fn.api_name: fn.show_progress_on[0].elem_id for fn in several}
    assert (where["prune"], where["sweep"], where["score"]) == ("prune-status", "sweep-table", "score-status")
    assert where["tour_score"] == "tour-1-out" and where["bench"] == "bench-table"
    assert where["evaluate"] == next(fn for fn in several if fn.api_name == "evaluate").outputs[0].elem_id


# -- the tabs, grouped --------------------------------------------------------------------------------------
def test_the_tabs_sit_in_groups_that_fit_one_row(tiny_services):
    """Tour first, then three groups of tabs and the run list: no row holds more than five tabs (twelve in
    one row overflowed into '⋯' at 1500 px). Showing a group re-runs the select handlers of its tabs, so
    the tab last open inside it is fresh (the Prune tab's variant table, Compare's variant list)."""
    from hfprune_ui import build_demo
    from hfprune_ui.layout import TAB_GROUPS

    services, _session, _folder = tiny_services
    demo = build_demo(services)
    config = demo.config
    by_id = {c["id"]: c for c in config["components"]}
    children = {}

    def walk(node: dict) -> None:
        children[node["id"]] = [child["id"] for child in node.get("children", [])]
        for child in node.get("children", []):
            walk(child)
    walk(config["layout"])
    top = next(i for i, c in by_id.items() if c["props"].get("elem_id") == "tab-groups")
    labels = [by_id[i]["props"]["label"] for i in children[top]]
    assert labels == ["Tour", *TAB_GROUPS, "Runs"]
    for group_id in children[top][1:-1]:
        inner = children[children[group_id][0]]  # the group's own row of tabs
        names = [by_id[i]["props"]["label"] for i in inner]
        assert names == list(TAB_GROUPS[by_id[group_id]["props"]["label"]]) and len(names) <= 5
    every = [label for row in TAB_GROUPS.values() for label in row]
    assert len(every) + 2 >= 13 and len(set(every)) == len(every)

    outputs_on = {}
    for dep in config["dependencies"]:
        for block, event in dep["targets"]:
            if event == "select":
                outputs_on.setdefault(block, set()).update(dep["outputs"])
    ids = {c["props"].get("elem_id"): c["id"] for c in config["components"] if c["props"].get("elem_id")}
    cut, measure = ids["group-cut"], ids["group-measure"]
    assert ids["variants-table"] in outputs_on[cut] and ids["compare-variants"] in outputs_on[measure]
    prune_tab = next(i for i, c in by_id.items() if c["type"] == "tabitem" and c["props"].get("id") == "prune")
    assert outputs_on[prune_tab] <= outputs_on[cut]


# -- Prune: parts weighed by their cost --------------------------------------------------------------------
def test_job_progress_weighs_its_stages_and_replans_without_going_back():
    from hfprune_ui.progress import JobProgress

    job = JobProgress(None, "Prune", unit="step", weights=[0.0, 6.0, 2.0, 2.0])
    job.stage(0, "scores")
    assert job.fraction(0.5) == 0.0  # cached scores weigh nothing
    job.stage(1, "adaptive search")
    assert job.fraction(0.5) == pytest.approx(0.3)
    job.stage(3, "quality at a glance")
    assert job.fraction(0.0) == pytest.approx(0.8)
    loading = JobProgress(None, "Prune", stages=1)
    loading.stage(0, "loading")
    loading.fraction(0.4)
    loading.replan([1.0, 3.0], estimate_s=8.0)  # the model is loaded: the real parts share what is left
    assert loading.fraction(0.0) == pytest.approx(0.4)
    loading.stage(1)
    assert loading.fraction(0.5) == pytest.approx(0.4 + 0.6 * (0.25 + 0.75 * 0.5))
    assert loading.estimate_s == pytest.approx(8.0, abs=0.5)


def test_prune_moves_by_the_cost_of_each_part(app):
    """An adaptive prune of cached scores with a refit: the scoring part takes none of the bar, the search
    and the refit their estimated shares, and the bar never goes back."""
    c, services, spec = app
    c.predict(spec, *DATA, api_name="/load_model")
    c.predict(["entropy"], spec, *DATA, *CRIT, [], [], True, None, api_name="/score")
    session = next(s for s in services.sessions._sessions.values() if s.scores)
    data = session.calibration
    knobs = {"halvings": 2, "heldout_samples": 2, "heldout_seq_len": 32, "fidelity": "kl"}
    seconds = services.prune_seconds(session, spec, data, "entropy", "adaptive", adaptive=knobs, compensate_windows=4)
    assert seconds["scores"] == 0.0 and seconds["widths"] > 0 and seconds["refit"] > 0
    total = sum(seconds.values())
    (status, *_), lines = watch(c, "entropy", 0.3, "adaptive", "1", True, 4, "weighted", spec, *DATA, *CRIT,
                                2, 2, 32, "kl", api_name="/prune")
    assert "Pruned **weighted**" in status
    assert lines and monotone(lines), lines
    first = {}
    for text, fraction in lines:
        for label in ("adaptive search", "least-squares refit", "quality at a glance"):
            if f"({label})" in text:
                first.setdefault(label, fraction)
    assert set(first) == {"adaptive search", "least-squares refit", "quality at a glance"}, lines
    # each part starts where the estimated cost of the parts before it ends (the equal thirds said 33 % and 67 %)
    assert first["adaptive search"] < 0.05
    assert first["least-squares refit"] == pytest.approx(seconds["widths"] / total, abs=0.1)
    assert first["quality at a glance"] == pytest.approx(1 - seconds["quality"] / total, abs=0.1)
    assert all(" left" in text for text, _ in lines[1:]), lines


# -- the Tour's step 1 and its Recompute ----------------------------------------------------------------
def test_tour_step_1_moves_by_criterion_and_recompute_claims_only_what_it_measured(app):
    from hfprune_ui import build_demo

    c, services, spec = app
    labels = [b.value for b in build_demo(services).blocks.values() if isinstance(b, gr.Button)]
    recompute = next(v for v in labels if v.startswith("Recompute the scores"))
    assert not re.search(r"\d+\s*(s|min)\b", recompute), recompute  # no time it has not measured
    (text, estimate), lines = watch(c, api_name="/tour_recompute")
    assert "computed on this machine in" in text
    assert estimate.startswith("*Recompute*: both scores were computed on this machine already")
    assert monotone(lines), lines
    entropy = [f for t, f in lines if "scores for entropy" in t]
    cross = [f for t, f in lines if "scores for cross_entropy" in t]
    assert entropy and cross and max(entropy) <= min(cross)
    assert min(cross) == pytest.approx(0.5, abs=0.1)  # both cost a forward and a backward: half each
    assert all(not re.search(r"\d+/\d+", t) for t, _ in lines), lines  # words, not a raw 'i/n'
    # a fresh session, scores cached: the estimate is from a probe timed now, of a scoring that is cached
    from gradio_client import Client

    other = Client(c.src, verbose=False)
    _text, estimate = other.predict(api_name="/tour_score")
    assert "instant" in estimate


# -- the inspector and the report export ---------------------------------------------------------------
def test_the_inspector_and_the_report_say_what_they_do(app):
    c, services, spec = app
    c.predict(spec, "wiki", None, 8, 32, 0, api_name="/load_model")
    (status, *_), lines = watch(c, 0, 5, 8, spec, "wiki", None, 8, 32, 0, api_name="/inspect_neuron")
    assert "Layer 0, neuron 5" in status
    assert monotone(lines) and any(0.0 < f < 1.0 for _, f in lines), lines  # not stuck at '0 % estimating'
    assert any("activations over" in t for t, _ in lines) and any("removing the neuron" in t for t, _ in lines)
    # the report: its steps in words (its run list fills when the tab is shown, so the handler is fed here
    # the way the tab feeds it), and the engine's own bars off — no raw '0/1 batch'
    from core.studies.report import REPORT_STEPS
    from hfprune_ui.progress import JobProgress
    from hfprune_ui.tabs.inspect import REPORT_WEIGHTS

    c.predict(["entropy"], spec, *DATA, *CRIT, [], [], True, None, api_name="/score")
    c.predict("entropy", 0.25, "uniform", "1", True, 4, "for-report", spec, *DATA, *CRIT, api_name="/prune")
    run = next(r for r in services.runs.list() if r.kind == "prune" and r.config.get("name") == "for-report")
    tracker = JobProgress(None, "Report", unit="step", weights=REPORT_WEIGHTS)
    steps, shown = [], []

    def step(k: int, what: str) -> None:
        steps.append((k, what))
        tracker.stage(k, what)
        shown.append(tracker.line(0.0, ""))
    _html, path = services.export_report(run.run_id, ["The history of"], on_step=step)
    assert path.suffix == ".html" and steps == list(enumerate(REPORT_STEPS))  # rebuilt, menus, measured, written
    assert [line.split(" · ")[1] for line in shown] == [f"step {k + 1} of 4 ({w})" for k, w in steps]
    assert [int(line.split(" · ")[2].rstrip(" %")) for line in shown] == [0, 33, 50, 83]


# -- uploads -----------------------------------------------------------------------------------------------
def test_uploads_state_the_rule_name_the_users_file_and_clear_a_refused_one(app, tmp_path):
    from gradio_client import handle_file

    from hfprune_ui import build_demo

    c, services, spec = app
    minimum = f"{HELD_OUT_EVERY * MIN_PART_CHARS:,} characters"
    notes = [b for b in build_demo(services).blocks.values() if getattr(b, "elem_id", None) == "upload-note"]
    assert notes and minimum in notes[0].value  # stated before any file is refused
    short = tmp_path / "my-short-notes.txt"
    short.write_text("Too short to split. " * 20)
    kept, note = c.predict(handle_file(str(short)), api_name="/check_upload")
    assert kept is None  # the refused file's name leaves the widget
    assert note.startswith("**my-short-notes.txt was not kept**") and "too short" in note and minimum in note
    good = tmp_path / "class-notes.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"Note {i}: " + "the river runs past the old mill. " * 12})
                              for i in range(12)))
    kept, note = c.predict(handle_file(str(good)), api_name="/check_upload")
    assert kept is not None and note.startswith("**class-notes.jsonl, split by document: 9 documents")
    status = c.predict(spec, "upload", handle_file(str(good)), 2, 32, 0, api_name="/load_model")
    digest = re.compile(r"\b[0-9a-f]{16}\.jsonl")
    assert "Text: class-notes.jsonl, split by document" in status and not digest.search(status), status


# -- no tqdm bars in the server's log ------------------------------------------------------------------
def test_the_engine_draws_no_bar_outside_a_tracked_event(tiny_services, capfd):
    """Services called outside a Gradio event (a handler without a tracked progress, a worker, a test)
    pass progress=False: scoring, a refit rebuilt from a stored run, evaluation, a sweep, a report."""
    services, session, folder = tiny_services
    capfd.readouterr()
    services.score(session, str(folder), services.data_spec("wiki", None, 2, 16, 0), "cross_entropy")
    variant, _ = services.prune(session, "entropy", 0.25, "uniform", 1, "", compensate_windows=2)
    session.drop_variant(variant.name)
    services.load_run(session, variant.run_id)  # the refit is redone from the stored run
    services.evaluate_variants(session, list(session.variants), 1, 16)
    list(services.sweep(session, ["entropy"], [0.2], "uniform", 1, 1, 16))
    services.export_report(variant.run_id, ["The history of"])
    err = capfd.readouterr().err
    assert not BAR.search(err), err[-2000:]


def test_the_app_after_a_restart_prints_no_bar(tmp_path, real_tokenizer):
    """``python app.py`` restarted on a run store that holds a refitted prune: loading that run (its model
    loaded, its refit redone), scoring and pruning with a refit leave no tqdm bar in the server's log."""
    from gradio_client import Client

    from hfprune_ui.services import Services

    folder = tmp_path / "tiny"
    make_tiny("llama", intermediate_size=64).save_pretrained(folder)
    real_tokenizer.save_pretrained(folder)
    before = Services(runs_root=tmp_path / "runs")  # the first life of the server: a refitted prune stored
    session = before.sessions.get("local")
    before.score(session, str(folder), before.data_spec("wiki", None, 2, 16, 0), "entropy")
    run_id = before.prune(session, "entropy", 0.25, "uniform", 1, "", compensate_windows=2)[0].run_id
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIO_SERVER_")}
    env.update(HF_HUB_OFFLINE="1", HFPRUNE_RUNS=str(tmp_path / "runs"))
    log_path = tmp_path / "app.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            client = None
            deadline = time.time() + 240
            while client is None and time.time() < deadline and proc.poll() is None:
                try:
                    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                except Exception:  # noqa: BLE001 - not serving yet
                    time.sleep(1)
            assert client is not None, log_path.read_text()[-2000:]
            assert "Loaded pruned variant" in client.predict(run_id, api_name="/run_load")
            client.predict(["cross_entropy"], str(folder), *DATA, *CRIT, [], [], True, None, api_name="/score")
            client.predict("cross_entropy", 0.25, "uniform", "1", True, 4, "", str(folder), *DATA, *CRIT,
                           api_name="/prune")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    text = log_path.read_text()
    assert not BAR.search(text) and "Loading weights" not in text, text[-3000:]
