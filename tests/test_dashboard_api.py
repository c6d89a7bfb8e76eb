"""The launched dashboard driven through ``gradio_client``, on the embedded real model.

One app per module (its own temporary run store); each ``Client`` is its own browser session.
Settings are tiny (2 windows × 32 tokens) so the whole module stays well under a minute of model work.
"""
from __future__ import annotations

import json
import math
import re
import time
import zipfile

import pytest

from core.importance.criteria import parameter_knobs

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def app(launch_dashboard, tmp_path_factory):
    """(url, services) of a dashboard with its own run store, launched for this module."""
    yield from launch_dashboard(tmp_path_factory.mktemp("runs"))


MODEL = "smollm2-135m"
DATA = ["wiki", None, 2, 32, 0]  # source, upload, samples, seq_len, seed
CRIT = [cls.ui(field)["value"] for _c, cls, field in parameter_knobs()]  # every criterion knob at its default


def client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def plot(value) -> dict:
    """The plotly figure JSON inside a gr.Plot output."""
    assert value["type"] == "plotly", value
    return json.loads(value["plot"])


def test_app_py_serves_the_dashboard_on_loopback_only(tmp_path):
    """``python app.py`` as a user starts it: the page answers on 127.0.0.1, and the listening socket is
    bound to the loopback address only (not 0.0.0.0), with no share link."""
    import os
    import socket
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    import psutil

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIO_SERVER_")}
    env.update(HF_HUB_OFFLINE="1", HFPRUNE_RUNS=str(tmp_path / "runs"))
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=root, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline, page = time.time() + 240, None
        while time.time() < deadline and proc.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(1)
        assert page is not None, (tmp_path / "app.log").read_text()[-2000:]
        assert "HFPrune" in page
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
        assert "gradio.live" not in (tmp_path / "app.log").read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_score_prune_compare_end_to_end(app):
    url, services = app
    c = client(url)
    status = c.predict(MODEL, *DATA, api_name="/load_model")
    assert "30 layers" in status and "134.5 M parameters" in status

    out = c.predict(["entropy", "cross_entropy"], MODEL, *DATA, *CRIT, [], [], True, None, api_name="/score")
    status, hist, heat, table = out[:4]
    assert "entropy" in status and "cross_entropy" in status and "computed" in status
    hist_fig = plot(hist)
    names = [trace["name"] for trace in hist_fig["data"]]
    assert names == [f"layer {i}" for _ in ("entropy", "cross_entropy") for i in (0, 15, 29)]  # one panel each
    panels = [a["text"] for a in hist_fig["layout"]["annotations"]]
    assert panels[:2] == ["entropy", "cross_entropy"]
    assert all(sum(trace["y"]) == 1536 for trace in hist_fig["data"])  # every neuron lands in one bin
    heat_fig = plot(heat)
    z = heat_fig["data"][0]["z"]
    assert len(z) == 30 and len(z[0]) == 256  # 1536 sorted neurons resampled to 256 columns
    assert all(row[i] >= row[i + 1] for row in z for i in range(255))  # sorted high → low
    cells = sorted(v for row in z for v in row)
    zmin, zmax = heat_fig["data"][0]["zmin"], heat_fig["data"][0]["zmax"]
    assert cells[0] < zmin < zmax < cells[-1]  # colours clipped to robust percentiles
    assert len(table["data"]) == 60  # 30 layers × 2 criteria

    # Scoring again is served from the cache, and a redraw needs no model.
    started = time.perf_counter()
    status = c.predict(["entropy"], MODEL, *DATA, *CRIT, ["3"], ["entropy"], False, "entropy", api_name="/score")[0]
    assert "cached" in status and time.perf_counter() - started < 5
    hist, _, _ = c.predict(["3"], ["cross_entropy"], True, "entropy", api_name="/redraw")
    assert [t["name"] for t in plot(hist)["data"]] == ["layer 3"]
    hist, _, _ = c.predict(["3"], ["cross_entropy", "entropy"], True, "entropy", True, api_name="/redraw")
    assert [t["name"] for t in plot(hist)["data"]] == ["cross_entropy · layer 3", "entropy · layer 3"]  # overlay
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match="'40' is not a layer of this model \\(layers are 0–29\\)"):
        c.predict(["3", "40"], ["entropy"], True, "entropy", api_name="/redraw")

    text, scatter, rho_bars, overlap_bars = c.predict("entropy", "cross_entropy", 5, 0.3, MODEL, *DATA, *CRIT,
                                                      api_name="/compare_criteria")[:4]
    rho = float(text.split("ρ = **")[1].split("**")[0])
    assert 0.3 < rho < 1.0  # related but different criteria
    assert len(plot(rho_bars)["data"][0]["y"]) == 30
    assert all(0 <= v <= 1.0001 for v in plot(overlap_bars)["data"][0]["y"])
    chance = plot(overlap_bars)["data"][1]
    assert chance["name"].startswith("two random choices") and chance["y"] == [pytest.approx(0.3, abs=0.01)] * 2

    preview_text, widths = c.predict("entropy", 0.3, "uniform", "1", MODEL, api_name="/prune_preview")
    assert "134.52 M → 110.62 M" in preview_text
    assert plot(widths)["data"][1]["y"] == [1075] * 30

    status, _, trace, held, *_ = c.predict("entropy", 0.3, "uniform", "1", False, 64, "ent30", MODEL, *DATA, *CRIT,
                                           api_name="/prune")
    assert "ent30" in status and "1075–1075" in status
    assert "Quality at a glance (4 × 64 held-out tokens): perplexity" in status  # the price of the cut, at once
    assert [r[0] for r in held["data"]] == ["ent30"] and "uniform" in held["data"][0]
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
    assert rows["ent30"]["params"] == "110.6 M"
    assert [t["name"] for t in plot(scatter)["data"]] == ["original", "ent30"]

    table, lines, note = c.predict(["entropy", "cross_entropy"], "0.3, 0.1", "uniform", "1", 2, 32, "kl_to_dense",
                                   api_name="/sweep")
    cells = {(r[0], r[1]): dict(zip(table["headers"], r)) for r in table["data"]}
    assert sorted(cells) == [("cross_entropy", "0.10"), ("cross_entropy", "0.30"), ("entropy", "0.10"),
                             ("entropy", "0.30"), ("random (baseline)", "0.10"), ("random (baseline)", "0.30")]
    for name in ("entropy", "cross_entropy"):
        assert 0 < cells[(name, "0.10")]["kl_to_dense"] < cells[(name, "0.30")]["kl_to_dense"]
        assert cells[(name, "0.30")]["kl_to_dense"] < cells[("random (baseline)", "0.30")]["kl_to_dense"]
    assert [t["name"] for t in plot(lines)["data"]] == ["entropy", "cross_entropy", "random (baseline)"]
    assert note.startswith("6 of 6 rows")
    # the same cells with the least-squares refit (statistics on 64 calibration windows): lower KL
    table, _, _ = c.predict(["entropy"], "0.3", "uniform+lsq", "1", 2, 32, "kl_to_dense", 64, False,
                            api_name="/sweep")
    refit = dict(zip(table["headers"], table["data"][0]))
    assert refit["allocation"] == "uniform+lsq" and refit["kl_to_dense"] < cells[("entropy", "0.30")]["kl_to_dense"]

    status = c.predict("ent30", "torchao-int8", api_name="/quantize")[0]
    assert "ent30+torchao-int8" in status
    # the quantized variant only (the original is always timed as the baseline): timings repeat until
    # their spread is known, so every extra model costs the suite ~30 s on a busy 2-core machine
    table, speedups, pareto, note = c.predict(["ent30+torchao-int8"], 32, 4, 3, 5, api_name="/bench")
    rows = {r[0]: dict(zip(table["headers"], r)) for r in table["data"]}
    assert set(rows) == {"original", "ent30+torchao-int8"}
    assert note.startswith("2 of 2 models measured") and "5 s budget each" in note
    q8 = rows["ent30+torchao-int8"]
    assert q8["weights"] == "torchao-int8" and rows["original"]["weights"] == "fp32"
    assert q8["weight MB"] < 0.5 * rows["original"]["weight MB"]  # 30 % fewer MLP neurons, then 1 byte a weight
    assert all(r["prefill ms (1×N, median)"] > 0 and r["decode tok/s (median)"] > 0 for r in rows.values())
    assert all(3 <= r["repeats"] <= 15 for r in rows.values())
    assert q8["FLOP ideal"].endswith("×") and float(q8["FLOP ideal"][:-1]) > 1.0
    assert rows["original"]["prefill speed-up"] == rows["original"]["decode speed-up"] == "baseline"
    for phase in ("prefill", "decode"):  # median× (quartile interval), side by side
        assert re.fullmatch(r"\d+\.\d\d× \(\d+\.\d\d–\d+\.\d\d\)", q8[f"{phase} speed-up"])
    bars = plot(speedups)["data"]
    assert [b["name"] for b in bars[:2]] == ["prefill speed-up", "decode speed-up"] and bars[2]["name"] == "FLOP ideal"
    assert {t["name"] for t in plot(pareto)["data"]} >= {"original", "ent30+torchao-int8"}
    zero, note = c.predict(["ent30"], ["wiki_nextsent"], 10, api_name="/zeroshot")
    accs = {r[0]: dict(zip(zero["headers"], r)) for r in zero["data"]}
    assert set(accs) == {"original", "ent30"} and all(a["wiki_nextsent n"] == 10 for a in accs.values())
    for a in accs.values():  # '0.700 ± 0.153' and the chance level beside it
        value, se = (float(x) for x in a["wiki_nextsent acc"].split(" ± "))
        assert 0 <= value <= 1 and 0 < se < 0.2 and a["wiki_nextsent chance"] == "0.25"
    assert "Chance (guessing): wiki_nextsent 0.25" in note
    assert "Too few items to separate these variants" in note or "larger than 2 combined standard errors" in note

    listed, _ = c.predict(False, api_name="/runs_list")
    kinds = sorted(r[1] for r in listed["data"])
    assert kinds == ["prune", "score", "score"]


