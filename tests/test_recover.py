"""The training engine (core.train) and recovery recipes (core.recover) on tiny models."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import make_tiny, run_cli, tiny_config


def _pruned(teacher, widths=(32, 32)):
    from core.models.slicing import prune_mlp_neurons

    gen = torch.Generator().manual_seed(1)
    kept = [torch.randperm(64, generator=gen)[:w].sort().values for w in widths]
    return prune_mlp_neurons(teacher, kept)


@pytest.fixture()
def pair(real_tokenizer):
    """(student, teacher) LoadedModels: a tiny Llama and a 50 % pruned copy of it."""
    from core.models.loading import LoadedModel

    teacher = make_tiny("llama", seed=0)
    return (LoadedModel(_pruned(teacher), real_tokenizer, "tiny-pruned", ""),
            LoadedModel(teacher, real_tokenizer, "tiny-teacher", ""))


def _fast(**kw):
    from core.train.loop import TrainOptions

    base = {"steps": 2, "lr": 1e-3, "warmup_steps": 0, "batch_size": 2, "eval_every": 1}
    return TrainOptions(**{**base, **kw})


def _recover_options(**kw):
    from core.methods.recover import RecoverOptions

    base = {"params": "mlp", "seq_len": 32, "heldout_windows": 2, "heldout_seq_len": 32}
    return RecoverOptions(**{**base, **kw})


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def test_distill_loss_matches_autograd_reference():
    from core.train.loop import distill_loss

    torch.manual_seed(0)
    z = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 11, dtype=torch.float64)
    y = torch.tensor([1, 2, -100, 4, 5, 0])
    for tau, alpha in ((1.0, 1.0), (2.0, 0.5), (0.5, 0.0), (1.0, 0.3)):
        ours = distill_loss(z, t, y, tau, alpha)
        kl = torch.nn.functional.kl_div(torch.log_softmax(z / tau, -1), torch.log_softmax(t / tau, -1),
                                        log_target=True, reduction="none").sum(-1) * tau * tau
        ce = torch.nn.functional.cross_entropy(z, y.clamp_min(0), reduction="none") * (y >= 0)
        ref = alpha * kl + (1 - alpha) * ce
        assert torch.allclose(ours, ref, atol=1e-10)
        g_ours, = torch.autograd.grad(ours.sum(), z)
        g_ref, = torch.autograd.grad(ref.sum(), z)
        assert torch.allclose(g_ours, g_ref, atol=1e-10)


def test_one_kd_step_lowers_kl_on_its_batch(pair):
    from core.methods.recover import param_set
    from core.train.loop import LogitDistillation, train

    student, teacher = pair
    batch = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(3))
    objective = LogitDistillation()
    before = objective.heldout(student.model, teacher.model, batch, 2, None)
    result = train(student.model, teacher.model, objective, batch, param_set(student.model, "full"),
                   _fast(steps=1, lr=3e-3, keep_best=False, grad_clip=0), heldout=batch)
    after = objective.heldout(student.model, teacher.model, batch, 2, None)
    assert result.steps == 1 and result.tokens == 64
    assert after < before * 0.98, (before, after)


def test_mlp_set_trains_only_mlps_and_teacher_is_untouched(pair):
    from core.methods.recover import recover

    student, teacher = pair
    attn_before = student.model.model.layers[0].self_attn.q_proj.weight.clone()
    mlp_before = student.model.model.layers[0].mlp.up_proj.weight.clone()
    teacher_state = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    result = recover(student, teacher, _recover_options(params="mlp"), _fast(steps=2, keep_best=False))
    assert torch.equal(result.model.model.layers[0].self_attn.q_proj.weight, attn_before)
    assert not torch.equal(result.model.model.layers[0].mlp.up_proj.weight, mlp_before)
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.model.state_dict().items())
    recovery = result.meta["recovery"]
    assert recovery["tokens_seen"] == 2 * 2 * 32 and recovery["params"] == "mlp"
    assert [p["step"] for p in recovery["curve"]] == [0, 1, 2]
    assert recovery["curve"][0]["heldout"] == pytest.approx(recovery["heldout_kl_before"], rel=1e-5)


def test_lora_merge_leaves_logits_unchanged(pair):
    from core.methods.recover import LoraOptions, attach_lora

    student, _teacher = pair
    wrapped, params = attach_lora(student.model, LoraOptions(rank=4, alpha=8))
    with torch.no_grad():
        for _n, p in params.named:
            p.normal_(0, 0.1)  # lora_B starts at zero: make the adapters do something
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(5))
    base = wrapped.get_base_model()
    adapted = _logits(base, ids)
    merged = wrapped.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_modules())
    assert torch.allclose(_logits(merged, ids), adapted, atol=1e-5)


@pytest.mark.parametrize("params", ["lora", "full"])
def test_recovered_non_uniform_model_exports_and_reloads_identically(pair, tmp_path, real_tokenizer, params):
    from core.export.hf import read_meta
    from core.methods.recover import recover, save_recovered
    from core.models.loading import LoadedModel, load_model

    _student, teacher = pair
    student = LoadedModel(_pruned(teacher.model, (40, 24)), real_tokenizer, "tiny-nonuniform", "")
    result = recover(student, teacher, _recover_options(params=params), _fast(steps=2))
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(7))
    expected = _logits(result.model, ids)
    for mode in ("hf-remote-code", "hf-padded"):
        folder = save_recovered(result, real_tokenizer, str(tmp_path / mode), mode)
        reloaded = load_model(str(folder))
        assert torch.allclose(_logits(reloaded.model, ids), expected, atol=1e-5), mode
        meta = read_meta(folder)
        assert meta["export"] == mode and meta["intermediate_sizes"] == [40, 24]
        assert meta["recovery"]["params"] == params and meta["recovery"]["tokens_seen"] == 128


def test_uniform_recovered_model_exports_hf_native(pair, tmp_path):
    from core.methods.recover import recover, save_recovered
    from core.models.loading import load_model

    student, teacher = pair
    result = recover(student, teacher, _recover_options(params="lora"), _fast(steps=1))
    folder = save_recovered(result, student.tokenizer, str(tmp_path / "native"))
    ids = torch.randint(0, 1000, (1, 16))
    assert json.loads((folder / "config.json").read_text())["intermediate_size"] == 32
    assert torch.allclose(_logits(load_model(str(folder)).model, ids), _logits(result.model, ids), atol=1e-5)


def test_minutes_budget_stops_within_one_step(pair):
    from core.methods.recover import recover

    student, teacher = pair
    result = recover(student, teacher, _recover_options(heldout_windows=0), _fast(steps=0, minutes=0.02,
                                                                                  eval_every=0))
    train = result.train
    assert train.ended_by == "minutes" and train.steps >= 1
    assert 1.2 <= train.seconds <= 1.2 + train.timing["max_step"] + 0.05


def test_token_budget_and_best_checkpoint(pair):
    from core.methods.recover import recover

    student, teacher = pair
    result = recover(student, teacher, _recover_options(), _fast(steps=0, tokens=150, eval_every=1))
    assert result.train.ended_by == "tokens" and result.train.tokens == 192  # 3 steps of 2 × 32
    heldouts = [p["heldout"] for p in result.train.curve]
    assert result.train.final_heldout == pytest.approx(min(heldouts))


@pytest.mark.parametrize("params", ["mlp", "lora"])
def test_stop_leaves_the_student_as_before(pair, params):
    from core.methods.recover import recover
    from core.train.loop import Stopped

    student, teacher = pair
    ids = torch.randint(0, 1000, (1, 16))
    before = _logits(student.model, ids)
    state = {k: v.clone() for k, v in student.model.state_dict().items()}
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3  # a few steps in

    with pytest.raises(Stopped):
        recover(student, teacher, _recover_options(params=params), _fast(steps=50, eval_every=0), stop=stop)
    assert student.model.state_dict().keys() == state.keys()  # no LoRA layers left behind
    assert all(torch.equal(v, state[k]) for k, v in student.model.state_dict().items())
    assert torch.equal(_logits(student.model, ids), before)
    assert all(p.requires_grad for p in student.model.parameters())


def test_same_seed_gives_the_same_model(real_tokenizer):
    from core.methods.recover import recover
    from core.models.loading import LoadedModel

    teacher = LoadedModel(make_tiny("llama", seed=0), real_tokenizer, "t", "")
    runs = []
    for _ in range(2):
        student = LoadedModel(_pruned(teacher.model), real_tokenizer, "s", "")
        result = recover(student, teacher, _recover_options(params="lora"), _fast(steps=2, seed=3))
        runs.append(result)
    a, b = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    curves = [[{k: v for k, v in point.items() if k not in ("elapsed", "cpu")} for point in r.train.curve]
              for r in runs]  # the same curve but for the clocks
    assert curves[0] == curves[1]


def test_bad_inputs_are_one_sentence_errors(pair, real_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from core.errors import DataError, HFPruneError
    from core.methods.recover import LoraOptions, recover
    from core.models.loading import LoadedModel
    from core.train.loop import TrainConfigError, TrainOptions

    student, teacher = pair
    with pytest.raises(TrainConfigError, match="budget"):
        TrainOptions()
    with pytest.raises(TrainConfigError, match="minutes"):
        TrainOptions(minutes=-1)
    with pytest.raises(TrainConfigError, match="lr"):
        TrainOptions(steps=1, lr=0)
    other_vocab = tiny_config("llama")
    other_vocab.vocab_size = 1000
    odd = LoadedModel(AutoModelForCausalLM.from_config(other_vocab), real_tokenizer, "odd", "")
    with pytest.raises(TrainConfigError, match="vocabulary"):
        recover(student, odd, _recover_options(), _fast())
    with pytest.raises(TrainConfigError, match="matches no linear layer"):
        recover(student, teacher, _recover_options(params="lora"), _fast(), lora=LoraOptions(targets="q_proj,nope"))
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(f"Paragraph {i} says a few plain words about item {i}." * 3 for i in range(12)))
    with pytest.raises(DataError):
        recover(student, teacher, _recover_options(source=str(short), seq_len=64), _fast(batch_size=16))
    quantized = copy.deepcopy(student)
    quantized.model.hfprune_quantization = "torchao-int8"
    with pytest.raises(TrainConfigError, match="quantized"):
        recover(quantized, teacher, _recover_options(), _fast())
    for exc in (TrainConfigError, DataError):
        assert issubclass(exc, HFPruneError)
    assert all(p.requires_grad for p in student.model.parameters())


def test_really_quantized_student_is_refused(pair):
    pytest.importorskip("torchao")
    from core.methods.recover import recover
    from core.quantize.backends import quantize_model
    from core.train.loop import TrainConfigError

    student, teacher = pair
    quantize_model(student.model, "torchao-int8")
    with pytest.raises(TrainConfigError, match="torchao-int8"):
        recover(student, teacher, _recover_options(), _fast())


def test_cli_recover_writes_a_folder_and_bad_input_writes_nothing(tmp_path, real_tokenizer):
    from core.export.hf import read_meta, save_pruned

    teacher = make_tiny("llama", seed=0)
    dense = tmp_path / "dense"
    teacher.save_pretrained(str(dense))
    real_tokenizer.save_pretrained(str(dense))
    student = save_pruned(_pruned(teacher), real_tokenizer, tmp_path / "pruned",
                          {"model": str(dense), "ratio": 0.5, "achieved_ratio": 0.5})
    out = tmp_path / "recovered"
    done = run_cli("recover", "--model", str(student), "--params", "lora", "--lora-rank", "4", "--steps", "2",
                   "--batch-size", "2", "--seq-len", "32", "--heldout-windows", "2", "--heldout-seq-len", "32",
                   "--warmup-steps", "0", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["teacher"] == str(dense) and report["steps"] == 2 and report["tokens_seen"] == 128
    meta = read_meta(out)
    assert meta["recovery"]["lora"]["rank"] == 4 and meta["ratio"] == 0.5 and meta["export"] == "hf-native"
    for bad in (["--minutes", "0", "--lr", "0"], ["--steps", "1", "--params", "lora", "--lora-targets", "nope"]):
        target = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        failed = run_cli("recover", "--model", str(student), "--seq-len", "32", "--out", str(target), *bad)
        assert failed.returncode != 0 and not target.exists(), bad
        lines = [line for line in failed.stderr.strip().splitlines() if line.startswith("error:")]
        assert len(lines) == 1, failed.stderr


@pytest.fixture()
def dashboard(tiny_services, tmp_path):
    """(services, session, run store root) with a tiny model's 50 % pruned variant 'half'."""
    services, session, _folder = tiny_services
    services.prune(session, "entropy", 0.5, "global", 1, "half")
    return services, session, tmp_path / "runs"


