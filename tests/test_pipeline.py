"""Prune → quantize → distil (core.pipeline) on tiny models: orders, QAT = converted forward, export round
trip, the ablation's stored rows, bad input."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import make_tiny, run_cli

IDS = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tokenizer():
    """Only the embedded model's tokenizer (the tiny models share its vocabulary); no real weights load."""
    from transformers import AutoTokenizer

    from core.models.loading import ensure_embedded

    return AutoTokenizer.from_pretrained(str(ensure_embedded("smollm2-135m")))


@pytest.fixture(scope="module")
def dense(tokenizer):
    """The dense tiny model (the pipeline never changes it: a test checks)."""
    from core.models.loading import LoadedModel

    return LoadedModel(make_tiny("llama"), tokenizer, "tiny-llama", "")


@pytest.fixture(scope="module")
def shared():
    """Scores per student state, shared by the order tests (the same dense model, the same data)."""
    from core.methods.pipeline import Shared

    return Shared()


def _groups(**train):
    from core.data.text import CalibrationOptions
    from core.methods.pipeline import MeasureOptions
    from core.train.loop import TrainOptions

    return {"calibration": CalibrationOptions(samples=4, seq_len=32, batch_size=2),
            "train_options": TrainOptions(**{"steps": 2, "lr": 1e-3, "warmup_steps": 0, "batch_size": 2,
                                             "eval_every": 0, **train}),
            "measure": MeasureOptions(eval_windows=2, eval_seq_len=32, prefill_tokens=16, decode_tokens=2,
                                      speed_repeats=1, zeroshot_limit=0)}


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


# ---------------------------------------------------------------------------------------------- orders


def test_order_parsing_and_the_six_orders():
    from core.methods.pipeline import ALL_ORDERS, PipelineError, describe_order, parse_order

    assert sorted(ALL_ORDERS) == sorted({"pqd", "pdq", "qpd", "qdp", "dpq", "dqp"}) and len(ALL_ORDERS) == 6
    for text in ("pqd", "PQD", "P→Q→D", "p -> q -> d", "prune,quantize,distill", "prune quantise distil"):
        assert parse_order(text) == "pqd"
    assert parse_order("q-p-d") == "qpd" and parse_order("d") == "d" and parse_order("pq") == "pq"
    assert describe_order("qdp") == "quantize → distill → prune"
    for bad in ("", "pqx", "ppd", "prune,prune", "pqdd", "magic"):
        with pytest.raises(PipelineError, match="Unknown order"):
            parse_order(bad)


@pytest.mark.parametrize("order", ["pqd", "pdq", "qpd", "qdp", "dpq", "dqp"])
def test_every_order_composes_and_each_stage_means_what_the_docs_say(dense, shared, order):
    from core.methods.pipeline import PipelineOptions, run_pipeline
    from core.models.adapters import mlp_widths
    from core.quantize.backends import quantization_of

    result = run_pipeline(dense, PipelineOptions(order=order, ratio=0.25, round_to=8, heldout_windows=2),
                          measure_result=False, shared=shared, **_groups())
    stages = {s["stage"]: s for s in result.record["stages"]}
    assert [s["stage"] for s in result.record["stages"]] == [
        {"p": "prune", "q": "quantize", "d": "distill"}[c] for c in order]
    # prune: scores the fake-quantised model exactly when quantize came first
    expected = "fake-quantised model" if order.index("q") < order.index("p") else "fp32 model"
    assert stages["prune"]["scored"] == expected and stages["prune"]["widths"] == [48, 48]
    # distil: skipped while the student is still the dense model, QAT after quantize, fp32 before it
    if order[0] == "d":
        assert "skipped" in stages["distill"]
    else:
        assert stages["distill"]["qat"] == (order.index("q") < order.index("d")) and stages["distill"]["steps"] == 2
    # the final model is the real INT8 format with the pruned widths; the dense model is untouched
    assert quantization_of(result.model) == "fbgemm-int8-dynamic"
    assert result.record["widths"] == [48, 48] and mlp_widths(dense.model) == [64, 64]
    assert quantization_of(dense.model) is None and not hasattr(dense.model, "hfprune_fake_quant")


def test_subset_orders_are_baselines(dense):
    from core.methods.pipeline import PipelineOptions, run_pipeline
    from core.quantize.backends import quantization_of

    pruned = run_pipeline(dense, PipelineOptions(order="p", ratio=0.5, round_to=1), measure_result=False, **_groups())
    assert quantization_of(pruned.model) is None and pruned.record["format"] == "fp32"
    quantized = run_pipeline(dense, PipelineOptions(order="q", quant="int8-weight"), measure_result=False, **_groups())
    assert quantization_of(quantized.model) == "torchao-int8" and quantized.record["widths"] == [64, 64]


