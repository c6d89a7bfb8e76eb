"""DDP (core.ddp) and the training-loop hooks it uses (core.train), on tiny models."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn


class _Toy(nn.Module):
    """w descends (w − 3)²; lam has d loss / d lam = 1 and is trained by ascent."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.lam = nn.Parameter(torch.zeros(()))


class _ToyObjective:
    name, heldout_name = "toy", "loss"

    def __init__(self):
        self.progress: list[float] = []

    def needs_teacher(self) -> bool:
        return False

    def forward_backward(self, student, teacher, batch, state):
        from core.train.loop import LossReport

        self.progress.append(state.progress)
        loss = (student.w - 3).pow(2).sum() + student.lam
        (loss * state.scale).backward()
        return LossReport(float(loss.detach()), int(batch.numel()))

    def heldout(self, student, teacher, windows, batch_size, stop):
        return float((student.w - 3).pow(2).sum())


def test_train_loop_ascent_constant_lr_and_clip_exclusion(monkeypatch):
    from core.train.loop import ParamSet, TrainOptions, train

    toy = _Toy()
    clipped: list[list[int]] = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        clipped.append([id(p) for p in params])
        return real_clip(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    objective = _ToyObjective()
    params = ParamSet("toy", [("w", toy.w), ("lam", toy.lam)], lr_scale={"lam": 2.0},
                      options={"lam": {"maximize": True, "clip": False, "schedule": False}})
    options = TrainOptions(steps=4, lr=0.01, warmup_steps=4, min_lr_ratio=0.0, batch_size=1, eval_every=0,
                           keep_best=False)
    train(toy, None, objective, torch.zeros(4, 3, dtype=torch.long), params, options)
    assert objective.progress == [0.0, 0.25, 0.5, 0.75]  # the annealing schedules read this
    # ascent with a constant lr of 2 × 0.01: Adam's first steps on a constant gradient are ≈ lr each
    assert toy.lam.item() == pytest.approx(4 * 0.02, rel=1e-3)
    # w follows warm-up × cosine: much less than 4 full steps of 0.01
    assert 0 < toy.w[0].item() < 0.02
    assert clipped and all(ids == [id(toy.w)] for ids in clipped)


# ----------------------------------------------------------------------------------------------
# DDP: gate maths
# ----------------------------------------------------------------------------------------------


def test_ste_relu_forward_is_relu_backward_is_identity():
    from core.methods.gates import ste_relu

    z = torch.tensor([-0.5, -0.05, 0.0, 0.3, 1.7], requires_grad=True)
    out = ste_relu(z)
    assert torch.equal(out.detach(), torch.tensor([0.0, 0.0, 0.0, 0.3, 1.7]))
    (out * torch.arange(1.0, 6.0)).sum().backward()
    assert torch.equal(z.grad, torch.arange(1.0, 6.0))  # closed gates still get the gradient


def test_clamp_after_each_step_lets_a_closed_gate_reopen(tiny_loaded):
    from core.methods.gates import DDPOptions, Gates
    from core.train.loop import TrainOptions

    gates = Gates(tiny_loaded("llama").model, DDPOptions(ratio=0.5, units="both"))
    params = gates.param_set(TrainOptions(steps=1, lr=0.1))
    for kind in ("mlp", "heads"):
        gates.set_values(kind, [torch.full_like(z, -3.0) for z in gates.types[kind].z])
    params.after_step()  # what core.train calls after every optimiser step
    assert all(float(z.detach().min()) == pytest.approx(-0.1) for unit in gates.types.values() for z in unit.z)
    lambdas = [n for n, _p in params.named if "lambda" in n]
    assert len(lambdas) == 6 and all(params.options[n]["maximize"] for n in lambdas)
    assert all(not params.option(n, "clip") for n in lambdas)
    assert params.lr_scale["mlp.lambda2"] == pytest.approx(0.4 / 0.1)


@pytest.mark.parametrize("progress, m", [(0.0, 0.5), (0.25, 0.3), (0.5, 0.5 - 0.4 * 0.5 ** 0.5), (1.0, 0.1)])
def test_surrogate_schedule_matches_the_formula(progress, m):
    from core.methods.gates import surrogate, surrogate_threshold

    assert surrogate_threshold(progress) == pytest.approx(m)
    z = torch.tensor([-0.1, 0.0, m / 2, m, 1.5 * m, 2 * m, 1.0, 3.0])
    expected = (1.2 * torch.sigmoid((2.4 / m) * (z.clamp_min(0) - m)) - 0.1).clamp(0, 1)
    assert torch.allclose(surrogate(z, m), expected, atol=1e-6)
    assert float(surrogate(torch.tensor(m), m)) == pytest.approx(0.5)
    assert float(surrogate(torch.tensor(0.0), m)) < 1e-3  # closed: s(0) ≈ 0
    assert float(surrogate(torch.tensor(2.5 * m), m)) == 1.0  # saturated a little beyond 2m


def test_expected_sparsity_is_global_over_layers(tiny_loaded):
    from core.methods.gates import DDPOptions, Gates

    gates = Gates(tiny_loaded("llama").model, DDPOptions(ratio=0.25))
    unit = gates.types["mlp"]
    gates.set_values("mlp", [torch.zeros(64), torch.full((64,), 2.0)])  # layer 0 closed, layer 1 open
    expected, binar = unit.expected_sparsity(0.5)
    assert float(expected.detach()) == pytest.approx(0.5, abs=1e-3)
    assert float(binar.detach()) == pytest.approx(0.0, abs=1e-3)
    assert unit.target == pytest.approx(32 / 128)


def test_warm_values_map_normalised_rank_into_the_gate():
    from core.methods.gates import warm_values

    scores = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0])]  # layer 1 ten times louder
    values = warm_values(scores, 0.5)
    flat = torch.cat(values)
    assert float(flat.min()) == pytest.approx(0.5) and float(flat.max()) == pytest.approx(1.0)
    # after dividing by the layer mean the two layers interleave: 1/2 = 10/20 < 1 = 20/20 < 3/2 = 30/20
    assert values[0][0] < values[0][1] < values[0][2] and values[1][0] < values[1][2] < values[1][1]