def _form(**kw):
    """The Recover tab's inputs, in order (source, params, minutes, steps, lr, name, tau, alpha, rank, batch,
    seq_len, eval_every)."""
    values = {"source": "half", "params": "lora", "minutes": 0, "steps": 3, "lr": 1e-3, "name": "", "tau": 1.0,
              "alpha": 1.0, "lora_rank": 4, "batch_size": 2, "seq_len": 32, "eval_every": 1, **kw}
    return list(values.values())


def test_dashboard_recover_streams_curves_and_the_run_reloads_after_restart(dashboard):
    from hfprune_ui.services import Services
    from hfprune_ui.tabs.recover import make_start

    services, session, root = dashboard
    outputs = list(make_start(services)(*_form()))
    status, _plot, update = outputs[-1]
    assert "Recovered" in status and update["value"] == "half+kd-lora"
    variant = session.variants["half+kd-lora"]
    assert variant.meta["recovery"]["steps"] == 3 and variant.widths == session.variants["half"].widths
    ids = torch.randint(0, 1000, (1, 16))
    expected = _logits(variant.model, ids)
    restarted = Services(runs_root=root)  # a new server process: nothing in memory
    fresh = restarted.sessions.get("other")
    message = restarted.load_run(fresh, variant.run_id)
    assert "recovered variant" in message
    assert torch.allclose(_logits(fresh.variants["half+kd-lora"].model, ids), expected, atol=1e-5)
    assert not torch.allclose(_logits(fresh.variants["half+kd-lora"].model, ids),
                              _logits(session.variants["half"].model, ids), atol=1e-6)


