"""The best measured recipe is what users get: the least-squares refit is the default of the Python call,
the CLI and the Prune tab alike (one declaration, CompensationOptions), and the tab's recommendation
sentences are generated from the stored benchmark numbers they cite."""
from __future__ import annotations

import json

import gradio as gr
import pytest
import torch

from core.cli import build_parser
from core.methods.oneshot import prune_with_scores, score_model
from core.prune.compensate import CompensationOptions
from core.studies.claims import adaptive_claim, load_recipe_evidence, recipe_evidence, refit_claim


def _component(demo: gr.Blocks, elem_id: str):
    found = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    assert len(found) == 1, elem_id
    return found[0]


def test_cli_python_and_prune_tab_defaults_agree(tiny_loaded, tmp_path):
    python = CompensationOptions()
    args = build_parser().parse_args(["prune", "--ratio", "0.2", "--out", str(tmp_path / "out")])
    cli = CompensationOptions.from_args(args)
    assert python.method == cli.method == "lsq" and python.samples == cli.samples == 128
    assert args.allocation == "uniform"

    from hfprune_ui import build_demo
    from hfprune_ui.services import Services
    from hfprune_ui.tabs.prune import COMPENSATE_DEFAULT

    demo = build_demo(Services(runs_root=tmp_path / "runs"))
    checkbox, windows = _component(demo, "compensate"), None
    windows = next(b for b in demo.blocks.values()
                   if isinstance(b, gr.Slider) and (b.label or "").startswith("Compensation windows"))
    assert COMPENSATE_DEFAULT is True and checkbox.value is True and windows.value == python.samples
    allocation = _component(demo, "allocation")
    assert allocation.value == "uniform"  # the default exports everywhere; adaptive is offered as recommended
    assert any("recommended" in str(label) and value == "adaptive" for label, value in allocation.choices)
    advice = _component(demo, "adaptive-advice").value
    assert "Recommended" in advice and "hf-native" in advice

    # the Python call without a compensation argument refits, and records it
    loaded = tiny_loaded("llama", intermediate_size=32)
    scores = score_model(loaded, "entropy", samples=2, seq_len=16, progress=False)
    pruned = prune_with_scores(loaded, scores, 0.25, progress=False)
    assert pruned.meta["compensation"] == python.to_dict()
    plain = prune_with_scores(loaded, scores, 0.25, progress=False, compensation=CompensationOptions("none"))
    assert plain.meta["compensation"] == {"method": "none"}
    assert not all(bool((a.down_proj.weight == b.down_proj.weight).all())
                   for a, b in zip([layer.mlp for layer in pruned.model.model.layers],
                                   [layer.mlp for layer in plain.model.model.layers]))


ROWS = [{"criterion": "entropy", "allocation": "uniform", "ratio": 0.2, "kl": 0.70},
        {"criterion": "entropy", "allocation": "uniform+lsq", "ratio": 0.2, "kl": 0.50},
        {"criterion": "entropy", "allocation": "adaptive+lsq", "ratio": 0.2, "kl": 0.40, "alloc_s": 12.0},
        {"criterion": "entropy", "allocation": "uniform", "ratio": 0.3, "kl": 1.0},  # no refit rows: left out
        {"criterion": "cross_entropy", "allocation": "uniform+lsq", "ratio": 0.2, "kl": 0.1}]
SETUP = {"model": "m", "evaluation": "wiki, 8 x 128", "compensation_statistics_s": 74.0,
         "compensation": "+lsq: refit on 128 x 128 calibration windows"}


def test_recipe_sentences_are_made_from_the_numbers():
    evidence = recipe_evidence(ROWS, SETUP)
    assert list(evidence["ratios"]) == [0.2]
    refit, adaptive = refit_claim(evidence), adaptive_claim(evidence)
    assert "0.700 → 0.500 at 20 % (-29 %)" in refit.text and "74 s" in refit.text and refit.better == "uniform+lsq"
    assert "0.500 → 0.400 at 20 % (-20 %)" in adaptive.text and "12 s at 20 %" in adaptive.text
    assert adaptive.text.startswith("Recommended") and adaptive.better == "adaptive+lsq"
    worse = recipe_evidence([dict(r, kl=0.6) if r["allocation"] == "adaptive+lsq" else r for r in ROWS], SETUP)
    claim = adaptive_claim(worse)
    assert not claim.text.startswith("Recommended") and claim.better is None
    assert refit_claim({"ratios": {}}) is None and adaptive_claim({"ratios": {}}) is None


