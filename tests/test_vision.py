"""Encoders (AMP): tiny random ViT / DINOv2 / CLIP-vision / BERT built from configs — criterion,
slicing, export + reload with identical outputs, the shared adaptive search, feature distillation
through core.train, and the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from core.errors import HFPruneError
from core.importance.criteria import (
    AmpEntropyCriterion,
    ScoreOptions,
    encoder_criterion,
    similarity_entropy,
)
from core.methods.encoders import (
    EmbeddingEntropyEvaluator,
    EncoderOptions,
    FeatureDistillation,
    plan_encoder_widths,
    prune_encoder,
    save_encoder,
    score_encoder,
)
from core.models.adapters import mlp_handles, mlp_widths
from core.models.counts import count_params, mlp_layout, prune_preview
from core.models.encoders import ImagePreprocess, LoadedEncoder, embed, load_encoder, prefinal_tokens
from core.models.slicing import prune_mlp_neurons
from core.prune.allocate import removed_shares

FAMILIES = ("dinov2", "vit", "clip_vision_model", "bert")
SIZE = 28  # 2×2 patches of 14


def tiny_encoder(family: str, seed: int = 0) -> torch.nn.Module:
    from transformers import (
        BertConfig,
        BertModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        ViTConfig,
        ViTModel,
    )

    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if family == "dinov2":
        model = Dinov2Model(Dinov2Config(**common, mlp_ratio=2, image_size=SIZE, patch_size=14))
    elif family == "vit":
        model = ViTModel(ViTConfig(**common, intermediate_size=64, image_size=SIZE, patch_size=14),
                         add_pooling_layer=False)
    elif family == "clip_vision_model":
        model = CLIPVisionModel(CLIPVisionConfig(**common, intermediate_size=64, image_size=SIZE, patch_size=14))
    else:
        model = BertModel(BertConfig(**common, intermediate_size=64, vocab_size=200, max_position_embeddings=64),
                          add_pooling_layer=False)
    with torch.no_grad():  # widen the near-zero init so the tests see real signal
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embeddings" not in name:
                p.normal_(0, 0.2)
    return model.eval()


class _Tok:
    """Enough of a tokenizer for the text path of the tests (ids only; never saved)."""

    cls_token_id, sep_token_id = 1, 2

    def save_pretrained(self, folder):
        (__import__("pathlib").Path(folder) / "tokenizer_config.json").write_text("{}")


def loaded(family: str, seed: int = 0) -> LoadedEncoder:
    model = tiny_encoder(family, seed)
    if family == "bert":
        return LoadedEncoder(model, "text", f"tiny-{family}", "", tokenizer=_Tok())
    return LoadedEncoder(model, "image", f"tiny-{family}", "", preprocess=ImagePreprocess(SIZE))


def batch_for(enc: LoadedEncoder, n: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if enc.kind == "text":
        return torch.randint(3, 200, (n, 12), generator=g)
    return torch.randn(n, 3, SIZE, SIZE, generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_handles_find_fc1_fc2(family):
    model = tiny_encoder(family)
    handles = mlp_handles(model)
    assert len(handles) == 2 and all(h.gate is None and h.width == 64 for h in handles)
    assert all(h.down.in_features == 64 and h.up.out_features == 64 for h in handles)


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_of_an_fc1_fc2_mlp_match_the_sliced_model(family):
    """The analytic counts know a plain MLP has 2·H weights (+1 bias) per neuron, not a gated 3·H (+2)."""
    model = tiny_encoder(family)
    layout = mlp_layout(model)
    assert (layout.gated, layout.bias, layout.matrices) == (False, True, 2)
    assert layout.params(mlp_widths(model)) == count_params(model)["mlp_params"]
    widths = [40, 24]
    preview = prune_preview(model, widths)
    shares = removed_shares(model, widths)
    kept = [torch.arange(w) for w in widths]
    pruned = prune_mlp_neurons(model, kept)
    after = count_params(pruned)["params"]
    assert preview["params_after"] == after
    assert shares["params_removed_share"] == pytest.approx(1 - after / count_params(model)["params"])
    assert preview["flops_after"] < preview["flops_before"]


def test_similarity_entropy_matches_definition_and_self_term():
    f = torch.randn(5, 8)
    n = torch.nn.functional.normalize(f, dim=-1)
    p = torch.softmax(20.0 * n @ n.t(), dim=-1)
    expected = -(p * p.log()).sum(-1).mean()
    assert torch.allclose(similarity_entropy(f, 20.0), expected, atol=1e-5)
    logits = (20.0 * n @ n.t()).masked_fill(torch.eye(5, dtype=torch.bool), float("-inf"))
    q = torch.softmax(logits, dim=-1)
    no_self = -(q * q.clamp_min(1e-30).log()).sum(-1).mean()
    assert torch.allclose(similarity_entropy(f, 20.0, self_similarity=False), no_self, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_amp_scores_equal_hand_computed_taylor(family):
    """Per example |Σ_tokens a·g| averaged over examples, with g from the batch entropy — recomputed by hand."""
    enc = loaded(family)
    data = batch_for(enc, 6)
    crit = AmpEntropyCriterion(temp_inv=15.0)
    scores = crit(enc.model, data, ScoreOptions(batch_size=3, progress=False))
    acts: list[torch.Tensor] = []
    hooks = [h.down.register_forward_pre_hook(lambda _m, a: acts.append(a[0].retain_grad() or a[0]))
             for h in mlp_handles(enc.model)]
    expected = [torch.zeros(64) for _ in range(2)]
    try:
        for part in torch.split(data, 3):
            acts.clear()
            with torch.enable_grad():
                loss = crit.loss(enc.model, part)
                loss.backward()
            for layer, a in enumerate(acts):
                expected[layer] += (a * a.grad).sum(dim=1).abs().sum(dim=0).detach()
    finally:
        for h in hooks:
            h.remove()
        enc.model.zero_grad(set_to_none=True)
    for got, want in zip(scores, expected):
        assert torch.isfinite(got).all() and got.abs().sum() > 0
        assert torch.allclose(got, want / 6, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in enc.model.parameters())  # no weight gradient was made


@pytest.mark.parametrize("name", ["magnitude", "wanda", "fluctuation", "random"])
def test_baselines_through_the_same_interface(name):
    enc = loaded("dinov2")
    result = score_encoder(enc, name, EncoderOptions(samples=4, batch_size=4, image_size=SIZE), progress=False)
    assert [s.numel() for s in result.scores] == [64, 64]
    assert all(torch.isfinite(s).all() for s in result.scores)


def test_unknown_criterion_is_one_sentence():
    with pytest.raises(HFPruneError, match="does not apply to encoders"):
        encoder_criterion("entropy")
    with pytest.raises(HFPruneError, match="temp_inv"):
        encoder_criterion("amp_entropy", temp_inv=-1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["hf-remote-code", "hf-padded"])
def test_prune_export_reload_identical(family, mode, tmp_path):
    enc = loaded(family)
    opts = EncoderOptions(samples=4, batch_size=4, image_size=SIZE, seq_len=12, heldout_samples=4)
    result = score_encoder(enc, "random", opts, progress=False)
    pruned = prune_encoder(enc, result, 0.4, "global", opts, progress=False)
    assert mlp_widths(pruned.model) == pruned.widths and sum(pruned.widths) == round(0.6 * 128)
    x = batch_for(enc)
    # slicing = masking the dense model's removed neurons
    masks = [torch.zeros(64).index_fill_(0, k, 1.0) for k in pruned.kept]
    hooks = [h.down.register_forward_pre_hook(lambda _m, a, m=m: (a[0] * m,)) for h, m in zip(mlp_handles(enc.model), masks)]
    with torch.no_grad():
        masked = embed(enc.model, x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        sliced = embed(pruned.model, x)
    assert torch.allclose(masked, sliced, atol=1e-5)
    folder = save_encoder(pruned, enc, str(tmp_path / "out"), mode=mode)
    meta = json.loads((folder / "pruning_meta.json").read_text())
    assert meta["intermediate_sizes"] == pruned.widths and meta["export"] == mode
    back = load_encoder(str(folder))
    assert back.kind == enc.kind
    with torch.no_grad():
        assert torch.equal(embed(back.model, x), sliced)
    if mode == "hf-remote-code":
        assert mlp_widths(back.model) == pruned.widths


def test_uniform_dinov2_export_is_native_only_at_multiples(tmp_path):
    enc = loaded("dinov2")
    opts = EncoderOptions(samples=4, batch_size=4, image_size=SIZE)
    result = score_encoder(enc, "magnitude", opts, progress=False)
    half = prune_encoder(enc, result, 0.5, "uniform", opts, progress=False)  # 32 = 1 × hidden
    assert half.model.config.mlp_ratio == 1 and not hasattr(half.model.config, "intermediate_sizes")
    folder = save_encoder(half, enc, str(tmp_path / "native"))
    assert not (folder / "modeling_hfprune.py").exists()
    x = batch_for(enc)
    with torch.no_grad():
        assert torch.equal(embed(load_encoder(str(folder)).model, x), embed(half.model, x))
    odd = prune_encoder(enc, result, 0.25, "uniform", opts, progress=False)  # 48: not a multiple of 32
    with pytest.raises(HFPruneError, match="multiple of the hidden size"):
        save_encoder(odd, enc, str(tmp_path / "odd"), mode="hf-native")
    assert not (tmp_path / "odd").exists()


@pytest.mark.parametrize("family", ["dinov2", "bert"])
def test_adaptive_search_hits_ratio(family):
    enc = loaded(family)
    opts = EncoderOptions(samples=8, batch_size=8, image_size=SIZE, seq_len=12, heldout_samples=8, halvings=4)
    result = score_encoder(enc, "magnitude", opts, progress=False)
    if family == "bert":  # the text path draws windows from core.data; give it fixed ids here
        import core.methods.encoders as vision

        original = vision.heldout_data
        vision.heldout_data = lambda _loaded, _options: batch_for(enc, 8, seed=5)
    try:
        plan = plan_encoder_widths(enc, result, 0.4, "adaptive", opts, temp_inv=20.0, progress=False)
    finally:
        if family == "bert":
            vision.heldout_data = original
    assert sum(plan.widths) == round(0.6 * 128)
    assert plan.adaptive.fidelity == "similarity_entropy" and plan.adaptive.mode == "sequential"
    assert all(t.tried for t in plan.adaptive.traces)


def test_evaluator_restart_equals_full_forward():
    enc = loaded("vit")
    scores = [torch.rand(64) for _ in range(2)]
    ev = EmbeddingEntropyEvaluator(enc.model, batch_for(enc, 6), scores, temp_inv=20.0, batch_size=4)
    assert abs(ev.value(0) - ev.dense_value) < 1e-6
    ev.masks[1] = ev.width_mask(1, 16)
    assert abs(ev.value(1) - ev.value(0)) < 1e-5
    assert ev.value(1) != pytest.approx(ev.dense_value, abs=1e-7)


def test_feature_distillation_through_the_training_engine():
    from core.methods.encoders import distill_encoder
    from core.train.loop import TrainOptions

    teacher = loaded("dinov2")
    opts = EncoderOptions(samples=4, batch_size=4, image_size=SIZE)
    result = score_encoder(teacher, "magnitude", opts, progress=False)
    student = prune_encoder(teacher, result, 0.5, "uniform", opts, progress=False).model
    data = batch_for(teacher, 16, seed=3)
    heldout = batch_for(teacher, 4, seed=4)
    objective = FeatureDistillation()
    before = objective.heldout(student, teacher.model, heldout, 4, None)
    train = distill_encoder(student, teacher.model, data, TrainOptions(steps=12, lr=3e-4, warmup_steps=2, beta2=0.95,
                                                                       batch_size=4, eval_every=6),
                            heldout=heldout)
    assert train.steps == 12 and train.heldout_name == "feature_mse"
    assert train.final_heldout < before
    with torch.no_grad():
        s, t = prefinal_tokens(student, heldout), prefinal_tokens(teacher.model, heldout)
    assert abs(FeatureDistillation.loss(s, t)[0].item() - train.final_heldout) < 1e-4


def test_cli_score_prune_eval_on_an_encoder_folder(tmp_path, capsys):
    """The real command line in-process (``core.cli.main``; tests/test_cli.py covers the subprocess path)."""
    from core.cli import main

    def cli(*args: str) -> tuple[int, str, str]:
        code = main([*args, "--quiet"])
        out = capsys.readouterr()
        return code, out.out, out.err

    enc = loaded("dinov2")
    folder = tmp_path / "tiny-dinov2"
    enc.model.save_pretrained(str(folder))
    ImagePreprocess(SIZE).save_pretrained(folder)
    scores = tmp_path / "scores.safetensors"
    code, out, err = cli("score", "--model", str(folder), "--samples", "8", "--batch-size", "4", "--image-size",
                         str(SIZE), "--out", str(scores))
    assert code == 0, err
    config = json.loads(out)
    assert config["criterion"] == "amp_entropy" and config["criterion_params"]["temp_inv"] == 20.0
    pruned = tmp_path / "pruned"
    code, out, err = cli("prune", "--model", str(folder), "--scores", str(scores), "--ratio", "0.4", "--allocation",
                         "adaptive", "--heldout-samples", "8", "--halvings", "3", "--image-size", str(SIZE),
                         "--out", str(pruned))
    assert code == 0, err
    report = json.loads(out)
    assert report["export"] == "hf-remote-code" and sum(report["intermediate_sizes"]) == round(0.6 * 128)
    assert report["after"]["mlp_params"] < report["before"]["mlp_params"]
    code, out, err = cli("vision-eval", "--model", str(pruned), "--reference", str(folder), "--dataset", "lfw",
                         "--eval-size", str(SIZE))
    assert code == 0, err
    measured = json.loads(out)
    assert 0 <= measured["knn"] <= 1 and 0 < measured["embedding_cosine"] <= 1.0001
    # encoder-only flags on an LLM are one sentence, and nothing is written
    code, _out, err = cli("score", "--model", "smollm2-135m", "--temp-inv", "10", "--out", str(tmp_path / "x.safetensors"))
    assert code == 2 and "applies to encoders only" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_dashboard_vision_handlers_on_a_tiny_folder(tmp_path):
    from hfprune_ui.tabs import vision as tab

    enc = loaded("vit")
    folder = tmp_path / "tiny-vit"
    enc.model.save_pretrained(str(folder))
    ImagePreprocess(SIZE).save_pretrained(folder)
    status, heat, state = tab.run_score(str(folder), "amp_entropy", 8, SIZE, 4, 0)
    assert "amp_entropy" in status and state["result"].config["examples"] == 8
    assert len(heat.data[0].z) == 2  # one heatmap row per layer
    status, widths, trace, rows = tab.run_prune(state, 0.4, "adaptive", "independent", 8)
    assert status.startswith("Pruned 39.8%")  # 77 of 128 neurons kept
    assert [list(bar.y) for bar in widths.data][1] and sum(widths.data[1].y) == round(0.6 * 128)
    table = {row[0].split(" (")[0].split(",")[0]: row[1:] for row in rows}
    assert len(trace.data) == 2 and table["MLP parameters"][1] < table["MLP parameters"][0]
    assert 0 < table["embedding cosine to dense"][1] <= 1.0001
    # a quality number beside the dense one: kNN accuracy on held-out digits, the dense one computed once
    assert rows[0][0] == "kNN accuracy, digits (90 test images of 28 px, chance 0.10)"
    assert all(0 <= v <= 1 for v in table["kNN accuracy"]) and "**kNN accuracy** on 90 held-out digits" in status
    assert str(folder) in tab._DENSE_KNN


def test_quick_knn_reads_a_pruned_encoder_beside_the_dense_one():
    from core.measure.encoders import quick_knn
    from hfprune_ui.tabs import vision as tab

    enc = loaded("dinov2")
    out = quick_knn({"dense": enc.model, "same": enc.model}, enc.preprocess, per_class=6)
    assert out["size"] == 56 and out["test"] == 20 and out["examples"] == 60 and out["chance"] == 0.1
    assert out["accuracy"]["dense"] == out["accuracy"]["same"] and 0 <= out["accuracy"]["dense"] <= 1
    assert out["stderr"]["dense"] == pytest.approx((out["accuracy"]["dense"] * (1 - out["accuracy"]["dense"]) /
                                                    20) ** 0.5)
    text = loaded("bert")  # a text encoder: how many of each window's 5 nearest neighbours survive
    windows = batch_for(text, n=8)
    quality = tab._quality("tiny-bert", text, text.model, windows)
    assert quality["pruned"] == 1.0 and quality["label"] == "top-5 neighbours kept (held-out, 8 windows)"


def test_encoder_specs_and_errors(tmp_path):
    from core.errors import ModelLoadError, UnsupportedArchitectureError
    from core.models.encoders import is_encoder_spec

    assert is_encoder_spec("dinov2-small") and is_encoder_spec("minilm-l6") and not is_encoder_spec("smollm2-135m")
    folder = tmp_path / "tiny-bert"
    tiny_encoder("bert").save_pretrained(str(folder))
    assert is_encoder_spec(str(folder))
    with pytest.raises(ModelLoadError, match="Could not read a model config"):
        load_encoder(str(tmp_path / "missing"))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsupportedArchitectureError, match="'llama' model"):
        load_encoder(str(llama))