# ---------------------------------------------------------------------------------------------- QAT maths


def test_fake_quantised_linear_equals_the_format_maths_and_the_fbgemm_kernel():
    """int8-dynamic: activations one asymmetric scale per call in [0, 127] (fbgemm's rule), weights
    per-channel symmetric absmax/127.5 in [-128, 127]; the real fbgemm layer gives the same output."""
    from torchao.quantization.qat import FakeQuantizedLinear

    from core.quantize.fake import FORMATS, convert, fake_quantize, fbgemm_qparams

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48))
    x = torch.randn(3, 7, 64) * 2 + 0.5  # (B, T, K), not centred: a real zero point
    fq = copy.deepcopy(model)
    weight = fq[0].weight
    fake_quantize(fq, FORMATS["int8-dynamic"])
    assert isinstance(fq[0], FakeQuantizedLinear) and fq[0].weight is weight  # the same trainable Parameter
    scale, zp = fbgemm_qparams(float(x.min()), float(x.max()))
    xq = (torch.clamp(torch.round(x / scale) + zp, 0, 127) - zp) * scale
    w = model[0].weight.detach()
    ws = w.abs().amax(1, keepdim=True) / 127.5
    wq = torch.clamp(torch.round(w * (1.0 / ws)), -128, 127) * ws  # kernels multiply by the inverse scale
    maths = torch.nn.functional.linear(xq, wq, model[0].bias.detach())
    with torch.no_grad():
        out_fq = fq(x)
        out_real = convert(copy.deepcopy(fq), FORMATS["int8-dynamic"])(x)
        noise = float((model(x) - maths).abs().max())  # what quantisation itself changes
    assert noise > 1e-2
    assert float((out_fq - maths).abs().max()) < 1e-5
    assert float((out_real - out_fq).abs().max()) < 1e-5  # the real fbgemm layer: integer maths, same numbers


def test_straight_through_gradients_reach_weights_and_inputs():
    from core.quantize.fake import FORMATS, fake_quantize

    for name in ("int8-dynamic", "int8-weight"):
        model = fake_quantize(torch.nn.Sequential(torch.nn.Linear(16, 8)), FORMATS[name])
        x = torch.randn(4, 16, requires_grad=True)
        model(x).pow(2).sum().backward()
        assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
        assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("fmt", ["int8-dynamic", "int8-weight"])
def test_qat_model_forward_equals_the_converted_int8_model(dense, fmt):
    from core.quantize.fake import FORMATS, convert, fake_format, fake_quantize, unfake

    fq = fake_quantize(copy.deepcopy(dense.model), FORMATS[fmt])
    assert fake_format(fq) == fmt
    plain = _logits(dense.model)
    qat = _logits(fq)
    real = _logits(convert(copy.deepcopy(fq), FORMATS[fmt]))
    noise = float((qat - plain).abs().max())
    assert noise > 1e-3  # the fake quantisation really rounds
    assert float((real - qat).abs().max()) < 1e-3 * max(1.0, noise)
    assert torch.equal(_logits(unfake(fq)), plain)  # unfaking gives back the plain model, same weights


# ---------------------------------------------------------------------------------------------- export


def test_export_reloads_quantized_with_the_recipe_and_the_record(dense, tmp_path):
    from core.methods.pipeline import RESULT_FILE, PipelineOptions, run_pipeline
    from core.quantize.backends import quantization_of
    from core.quantize.store import load_any, read_recipe

    out = tmp_path / "pqd"
    result = run_pipeline(dense, PipelineOptions(order="pqd", ratio=0.25, round_to=8, heldout_windows=2), out=out,
                          **_groups())
    recipe = read_recipe(out)
    assert recipe["method"] == "fbgemm-int8-dynamic" and recipe["pipeline_order"] == "pqd"
    assert recipe["storage"] == "int8" and (out / "quantized.safetensors").is_file()
    meta = json.loads((out / "pruning_meta.json").read_text())
    assert meta["pipeline"]["order"] == "pqd" and meta["intermediate_sizes"] == [48, 48]
    reloaded = load_any(str(out))
    assert quantization_of(reloaded.model) == "fbgemm-int8-dynamic"
    assert torch.allclose(_logits(reloaded.model), _logits(result.model), atol=1e-5)
    saved = json.loads((out / RESULT_FILE).read_text())
    row = saved["row"]
    assert row["order"] == "pqd" and row["kl_to_dense"] > 0 and row["disk_bytes"] > 0
    assert row["prefill_speedup"] > 0 and row["decode_speedup"] > 0 and row["ideal_speedup"] > 1.0
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in out.iterdir())  # nothing pickled
    assert row["storage"] == "int8"