def test_dashboard_stop_ends_the_worker_and_stores_nothing(dashboard):
    from hfprune_ui.tabs.recover import make_start, make_stop

    services, session, _root = dashboard
    ids = torch.randint(0, 1000, (1, 16))
    before = _logits(session.variants["half"].model, ids)
    runs_before = len(services.runs.list("recover"))
    messages = []
    for status, _plot, _update in make_start(services)(*_form(params="mlp", steps=500)):
        messages.append(status)
        if "step " in status and "step 0" not in status and len(messages) < 50:
            make_stop(services)()
    assert "Stopped" in messages[-1] and "nothing was stored" in messages[-1]
    assert len(services.runs.list("recover")) == runs_before and list(session.variants) == ["half"]
    assert torch.equal(_logits(session.variants["half"].model, ids), before)
    assert services.model_lock.acquire(timeout=1)  # the worker let go of the model
    services.model_lock.release()


def test_param_ratio_converts_to_a_neuron_ratio_on_a_tiny_model():
    from core.errors import PruneConfigError
    from core.models.counts import count_params
    from core.models.slicing import prune_mlp_neurons
    from core.prune.allocate import neuron_ratio_for_param_ratio as convert
    from core.prune.allocate import removed_shares, uniform_widths

    model = make_tiny("llama", intermediate_size=256)
    params = count_params(model)["params"]
    neuron_ratio = convert(model, 0.01)
    mlp_share = (count_params(model)["mlp_params"]) / params
    assert neuron_ratio == pytest.approx(0.01 / mlp_share)  # no MLP biases: every MLP weight scales with width
    widths = uniform_widths([256, 256], neuron_ratio)
    shares = removed_shares(model, widths)
    assert shares["mlp_neuron_ratio"] == pytest.approx(1 - sum(widths) / 512)
    assert shares["params_removed_share"] == pytest.approx(0.01, abs=0.0005)  # up to one neuron of rounding
    pruned = prune_mlp_neurons(model, [torch.arange(w) for w in widths])
    assert 1 - count_params(pruned)["params"] / params == pytest.approx(shares["params_removed_share"])
    with pytest.raises(PruneConfigError, match="impossible"):
        convert(model, 0.9)
    with pytest.raises(PruneConfigError, match=r"\[0, 1\)"):
        convert(model, -0.1)


def test_cli_prune_accepts_a_share_of_all_parameters(tmp_path, real_tokenizer):
    from core.export.hf import read_meta

    folder = tmp_path / "tiny"
    make_tiny("llama", intermediate_size=256).save_pretrained(folder)
    real_tokenizer.save_pretrained(folder)
    out = tmp_path / "p"
    done = run_cli("prune", "--model", str(folder), "--param-ratio", "0.01", "--samples", "2", "--seq-len", "16",
                   "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["param_ratio"] == 0.01 and report["params_removed_share"] == pytest.approx(0.01, abs=0.0005)
    assert report["achieved_ratio"] > 0.1  # the MLPs of this tiny model hold only a small share of its parameters
    assert read_meta(out)["params_removed_share"] == pytest.approx(report["params_removed_share"], abs=1e-5)
    both = run_cli("prune", "--model", str(folder), "--param-ratio", "0.01", "--ratio", "0.2", "--out",
                   str(tmp_path / "q"))
    assert both.returncode != 0 and "exactly one" in both.stderr and not (tmp_path / "q").exists()