def test_sessions_do_not_see_each_other(app):
    from gradio_client.exceptions import AppError

    url, _ = app
    alice, bob = client(url), client(url)
    # both sessions score at the same time (queued on the one model slot), each with its own criterion
    jobs = {"alice": alice.submit(["entropy"], MODEL, "wiki", None, 3, 32, 0, *CRIT, [], [], True, None,
                                  api_name="/score"),
            "bob": bob.submit(["wanda"], MODEL, "wiki", None, 2, 32, 1, *CRIT, [], [], True, None, api_name="/score")}
    assert "**entropy**" in jobs["alice"].result()[0] and "**wanda**" in jobs["bob"].result()[0]
    seen = {name: {a["text"] for a in plot(c.predict(["0"], [], True, None, api_name="/redraw")[0])["layout"]["annotations"]}
            for name, c in (("alice", alice), ("bob", bob))}  # one histogram panel per criterion the session scored
    assert seen == {"alice": {"entropy"}, "bob": {"wanda"}}
    alice.predict("entropy", 0.2, "uniform", "1", False, 64, "alice-only", MODEL, "wiki", None, 3, 32, 0, *CRIT,
                  api_name="/prune")
    with pytest.raises(AppError, match="No variant named 'alice-only'"):
        bob.predict(["alice-only"], "Hello", 3, api_name="/menu")
    mine_bob, _ = bob.predict(True, api_name="/runs_list")
    mine_alice, _ = alice.predict(True, api_name="/runs_list")
    assert {r[3] for r in mine_bob["data"]} == {"smollm2-135m"} and {r[4] for r in mine_bob["data"]} == {"wanda"}
    assert all(row[-2] == "yes" for row in mine_alice["data"] + mine_bob["data"])  # "mine", then the run id
    assert {r[-1] for r in mine_alice["data"]}.isdisjoint({r[-1] for r in mine_bob["data"]})
    assert "prune" in {r[1] for r in mine_alice["data"]} and "prune" not in {r[1] for r in mine_bob["data"]}
    # bob cannot delete a run of alice's open session; alice can
    alice_run = next(r[-1] for r in mine_alice["data"] if r[1] == "prune")
    with pytest.raises(AppError, match="belongs to another open browser session"):
        bob.predict(alice_run, False, api_name="/run_delete")
    assert alice_run in {r[-1] for r in alice.predict(True, api_name="/runs_list")[0]["data"]}
    assert "Deleted" in alice.predict(alice_run, True, api_name="/run_delete")[0]