# ----------------------------------------------------------------------------------------------
# hardening: exact target, export ≡ hardened gated model
# ----------------------------------------------------------------------------------------------


def _random_gates(gates, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for kind, unit in gates.types.items():
        gates.set_values(kind, [torch.rand(z.shape, generator=gen) * 1.6 - 0.1 for z in unit.z])


@pytest.mark.parametrize("arch, granularity", [("llama", "kv"), ("qwen2", "query"), ("qwen3", "kv"),
                                               ("mistral", "query"), ("gemma3_text", "query"), ("llama", "query")])
def test_hardened_gates_hit_the_exact_target_and_the_sliced_model_equals_them(tiny_loaded, arch, granularity):
    from core.methods.gates import DDPOptions, Gates

    model = tiny_loaded(arch, layers=3).model
    gates = Gates(model, DDPOptions(ratio=0.3, units="both", head_ratio=0.3, head_granularity=granularity))
    _random_gates(gates)
    ids = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(2))
    with gates.attached(), gates.using("hard"), torch.no_grad():
        hard = model(input_ids=ids).logits
    with torch.no_grad():
        dense = model(input_ids=ids).logits  # hooks removed: the model itself is untouched
    plan = gates.plan()
    assert sum(plan.widths()) == round(0.7 * 3 * 64)  # exact global target
    heads, kv = plan.head_counts()
    if granularity == "kv":  # 2 KV groups of 2 query heads per layer: keep round(0.7 · 6) = 4 groups
        assert sum(kv) == 4 and heads == [2 * k for k in kv]
    else:  # slots of one query head per KV head: keep round(0.7 · 6) = 4 slots, all KV heads stay
        assert kv == [2, 2, 2] and sum(heads) == 4 * 2
    assert min(heads) >= 1 and min(plan.widths()) >= 1
    pruned = plan.apply(model)
    with torch.no_grad():
        sliced = pruned(input_ids=ids).logits
    assert torch.allclose(sliced, hard, atol=1e-5), (sliced - hard).abs().max()
    assert not torch.allclose(hard, dense, atol=1e-3)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, dense)  # apply() never touches the source model


