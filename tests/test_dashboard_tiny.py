"""The launched dashboard on a tiny random llama (issue 10's paths without the real model's cost):
scores → plots with a bad layer list → prune (uniform, adaptive quick with its estimate) with the
quality at a glance → export default and the GGUF width note → a sweep with its random baseline → a full session replacing
the chosen variant → runs table columns; Measure streaming its rows under a time budget with one progress
line. Fast: 2 layers of 64 neurons."""
from __future__ import annotations

import json
import re
import socket
import time
import zipfile

import pytest
from transformers import AutoModelForCausalLM

from conftest import tiny_config

from core.importance.criteria import parameter_knobs

DATA = ["wiki", None, 2, 32, 0]
CRIT = [cls.ui(field)["value"] for _c, cls, field in parameter_knobs()]  # every criterion knob at its default


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory, real_tokenizer):
    """(client, services, model folder) of a dashboard whose model is a tiny llama saved to a folder."""
    import torch
    from gradio_client import Client

    from hfprune_ui import build_demo, launch_options, queue
    from hfprune_ui.services import Services

    root = tmp_path_factory.mktemp("tiny-dashboard")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", intermediate_size=64, layers=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.2)
    model.save_pretrained(root / "tiny")
    real_tokenizer.save_pretrained(root / "tiny")
    services = Services(runs_root=root / "runs")
    demo = queue(build_demo(services))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, **launch_options())
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False), services, str(root / "tiny")
    finally:
        demo.close()


def test_dashboard_paths_on_a_tiny_model(tiny_app):
    from gradio_client.exceptions import AppError

    c, services, model = tiny_app
    status = c.predict(model, *DATA, api_name="/load_model")
    assert "2 layers" in status and "1.6 M parameters" in status and "split by article" in status
    out = c.predict(["entropy", "cross_entropy"], model, *DATA, *CRIT, [], [], True, None, api_name="/score")
    assert "computed" in out[0]
    with pytest.raises(AppError, match="'7' is not a layer of this model \\(layers are 0–1\\)"):
        c.predict(["0", "7"], ["entropy"], True, "entropy", api_name="/redraw")

    *_, estimate = c.predict("quick", "adaptive", model, api_name="/adaptive_preset")
    assert "Estimated time for the adaptive search on this machine: **about" in estimate
    status, mode_update, trace, held, *_, kept = c.predict("entropy", 0.3, "adaptive", "1", False, 8, "ad30", model,
                                                           *DATA, *CRIT, 2, 2, 32, "kl", api_name="/prune")
    assert "Pruned **ad30**" in status and "Quality at a glance (4 × 64 held-out tokens)" in status
    assert json.loads(trace["plot"])["data"]  # the adaptive search's trace
    widths = services.sessions._sessions[next(iter(services.sessions._sessions))].variants["ad30"].widths
    kept = json.loads(kept["plot"])  # the width plot shows what the adaptive search kept, not uniform bars
    assert kept["data"][1]["y"] == widths and kept["data"][0]["y"] == [64, 64]
    assert "Kept MLP width per layer: ad30" in kept["layout"]["title"]["text"] and "adaptive" in \
        kept["layout"]["title"]["text"]
    mode, why = c.predict("ad30", api_name="/export_default")
    assert mode == ("hf-native" if len(set(widths)) == 1 else "hf-remote-code") and f"**ad30**: {mode}:" in why
    note, picker = c.predict("ad30", "gguf", api_name="/export_format_note")  # GGUF: the engine's block sentence
    assert picker["visible"] is True  # and the GGUF type picker appears
    assert re.fullmatch(r"\*\*ad30\*\* as GGUF: GGUF F16 stores any width \(achieved ratio \d+\.\d %\); Q8_0 / "
                        r"Q5_0 / Q4_0 would need multiples of 32, which these widths are( not)?\.", note), note
    note, _ = c.predict("ad30", "gguf", "q8_0", api_name="/export_format_note")
    fits = all(w % 32 == 0 for w in widths)
    assert ("Widths rounded to multiples of 32 for Q8_0" if fits else "not all multiples of 32, which Q8_0 needs") in note
    if not fits:  # the export refuses in one sentence saying what to do (never a silent F16 row)
        with pytest.raises(AppError, match=r"GGUF Q8_0 stores rows in blocks of 32, but 'ad30' keeps MLP widths [\d, ]+ "
                                           r"that are not multiples of 32: prune again with widths rounded to 32"):
            c.predict("ad30", "gguf", "q8_0", api_name="/export_zip")
    archive, note = c.predict("ad30", "gguf", "f16", api_name="/export_zip")  # F16 stores any width
    with zipfile.ZipFile(archive) as zf:
        assert sorted(n.split("/")[-1] for n in zf.namelist()) == ["model-F16.gguf", "pruning_meta.json"]
        meta = json.loads(zf.read("ad30/pruning_meta.json"))
    assert meta["gguf"]["type"] == "f16" and meta["gguf_tensor_types"] == {"F16": 15}
    if services.llamacpp_missing() is None:  # the llama.cpp panel: original and ad30 as GGUF, run in llama.cpp
        table, note = c.predict(["ad30"], "f16", 1, 16, 4, 2, 1, api_name="/llamacpp_bench")
        rows = {row[0]: dict(zip(table["headers"], row, strict=True)) for row in table["data"]}
        assert list(rows) == ["original", "ad30"] and "Measured 2 models as GGUF F16 in llama.cpp" in note
        assert rows["original"]["KL to original"] == 0 and rows["ad30"]["KL to original"] > 0
        assert rows["ad30"]["GGUF tensor types"] == "F16 × 15" and rows["ad30"]["prompt speed-up"].endswith(")")

    table, lines, note = c.predict(["entropy"], "0.2, 0.5", "uniform", "1", 2, 32, "kl_to_dense",
                                   api_name="/sweep")
    criteria = [row[0] for row in table["data"]]
    assert criteria == ["entropy", "entropy", "random (baseline)", "random (baseline)"] and note.startswith("4 of 4")
    with pytest.raises(AppError, match="Ratios must be numbers between 0 and 1"):
        c.predict(["entropy"], "0.2, lots", "uniform", "1", 2, 32, "kl_to_dense", api_name="/sweep")

    for name in ("u1", "u2", "u3"):
        c.predict("entropy", 0.2, "uniform", "1", False, 8, name, model, *DATA, *CRIT, api_name="/prune")
    assert "the next prune replaces **u2**" in c.predict("u2", api_name="/replace_choice")
    status, *_, held, _, _, header, _kept = c.predict("cross_entropy", 0.4, "uniform", "1", False, 8, "ce40", model, *DATA,
                                               *CRIT, api_name="/prune")
    assert "'u2' was dropped to make room" in status
    assert [row[0] for row in held["data"]] == ["ad30", "u1", "u3", "ce40"]
    runs, _ = c.predict(False, api_name="/runs_list")
    assert runs["headers"][:2] == ["run", "kind"] and {"allocation", "compensation"} <= set(runs["headers"])
    assert {row[0] for row in runs["data"] if row[1] == "prune"} == {"ad30", "u1", "u2", "u3", "ce40"}