def test_the_stored_result_backs_the_recommendation():
    evidence = load_recipe_evidence()
    if not evidence["ratios"]:
        pytest.skip("benchmarks/results/criteria_smollm2-135m.json is not in this checkout")
    claim = adaptive_claim(evidence)
    for ratio, kl in claim.values["kl"].items():
        assert f"{kl['uniform+lsq']:.3f} → {kl['adaptive+lsq']:.3f} at {round(100 * ratio)} %" in claim.text
    assert load_recipe_evidence("/nonexistent.json") == {"ratios": {}}


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_the_default_refit_reloads_from_every_export(allocation, tiny_loaded, tmp_path):
    """Same shapes as plain slicing: each export mode reloads the refitted model with its logits."""
    from transformers import AutoModelForCausalLM

    from core.export.gguf import GGUFOptions
    from core.export.hf import EXPORT_MODES, save_pruned
    from core.methods.oneshot import ScoreResult
    from core.models.adapters import mlp_widths
    from core.models.loading import load_model

    loaded = tiny_loaded("llama", intermediate_size=64)
    gen = torch.Generator().manual_seed(1)
    scores = ScoreResult([torch.rand(64, generator=gen) * (10.0 if i == 0 else 1.0) for i in range(2)],
                         {"criterion": "random", "source": "wiki", "samples": 1, "seq_len": 8, "seed": 0}, 0.0)
    refit = CompensationOptions(samples=8, seq_len=32)  # the default method, on less text (time)
    pruned = prune_with_scores(loaded, scores, 0.4, allocation=allocation, progress=False, compensation=refit)
    assert pruned.meta["compensation"]["method"] == "lsq"
    assert (len(set(pruned.widths)) > 1) == (allocation == "global")
    ids = torch.randint(0, 1000, (2, 12), generator=gen)
    with torch.no_grad():
        expected = pruned.model(input_ids=ids).logits
    for mode in EXPORT_MODES:
        if mode == "hf-native" and allocation != "uniform":
            continue  # per-layer widths cannot be hf-native (refused with a sentence elsewhere)
        out = save_pruned(pruned.model, loaded.tokenizer, tmp_path / f"{allocation}-{mode}", pruned.meta, mode=mode,
                          gguf=GGUFOptions(type="f32") if mode == "gguf" else None)
        if mode == "gguf":
            model = load_model(str(next(out.glob("*.gguf")))).model
        else:
            model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=mode == "hf-remote-code")
        model.eval()
        if mode != "hf-padded":
            assert mlp_widths(model) == pruned.widths, mode
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4, msg=mode)


def test_the_probe_sentence_is_made_from_the_heal_tables(tmp_path):
    from core.studies.claims import PROBE_PAIRS, load_probe_evidence, probe_claim

    def row(config, ratio, kl, cpu):
        return {"config": config, "ratio": ratio, "kl": kl, "cpu_min": cpu}

    (tmp_path / "heal_m_wiki.json").write_text(json.dumps({"rows": [
        row(PROBE_PAIRS[0][0], 0.2, 0.40, 2.3), row(PROBE_PAIRS[0][1], 0.2, 0.36, 2.4),
        row(PROBE_PAIRS[0][0], 0.3, 0.60, 2.0), row(PROBE_PAIRS[0][1], 0.3, 0.595, 2.1),
        row(PROBE_PAIRS[1][0], 0.3, 0.50, 4.0), row(PROBE_PAIRS[1][1], 0.3, 0.45, 4.1),
        row(PROBE_PAIRS[0][0], 0.4, 0.9, 2.0)]}))  # no pair at 40 %: left out
    (tmp_path / "heal_m_news.json").write_text("not json")
    evidence = load_probe_evidence(tmp_path)
    assert [(e["table"], e["ratio"], e["windows"]) for e in evidence] == [("m, wiki", 0.2, ""), ("m, wiki", 0.3, ""),
                                                                          ("m, wiki", 0.3, "512")]
    claim = probe_claim(evidence)
    assert "m, wiki at 20 %: 0.400 → 0.360 (-10.0 %, 2.3 → 2.4 CPU-min)" in claim.text
    assert "m, wiki at 30 % (refit on 512 windows): 0.500 → 0.450" in claim.text
    assert "in all 3 measured cases" in claim.text and "1 of them changed by less than 3 %" in claim.text
    assert claim.inside_noise and claim.better is None  # one case inside the noise: no blanket verdict
    assert claim.text.endswith("do not show a gain beyond that noise.")
    assert probe_claim(evidence[:1]).text.endswith("Worth switching on.")  # one clear win alone
    worse = probe_claim([dict(evidence[0], refit=0.45)])
    assert "in 0 of 1 measured cases" in worse.text and worse.better is None
    assert probe_claim([]) is None


def test_the_shipped_heal_tables_back_the_probe_sentence():
    from core.studies.claims import load_probe_evidence, probe_claim

    evidence = load_probe_evidence()
    if not evidence:
        pytest.skip("no heal table with both probe rows in this checkout")
    claim = probe_claim(evidence)
    for case in evidence:
        assert f"{case['mask']:.3f} → {case['refit']:.3f}" in claim.text