def test_non_uniform_widths_export_with_remote_code_and_reload(dense, tmp_path):
    from core.methods.pipeline import PipelineOptions, run_pipeline
    from core.models.adapters import mlp_widths
    from core.quantize.store import load_any

    out = tmp_path / "qp"
    result = run_pipeline(dense, PipelineOptions(order="qp", ratio=0.4, allocation="global", round_to=1,
                                                 quant="int8-weight"), out=out, measure_result=False, **_groups())
    meta = json.loads((out / "pruning_meta.json").read_text())
    assert meta["export"] == "hf-remote-code" and len(set(meta["intermediate_sizes"])) > 1
    reloaded = load_any(str(out))
    assert mlp_widths(reloaded.model) == meta["intermediate_sizes"]
    assert torch.allclose(_logits(reloaded.model), _logits(result.model), atol=1e-5)


@pytest.mark.parametrize("method", ["fbgemm-int8-dynamic", "torchao-int8", "torchao-int8-dynamic",
                                    "torch-dynamic-int8"])
def test_int8_storage_is_exact_and_keeps_no_float_copy_of_the_quantized_layers(tokenizer, tmp_path, method):
    from safetensors.torch import load_file

    from core.models.counts import folder_bytes
    from core.quantize.backends import quantize_model
    from core.quantize.store import load_any, save_quantized

    model = make_tiny("llama", intermediate_size=256)
    small = save_quantized(model, tokenizer, method, tmp_path / "int8", storage="int8")
    big = save_quantized(model, tokenizer, method, tmp_path / "source")
    floats = load_file(str(small / "model.safetensors"))
    assert not any(k.endswith("mlp.down_proj.weight") or k.endswith("q_proj.weight") for k in floats)
    assert "model.embed_tokens.weight" in floats and folder_bytes(small) < folder_bytes(big)
    expected = _logits(quantize_model(copy.deepcopy(model), method))
    assert torch.equal(_logits(load_any(str(small)).model), expected)


# ---------------------------------------------------------------------------------------------- ablation