def test_measure_streams_its_rows_through_the_queue(tiny_app):
    """The Measure button on the launched app: rows stream out of the worker thread (the old table is
    cleared first, then one row per model), each model within its budget, and a note says how many."""
    from gradio_client import Client

    c, _services, model = tiny_app
    client = Client(c.src, verbose=False)  # a fresh session: no variants, so only the original is timed
    client.predict(model, *DATA, api_name="/load_model")
    job = client.submit([], 16, 4, 3, 1, api_name="/bench")
    lines = []
    while not job.done():  # the progress the page shows: one line, its fraction never going back
        units = job.status().progress_data or []
        if units and (not lines or units[0].desc != lines[-1][0]):
            lines.append((units[0].desc, units[0].progress))
        time.sleep(0.05)
    updates = job.outputs()
    tables = [len(table["data"]) for table, *_ in updates]
    assert tables[0] == 0 and tables[-1] == 1, tables  # cleared at once, then the row
    table, _bars, pareto, note = job.result()
    row = dict(zip(table["headers"], table["data"][0]))
    assert row["variant"] == "original" and row["repeats"] >= 3 and "prefill" in row["spread reached (IQR / median)"]
    assert note.startswith("1 of 1 models measured in ") and "(1 s budget each)" in note
    assert json.loads(pareto["plot"])["data"]  # the size-vs-quality plot once every model is measured
    assert lines and all(desc.startswith("Measure · model ") for desc, _ in lines), lines
    assert any("repeat" in desc for desc, _ in lines), lines  # the repeats reach the bar from the worker thread
    fractions = [f for _, f in lines]
    assert fractions == sorted(fractions), lines