def test_plan_round_trips_through_tensors(tiny_loaded):
    from core.methods.gates import DDPOptions, DDPPlan, Gates

    model = tiny_loaded("qwen3").model
    gates = Gates(model, DDPOptions(ratio=0.4, units="both"))
    _random_gates(gates, seed=3)
    plan = gates.plan()
    again = DDPPlan.from_tensors(plan.to_tensors())
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        assert torch.equal(plan.apply(model)(input_ids=ids).logits, again.apply(model)(input_ids=ids).logits)


# ----------------------------------------------------------------------------------------------
# the recipe: training, export, reload
# ----------------------------------------------------------------------------------------------


def _ddp_options(**kw):
    from core.methods.gates import DDPOptions

    base = {"ratio": 0.25, "seq_len": 32, "heldout_windows": 2, "heldout_seq_len": 32}
    return DDPOptions(**{**base, **kw})


def _train(**kw):
    from core.train.loop import TrainOptions

    base = {"steps": 2, "lr": 5e-2, "warmup_steps": 0, "batch_size": 2, "eval_every": 1}
    return TrainOptions(**{**base, **kw})


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma3_text"])
def test_head_pruned_ddp_model_exports_and_reloads(tiny_loaded, tmp_path, arch):
    from core.export.hf import read_meta
    from core.methods.gates import ddp, save_ddp
    from core.models.loading import load_model

    loaded = tiny_loaded(arch)
    result = ddp(loaded, _ddp_options(units="both", head_ratio=0.5, heldout_windows=0), _train(steps=1))
    folder = save_ddp(result, loaded.tokenizer, tmp_path / "out")
    meta = read_meta(folder)
    assert meta["export"] == "hf-remote-code"
    assert sum(meta["heads"]["layer_num_attention_heads"]) == 4  # half of 2 layers × 4 heads
    reloaded = load_model(str(folder))  # our own remote code: trusted without a flag
    ids = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
        assert torch.allclose(reloaded.model(input_ids=ids).logits, expected, atol=1e-5)
    assert [a.self_attn.q_proj.out_features // 8 for a in reloaded.model.model.layers] == \
        meta["heads"]["layer_num_attention_heads"]
    generated = reloaded.model.generate(ids[:1, :6], max_new_tokens=4, do_sample=False)  # the KV cache works
    assert generated.shape == (1, 10)


def test_final_heldout_kl_is_the_exported_models_kl(tiny_loaded):
    """The loop's held-out number is measured on the hardened gates: it must equal the exported model's KL."""
    from core.data.text import training_windows
    from core.methods.gates import ddp
    from core.train.loop import LogitDistillation

    loaded = tiny_loaded("qwen2")
    options = _ddp_options(units="both")
    result = ddp(loaded, options, _train(steps=3, keep_best=False))
    _windows, heldout = training_windows(loaded.tokenizer, "wiki", 32, heldout=2, heldout_seq_len=32, seed=0)
    kl = LogitDistillation().heldout(result.model, loaded.model, heldout, 2, None)
    assert kl == pytest.approx(result.train.final_heldout, rel=1e-4, abs=1e-7)
    assert result.meta["ddp"]["tokens_seen"] == 3 * 2 * 32


def test_training_pushes_toward_the_target(tiny_loaded):
    from core.methods.gates import ddp

    points = []
    result = ddp(tiny_loaded("llama"), _ddp_options(ratio=0.5),
                 _train(steps=8, lr=0.2, eval_every=0), on_step=points.append)
    history = result.history
    assert len(history) == 8 and sorted({p["step"] for p in points if "m" in p}) == list(range(1, 9))
    first, last = history[0]["mlp"], history[-1]["mlp"]
    assert first["expected_sparsity"] < 0.1 and last["expected_sparsity"] > first["expected_sparsity"] + 0.05
    assert last["lambdas"][0] < 0  # ŝ < t: ascent on λ1·(ŝ − t) drives λ1 negative, rewarding sparsity
    assert last["lambdas"][1] > 0 and last["lambdas"][2] > 0  # the squared and binarisation terms only grow
    assert result.meta["achieved_ratio"] == pytest.approx(0.5)
    assert result.snapshots[0]["step"] == 0 and result.snapshots[-1]["step"] == 8
    assert sum(result.snapshots[-1]["mlp"]) == 128


def test_warm_start_uses_the_entropy_scores(tiny_loaded):
    from core.methods.gates import ddp
    from core.methods.oneshot import score_model

    loaded = tiny_loaded("llama")
    scores = score_model(loaded, "entropy", samples=2, seq_len=32, progress=False).scores
    result = ddp(loaded, _ddp_options(ratio=0.5, warm_start=True, warm_low=0.2), _train(steps=1, lr=1e-4),
                 scores=scores)
    # one tiny step leaves the warm-started order: the kept neurons are the global entropy top half
    assert result.meta["ddp"]["entropy_global_widths"] == result.entropy_widths
    assert abs(sum(result.entropy_widths) - sum(result.plan.widths())) <= 1
    from core.prune.allocate import normalize_scores

    normed = torch.cat(normalize_scores(scores, "mean"))
    cut = normed.sort(descending=True).values[63]
    kept = torch.cat([s[k] for s, k in zip(normalize_scores(scores, "mean"), result.plan.mlp_kept)])
    assert float(kept.min()) >= float(cut) - 1e-6


def test_stop_leaves_the_model_unchanged(tiny_loaded):
    from core.errors import Stopped
    from core.methods.gates import ddp

    loaded = tiny_loaded("llama")
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    calls = []
    with pytest.raises(Stopped):
        ddp(loaded, _ddp_options(units="both"), _train(steps=50, eval_every=0),
            stop=lambda: calls.append(1) or len(calls) > 3)
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
    assert not loaded.model.model.layers[0].mlp.down_proj._forward_pre_hooks  # gates detached
    assert all(p.requires_grad for p in loaded.model.parameters())


def test_bad_inputs_are_one_sentence_errors(tiny_loaded):
    from core.errors import HFPruneError, PruneConfigError
    from core.methods.gates import DDPOptions, ddp

    with pytest.raises(PruneConfigError, match="units"):
        DDPOptions(units="experts")
    with pytest.raises(PruneConfigError, match="ratio"):
        DDPOptions(ratio=1.0)
    with pytest.raises(PruneConfigError, match="both be 0"):
        DDPOptions(kd_weight=0, ce_weight=0)
    with pytest.raises(PruneConfigError, match="fewer than one per layer"):
        ddp(tiny_loaded("llama"), _ddp_options(units="heads", ratio=0.9), _train())
    assert issubclass(PruneConfigError, HFPruneError)


def test_head_pruned_model_refuses_other_export_modes(tiny_loaded, tmp_path):
    from core.errors import PruneConfigError
    from core.methods.gates import DDPOptions, Gates, save_ddp

    loaded = tiny_loaded("llama")
    gates = Gates(loaded.model, DDPOptions(units="heads", ratio=0.5))
    _random_gates(gates)
    plan = gates.plan()

    class _Result:  # only what save_ddp reads
        model, meta = plan.apply(loaded.model), {"model": "tiny"}

    _Result.plan = plan
    for mode in ("hf-native", "hf-padded", "gguf"):
        with pytest.raises(PruneConfigError, match="hf-remote-code"):
            save_ddp(_Result, loaded.tokenizer, tmp_path / mode, mode)
        assert not (tmp_path / mode).exists()


def test_default_export_mode_for_head_pruned_variants():
    from core.export.hf import default_export_mode

    assert default_export_mode([32, 32])[0] == "hf-native"
    mode, why = default_export_mode([32, 32], heads_pruned=True)
    assert mode == "hf-remote-code" and "attention heads" in why


def test_cli_ddp_writes_a_folder_and_bad_input_writes_nothing(tmp_path, real_tokenizer):
    from conftest import make_tiny, run_cli

    from core.export.hf import read_meta

    dense = tmp_path / "dense"
    make_tiny("llama").save_pretrained(str(dense))
    real_tokenizer.save_pretrained(str(dense))
    out = tmp_path / "ddp"
    done = run_cli("ddp", "--model", str(dense), "--ratio", "0.25", "--units", "both", "--steps", "2",
                   "--batch-size", "2", "--seq-len", "32", "--heldout-windows", "2", "--heldout-seq-len", "32",
                   "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["steps"] == 2 and report["tokens_seen"] == 128 and report["achieved_ratio"] == 0.25
    assert report["heads"]["granularity"] == "query" and sum(report["heads"]["layer_num_attention_heads"]) == 6
    meta = read_meta(out)
    assert meta["export"] == "hf-remote-code" and meta["criterion"] == "ddp"
    for bad in (["--steps", "0"], ["--steps", "1", "--ratio", "1.5"]):
        target = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        failed = run_cli("ddp", "--model", str(dense), "--seq-len", "32", "--out", str(target), *bad)
        assert failed.returncode != 0 and not target.exists(), bad
        lines = [line for line in failed.stderr.strip().splitlines() if line.startswith("error:")]
        assert len(lines) == 1, failed.stderr


# ----------------------------------------------------------------------------------------------
# dashboard
# ----------------------------------------------------------------------------------------------


@pytest.fixture()
def dashboard(tiny_services, tmp_path):
    """(services, session, run store root) with a tiny model loaded and its entropy scores computed."""
    services, session, _folder = tiny_services
    return services, session, tmp_path / "runs"


def _form(**kw):
    """The DDP tab's inputs, in order."""
    values = {"ratio": 0.25, "units": "both", "head_ratio": 0.5, "minutes": 0, "steps": 3, "lr": 5e-2,
              "warm_start": True, "name": "", "batch_size": 2, "seq_len": 32, "eval_every": 1, "kd_weight": 2.0, **kw}
    return list(values.values())


def test_dashboard_ddp_streams_curves_and_the_run_reloads_after_restart(dashboard):
    from hfprune_ui.services import Services
    from hfprune_ui.tabs.ddp import make_start, show_snapshot

    services, session, root = dashboard
    outputs = list(make_start(services)(*_form()))
    status, sparsity, lambdas, _hist, slider, widths, snapshots = outputs[-1]
    assert "Done" in status and "ddp-both-25" in status
    assert len(sparsity.data) >= 6 and len(lambdas.data) == 6  # ŝ, gates at 0, target per type + KL; 3 λ's × 2
    assert [t.name for t in widths.data][:2] == ["DDP (learned gates)", "one-shot entropy scores, global allocation"]
    assert slider["maximum"] == len(snapshots) - 1 and snapshots[-1]["step"] == 3
    assert show_snapshot(0, snapshots).layout.title.text == "Gate values at step 0"
    variant = session.variants["ddp-both-25"]
    assert sum(variant.widths) == 96 and sum(variant.meta["heads"]["layer_num_attention_heads"]) == 4
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        expected = variant.model(input_ids=ids).logits
    restarted = Services(runs_root=root)  # a new server process: nothing in memory
    fresh = restarted.sessions.get("other")
    assert "DDP variant" in restarted.load_run(fresh, variant.run_id)
    with torch.no_grad():
        assert torch.allclose(fresh.variants["ddp-both-25"].model(input_ids=ids).logits, expected, atol=1e-5)


def test_dashboard_ddp_stop_stores_nothing(dashboard):
    from hfprune_ui.tabs.ddp import make_start, make_stop

    services, session, _root = dashboard
    base = services.model(session.model_spec).model
    state = {k: v.clone() for k, v in base.state_dict().items()}
    messages = []
    for status, *_rest in make_start(services)(*_form(steps=500, warm_start=False)):
        messages.append(status)
        if "step " in status and "step 0" not in status and len(messages) < 50:
            make_stop(services)()
    assert "Stopped" in messages[-1] and "nothing was stored" in messages[-1]
    assert services.runs.list("ddp") == [] and not session.variants
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())
    assert services.model_lock.acquire(timeout=1)
    services.model_lock.release()