def test_ablation_stores_rows_as_runs_and_resumes(dense, tmp_path):
    from core.methods.pipeline import ablation_plot, run_ablation
    from core.runs import RunStore

    store = RunStore(tmp_path / "runs")
    seen = []
    kw = dict(out_root=tmp_path / "abl", orders=("dpq",), baselines=("p",), store=store, **_groups())
    first = run_ablation(dense, on_row=seen.append, **kw)
    assert [r["order"] for r in first.rows] == ["", "p", "dpq"] and len(seen) == 3
    assert len(store.list("pipeline")) == 3 and not any(r["resumed"] for r in first.rows)
    assert "dpq: distill → prune → quantize" in first.table and "dense fp32" in first.table
    assert "p: prune only (fp32, one-shot)" in first.table
    assert (tmp_path / "abl" / f"dpq-{first.settings_key[:8]}" / "quantization.json").is_file()
    again = run_ablation(dense, **kw)
    assert all(r["resumed"] for r in again.rows) and len(store.list("pipeline")) == 3
    assert [r["kl_to_dense"] for r in again.rows] == [r["kl_to_dense"] for r in first.rows]
    png = ablation_plot(first.rows, tmp_path / "abl.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_one_sentence_before_any_work(dense, tmp_path):
    from core.methods.pipeline import MeasureOptions, PipelineError, PipelineOptions, run_pipeline

    for fields, match in (({"order": "pqx"}, "Unknown order"), ({"quant": "int3"}, "Unknown format"),
                          ({"ratio": 1.0}, "ratio")):
        with pytest.raises(Exception, match=match):
            PipelineOptions(**fields)
    with pytest.raises(PipelineError, match="needs a CUDA GPU"):
        run_pipeline(dense, PipelineOptions(quant="nf4"), out=tmp_path / "nf4", **_groups())
    with pytest.raises(PipelineError, match="context is 256 tokens"):
        run_pipeline(dense, PipelineOptions(), out=tmp_path / "long",
                     **{**_groups(), "measure": MeasureOptions(prefill_tokens=512)})
    assert not (tmp_path / "nf4").exists() and not (tmp_path / "long").exists()


@pytest.mark.parametrize("flags, message", [
    (["--order", "pqx"], "Unknown order"),
    (["--quant", "int3"], "Unknown format"),
    (["--quant", "nf4", "--steps", "2"], "needs a CUDA GPU"),
    (["--order", "pqd"], "Give a training budget"),
])
def test_cli_bad_input_exits_non_zero_with_one_sentence_and_writes_nothing(tmp_path, capsys, flags, message):
    from core.cli import main

    out = tmp_path / "out"
    rc = main(["pipeline", "--model", "smollm2-135m", *flags, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert rc != 0 and len(lines) == 1 and message in lines[0], err
    assert not out.exists()


def test_cli_exit_status_in_a_fresh_process(tmp_path):
    out = tmp_path / "out"
    result = run_cli("pipeline", "--order", "p,q,x", "--out", str(out), fresh=True)
    assert result.returncode == 2 and "error: Unknown order 'p,q,x'" in result.stderr and not out.exists()


# ---------------------------------------------------------------------------------------------- dashboard


def _services(tmp_path, monkeypatch, tokenizer):
    from core.models.loading import LoadedModel
    from hfprune_ui.services import Services
    from hfprune_ui.tabs import pipeline as tab

    monkeypatch.setattr(tab, "cache_dir", lambda: tmp_path / "cache")  # exports go here (data caches stay shared)
    monkeypatch.setattr(tab, "MEASURE", {"eval_windows": 2, "eval_seq_len": 32, "prefill_tokens": 16,
                                          "decode_tokens": 2, "speed_repeats": 1})
    monkeypatch.setattr(tab, "CALIBRATION", {"samples": 4, "seq_len": 32})
    services = Services(runs_root=tmp_path / "runs")
    services.models._models["tiny"] = LoadedModel(make_tiny("llama"), tokenizer, "tiny", "")
    return services


def test_dashboard_run_streams_from_a_worker_and_never_holds_the_lock_across_a_yield(tmp_path, monkeypatch,
                                                                                    tokenizer):
    from hfprune_ui.tabs.pipeline import make_start

    services = _services(tmp_path, monkeypatch, tokenizer)
    start = make_start(services, ablation=False)
    outputs = []
    for output in start("tiny", "qpd", 0.25, "entropy", "uniform", "int8-weight", "mlp", 0, 2, 1e-3, 0):
        assert not services.model_lock._is_owned()  # the generator's thread never holds the model lock
        outputs.append(output)
    status, table, _plot = outputs[-1]
    assert status.startswith("**Done**") and "quantize → prune → distill" in status
    assert [row[0] for row in table] == ["dense fp32", "qpd: quantize → prune → distill"]
    exported = list((tmp_path / "cache" / "pipelines").iterdir())
    assert len(exported) == 1 and (exported[0] / "quantization.json").is_file()


def test_dashboard_ablation_stop_stores_nothing_half_done(tmp_path, monkeypatch, tokenizer):
    from hfprune_ui.tabs.pipeline import make_start

    services = _services(tmp_path, monkeypatch, tokenizer)
    start = make_start(services, ablation=True)
    outputs = []
    for output in start("tiny", "pqd", 0.25, "entropy", "uniform", "int8-dynamic", "full", 0, 2, 1e-3, 0):
        services.sessions.get("local").stop.set()  # Stop pressed while the first row is measured
        outputs.append(output)
    assert outputs[-1][0].startswith("**Stopped**")
    assert services.runs.list("pipeline") == []
    folder = tmp_path / "cache" / "pipelines" / "ablation-tiny"
    assert not folder.exists() or not any(folder.iterdir())


def test_cli_quantize_storage_int8(tokenizer, tmp_path, capsys):
    from core.cli import main
    from core.quantize.store import load_any, read_recipe

    folder = tmp_path / "tiny"
    make_tiny("llama").save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    assert main(["quantize", "--model", str(folder), "--method", "fbgemm-int8-dynamic", "--storage", "int8",
                 "--out", str(tmp_path / "q"), "--quiet"]) == 0
    assert read_recipe(tmp_path / "q")["storage"] == "int8" and load_any(str(tmp_path / "q")).recipe
    capsys.readouterr()
    assert main(["quantize", "--model", str(folder), "--method", "bnb-8bit", "--storage", "int8",
                 "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    assert "needs an INT8 method" in capsys.readouterr().err and not (tmp_path / "bad").exists()