def test_stop_ends_scoring_and_stores_nothing(app):
    url, services = app
    c = client(url)
    before = {r.run_id for r in services.runs.list()}
    job = c.submit(["cross_entropy"], MODEL, "wiki", None, 256, 128, 7, *CRIT, [], [], True, None, api_name="/score")
    from gradio_client.utils import Status

    deadline = time.time() + 60
    while job.status().code != Status.PROGRESS and time.time() < deadline:  # wait until windows are being scored
        time.sleep(0.1)
    assert job.status().code == Status.PROGRESS, (job.status(), job.exception() if job.done() else None)
    started = time.time()
    assert c.predict(api_name="/stop").startswith("Stopped the scoring")  # said once it has really stopped
    with pytest.raises(Exception):
        job.result(timeout=60)
    # the engine itself stopped: the scoring thread let go of the model lock within a window or two
    # (scoring all 256 windows would hold it for minutes), and no score run was stored
    assert services.model_lock.acquire(timeout=20), "the scoring thread is still running after Stop"
    services.model_lock.release()
    assert time.time() - started < 20
    c.predict(MODEL, *DATA, api_name="/load_model")
    assert {r.run_id for r in services.runs.list()} == before


def test_runs_reload_after_restart_export_and_delete(app, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from hfprune_ui.services import Services

    url, services = app
    c = client(url)
    c.predict(["entropy"], MODEL, *DATA, *CRIT, [], [], True, None, api_name="/score")
    c.predict("entropy", 0.25, "uniform", "1", True, 4, "keep25", MODEL, *DATA, *CRIT, api_name="/prune")
    run_id = next(r.run_id for r in services.runs.list("prune") if r.config.get("name") == "keep25")
    # a "restarted" app: new caches and sessions over the same run store
    fresh = Services(runs_root=services.runs.root)
    fresh.models = services.models  # the model itself is shared to save a reload; caches are new
    session = fresh.sessions.get("after-restart")
    assert "keep25" in fresh.load_run(session, run_id)
    variant = session.variants["keep25"]
    assert variant.widths == [1152] * 30
    # the least-squares refit was redone on reload (the run stores kept indices, not weights)
    assert variant.meta["compensation"]["method"] == "lsq" and variant.meta["compensation"]["samples"] == 4
    kept0 = torch.tensor(variant.meta["kept_indices"][0])
    dense_down = services.models.get(MODEL).model.model.layers[0].mlp.down_proj.weight
    assert not torch.allclose(variant.model.model.layers[0].mlp.down_proj.weight, dense_down[:, kept0])
    # download as .zip: the archive holds a folder that reloads with plain from_pretrained
    archive, note = c.predict("keep25", "hf-native", api_name="/export_zip")
    assert "keep25" in note
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        assert {"keep25/config.json", "keep25/model.safetensors", "keep25/pruning_meta.json"} <= names
        zf.extractall(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "keep25").eval()
    ids = torch.tensor([[504, 3458, 282, 4649, 314, 3046]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, variant.model(ids).logits, rtol=1e-5, atol=1e-5)
    # save to a folder: a non-empty target is refused and left as it was
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match="(?i)not empty|exists"):
        c.predict("keep25", "hf-native", str(target), api_name="/export_save")
    assert [p.name for p in target.iterdir()] == ["mine.txt"]
    # a server with an export root saves only inside it; relative names land in it
    from core.errors import HFPruneError
    fresh.export_root = (tmp_path / "fence").resolve()
    with pytest.raises(HFPruneError, match="only inside"):
        fresh.save_to_folder(session, "keep25", "hf-native", "../escaped")
    assert not (tmp_path / "escaped").exists()
    saved = fresh.save_to_folder(session, "keep25", "hf-native", "inside")
    assert saved == tmp_path / "fence" / "inside" and (saved / "model.safetensors").is_file()
    # delete: gone from the listing and from disk
    c.predict(run_id, False, api_name="/run_delete")
    assert run_id not in {r.run_id for r in services.runs.list()}
    assert not (services.runs.root / run_id).exists()


def test_bad_input_is_a_clear_message_and_keeps_runs(app, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from core.errors import DataError

    url, services = app
    c = client(url)
    before = sorted(p.name for p in services.runs.root.iterdir())
    with pytest.raises(AppError, match="not an embedded alias.*Hugging Face Hub could not provide it"):
        c.predict("no-such-org/no-such-model-xyz", *DATA, api_name="/load_model")
    big = tmp_path / "big.txt"
    with open(big, "wb") as fh:  # sparse: 51 MiB on paper, nothing on disk
        fh.truncate(51 * 2**20)
    with pytest.raises(DataError, match="51 MiB; the limit is 50 MiB"):
        services.data_spec("upload", str(big), 2, 32, 0)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(AppError, match="empty"):
        c.predict(MODEL, "upload", handle_file(str(empty)), 2, 32, 0, api_name="/load_model")
    with pytest.raises(AppError, match="after uploading"):
        c.predict(MODEL, "upload", None, 2, 32, 0, api_name="/load_model")
    c.predict(["entropy"], MODEL, *DATA, *CRIT, [], [], True, None, api_name="/score")
    with pytest.raises(AppError, match="greater than maximum value 0.95"):
        c.predict("entropy", 1.0, "uniform", "128", False, 64, "too-far", MODEL, *DATA, *CRIT, api_name="/prune")
    with pytest.raises(AppError, match="Not scored yet: wanda"):
        c.predict(["entropy", "wanda"], "0.2", "uniform", "1", 2, 32, "kl_to_dense", api_name="/sweep")
    with pytest.raises(AppError, match="Ratios must be numbers"):
        c.predict(["entropy"], "0.2, lots", "uniform", "1", 2, 32, "kl_to_dense", api_name="/sweep")
    with pytest.raises(AppError, match=r"\[0, 1\)|between 0 and 1|0 ≤"):
        c.predict(["entropy"], "1.5", "uniform", "1", 2, 32, "kl_to_dense", api_name="/sweep")
    with pytest.raises(AppError, match="'original' names the unpruned model"):
        c.predict("entropy", 0.2, "uniform", "1", False, 64, "original", MODEL, *DATA, *CRIT, api_name="/prune")
    after = sorted(p.name for p in services.runs.root.iterdir())
    assert set(before) <= set(after)
    assert len(after) - len(before) <= 1  # at most the new score run, never a failed prune



def test_app_flags_and_environment(monkeypatch):
    """127.0.0.1:7860 and no share link by default; flags beat GRADIO_SERVER_*; a bad port is one sentence."""
    import app as entry

    for name in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HFPRUNE_EXPORT_ROOT", raising=False)
    args = entry.parse_args([])
    assert (args.host, args.port, args.share, args.export_root) == ("127.0.0.1", 7860, False, None)
    assert entry.parse_args(["--share"]).export_root.endswith("exports")  # reachable by others: exports fenced in
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "8123")
    assert (entry.parse_args([]).host, entry.parse_args([]).port) == ("0.0.0.0", 8123)
    assert entry.parse_args([]).export_root.endswith("exports")
    assert entry.parse_args(["--export-root", "/srv/models"]).export_root == "/srv/models"
    assert entry.parse_args(["--host", "127.0.0.1", "--port", "9000"]).port == 9000
    monkeypatch.setenv("GRADIO_SERVER_PORT", "eighty")
    with pytest.raises(SystemExit):
        entry.parse_args([])


def test_tour_export_default_and_upload_split(app, tmp_path):
    """The Tour's five steps, the export default of a non-uniform variant, an uploaded file's split."""
    from gradio_client import handle_file

    url, services = app
    c = client(url)
    assert "**precomputed**" in c.predict(api_name="/tour_score")[0]
    shipped = [s for s in services.sessions._sessions.values()
               if any(r.config.get("precomputed") for r in s.scores.values())]
    assert len(shipped) == 1 and set(shipped[0].scores) == {"entropy", "cross_entropy"}
    hist, *_ = c.predict(api_name="/tour_histograms")
    assert [a["text"] for a in plot(hist)["layout"]["annotations"]][:2] == ["entropy", "cross_entropy"]
    text, overlap, table, *_ = c.predict(api_name="/tour_disagreements")
    assert "two random choices would share" in text and len(table["data"]) == 12
    quality, status, *_ = c.predict(api_name="/tour_prune")
    rows = {r[0]: dict(zip(quality["headers"], r)) for r in quality["data"]}
    assert set(rows) == {"tour-entropy-30%", "tour-cross_entropy-30%"}
    assert all(r["parameters"] == "110.6 M" and r["KL to original (nats/token)"] > 0 for r in rows.values())
    menu, summary, *_ = c.predict(api_name="/tour_menus")
    assert [b["name"].split(" (")[0] for b in plot(menu)["data"]] == ["original", "tour-entropy-30%",
                                                                      "tour-cross_entropy-30%"]
    assert "Paris" in summary
    # a global allocation gives each layer its own width: the export default is the format that saves it
    c.predict("entropy", 0.3, "global", "1", False, 64, "glob30", MODEL, "wiki", None, 8, 64, 0, *CRIT,
              api_name="/prune")
    mode, why = c.predict("glob30", api_name="/export_default")
    assert mode == "hf-remote-code" and "different widths" in why
    assert c.predict("tour-entropy-30%", api_name="/export_default")[0] == "hf-native"
    # an upload is split into calibration and held-out parts, and the Model & data tab says how
    notes = tmp_path / "notes.jsonl"
    notes.write_text("\n".join(json.dumps({"text": f"Note {i}: " + "the river runs past the old mill. " * 12})
                               for i in range(12)))
    status = c.predict(MODEL, "upload", handle_file(str(notes)), 2, 32, 0, api_name="/load_model")
    assert "split by document: 9 documents" in status and "3 (every 4th) are held out for evaluation" in status
    short = tmp_path / "short.txt"
    short.write_text("Too short to split. " * 10)
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match="too short to split into calibration and held-out evaluation text"):
        c.predict(MODEL, "upload", handle_file(str(short)), 2, 32, 0, api_name="/load_model")
