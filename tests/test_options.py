"""The option mechanism: one declaration gives validation, CLI flags, UI ranges and tolerant loading."""
from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass

import pytest
import torch

import core.methods.oneshot as oneshot
import core.prune.allocate as allocate
from core.data.text import CalibrationOptions, HeldoutWindows, TextSource, TextWindows, TrainingText
from core.errors import PruneConfigError, SelectionError
from core.methods.encoders import EncoderOptions
from core.methods.gates import DDPOptions
from core.methods.oneshot import ScoreResult, plan_widths, preview_widths, prune_with_scores, score_model
from core.methods.pipeline import PipelineOptions
from core.methods.recover import RecoverOptions
from core.options import Options, knob
from core.studies.stability import StabilityOptions
from core.train.loop import TrainConfigError


@dataclass
class _Demo(Options):
    error = PruneConfigError
    cli_prefix = "demo-"

    ratio: float = knob(0.2, "fraction removed", low=0.0, high=1.0, high_open=True, legacy=("old_ratio",))
    windows: int = knob(8, "windows", low=1, ui_high=64)
    mode: str = knob("a", "which mode", choices=("a", "b"))
    fast: bool = knob(False, "go fast")


def test_validation_names_the_flag_and_range():
    with pytest.raises(PruneConfigError, match=r"ratio \(--demo-ratio\) must be in \[0, 1\), got 1.0"):
        _Demo(ratio=1.0)
    with pytest.raises(PruneConfigError, match="windows .* must be ≥ 1, got 0"):
        _Demo(windows=0)
    with pytest.raises(PruneConfigError, match="must be one of a, b"):
        _Demo(mode="c")
    with pytest.raises(PruneConfigError, match="must be int"):
        _Demo(windows=2.5)
    with pytest.raises(PruneConfigError, match="must be in"):
        _Demo(ratio=float("nan"))
    assert _Demo(windows="3", ratio="0.5").windows == 3  # strings from forms / argparse are coerced


def test_cli_flags_round_trip():
    parser = argparse.ArgumentParser()
    _Demo.add_arguments(parser)
    args = parser.parse_args(["--demo-ratio", "0.3", "--demo-windows", "4", "--demo-mode", "b", "--demo-fast"])
    opts = _Demo.from_args(args)
    assert (opts.ratio, opts.windows, opts.mode, opts.fast) == (0.3, 4, "b", True)
    assert _Demo.from_args(parser.parse_args([])) == _Demo()
    assert "[0, 1)" in parser.format_help()


def test_ui_ranges_and_legacy_dicts():
    ui = _Demo.ui("ratio")
    assert ui["minimum"] == 0.0 and ui["maximum"] == pytest.approx(0.99) and ui["value"] == 0.2
    assert _Demo.ui("windows")["maximum"] == 64 and _Demo.ui("mode")["choices"] == ["a", "b"]
    # an old stored run: a renamed key, a None value, an unknown key
    old = _Demo.from_dict({"old_ratio": 0.4, "windows": None, "gone": 1})
    assert old == _Demo(ratio=0.4)
    assert _Demo.from_dict(old.to_dict()) == old


def test_a_methods_own_defaults_reach_its_form_and_its_flags():
    """Recovery's measured learning rate is what `python -m core recover` and the Recover tab start from."""
    import argparse

    from core.methods.recover import TRAIN_DEFAULTS
    from core.train.loop import TrainOptions

    assert TrainOptions.ui("lr")["value"] == TrainOptions(steps=1).lr
    assert TrainOptions.ui("lr", TRAIN_DEFAULTS)["value"] == TRAIN_DEFAULTS["lr"] != TrainOptions(steps=1).lr
    parser = argparse.ArgumentParser()
    TrainOptions.add_arguments(parser, defaults=TRAIN_DEFAULTS)
    assert TrainOptions.from_args(parser.parse_args(["--steps", "3"])).lr == TRAIN_DEFAULTS["lr"]
    assert TrainOptions.warmup_for(0) == 5 and TrainOptions.warmup_for(40) == 4 and TrainOptions.warmup_for(500) == 10


def _knob(cls, name):
    return {f.name: spec for f, spec, _ in cls.knobs()}[name]


def test_calibration_like_knobs_are_declared_once():
    """source / seq_len / samples / seed / heldout_* are declared in core.data.text's base groups; every
    group that reads such text extends them (or copies the knob with its own default), and the one-shot
    scorer's keyword defaults are CalibrationOptions'."""
    draws = (CalibrationOptions, StabilityOptions, EncoderOptions)
    for cls in (*draws, TrainingText, RecoverOptions, DDPOptions):
        for name in ("source", "seq_len"):
            assert _knob(cls, name).help == _knob(TextSource, name).help, (cls, name)
    for cls in draws:
        for name in ("samples", "seed"):
            assert _knob(cls, name).help == _knob(TextWindows, name).help, (cls, name)
    for cls in (TrainingText, RecoverOptions, DDPOptions):
        for name in ("heldout_windows", "heldout_seq_len"):
            assert _knob(cls, name) is _knob(HeldoutWindows, name), (cls, name)  # the very same declaration
    assert _knob(PipelineOptions, "heldout_windows") is _knob(HeldoutWindows, "heldout_windows")
    for name in ("source", "samples", "seq_len", "seed", "batch_size"):
        assert _knob(StabilityOptions, name) is _knob(CalibrationOptions, name)
    for name in ("source", "seq_len"):
        assert _knob(RecoverOptions, name) is _knob(DDPOptions, name) is _knob(TextSource, name)
    # a method's own defaults, with the base's help and range
    encoder = EncoderOptions()
    assert (encoder.samples, encoder.seq_len, encoder.batch_size) == (64, 64, 32)
    assert _knob(EncoderOptions, "samples").low == 2 and _knob(EncoderOptions, "seq_len") is _knob(TextSource, "seq_len")
    assert DDPOptions().warm_samples == CalibrationOptions().samples
    assert _knob(DDPOptions, "warm_samples").low == _knob(CalibrationOptions, "samples").low
    defaults = {n: p.default for n, p in inspect.signature(score_model).parameters.items()}
    assert {k: defaults[k] for k in CalibrationOptions().to_dict()} == CalibrationOptions().to_dict()
    # each group still validates with its own error class, naming its own flag
    with pytest.raises(SelectionError, match=r"samples \(--samples\) must be ≥ 1, got 0"):
        StabilityOptions(samples=0)
    with pytest.raises(TrainConfigError, match=r"heldout_seq_len \(--heldout-seq-len\) must be ≥ 8, got 4"):
        RecoverOptions(heldout_seq_len=4)


# How these groups were stored before they shared their knobs (RecoverOptions / DDPOptions in a recovered or
# DDP model's pruning_meta.json, EncoderOptions in an encoder's, StabilityOptions and PipelineOptions in runs).
OLD_STORED = {
    "RecoverOptions": {"params": "lora", "source": "news", "seq_len": 64, "heldout_windows": 4, "heldout_seq_len": 32},
    "DDPOptions": {"ratio": 0.3, "units": "both", "head_ratio": 0.0, "head_granularity": "auto", "kd_weight": 2.0,
                   "ce_weight": 1.0, "tau": 1.0, "lambda_lr": 0.02, "lambda2_lr": 0.4, "lambda_schedule": False,
                   "clamp_min": -0.1, "init_mean": 1.0, "init_std": 0.01, "warm_start": True, "warm_low": 0.5,
                   "warm_samples": 8, "min_layer_keep": 0.0, "source": "wiki", "seq_len": 96, "heldout_windows": 2,
                   "heldout_seq_len": 64, "histogram_every": 0},
    "EncoderOptions": {"samples": 16, "image_size": 112, "seq_len": 32, "source": "wiki", "batch_size": 8, "seed": 1,
                       "heldout_samples": 8, "mode": "independent", "halvings": 4, "min_keep": 0.05, "round_to": 1},
    "StabilityOptions": {"draws": 3, "samples": 8, "seq_len": 64, "seed": 2, "source": "news", "batch_size": 2},
    "PipelineOptions": {"order": "pqd", "ratio": 0.25, "criterion": "entropy", "allocation": "uniform", "round_to": 8,
                        "quant": "int8-dynamic", "params": "full", "heldout_windows": 2},
    "CalibrationOptions": {"source": "wiki", "samples": 2, "seq_len": 16, "seed": 3, "batch_size": 1},
}


def test_stored_option_dicts_of_the_old_shape_still_load():
    for cls in (RecoverOptions, DDPOptions, EncoderOptions, StabilityOptions, PipelineOptions, CalibrationOptions):
        old = OLD_STORED[cls.__name__]
        # the same stored keys (no field renamed, added or lost; the ablation's settings hash stays the same)
        assert set(cls().to_dict()) == set(old), cls
        loaded = cls.from_dict({**old, "gone": 1})
        assert loaded.to_dict() == old, cls
        assert cls.from_dict({}) == cls(), cls  # keys a run lacks take the group's defaults


def test_a_ratio_is_checked_once_on_its_way(tiny_loaded, monkeypatch):
    """prune_with_scores checks its ratio where it enters; the planning and the allocations take the checked
    value (the adaptive search in core.prune.adaptive still checks its own argument). Bad ratios read as before."""
    loaded = tiny_loaded("llama")
    scores = [torch.rand(w, generator=torch.Generator().manual_seed(i)) for i, w in enumerate([64, 64])]
    result = ScoreResult(scores, {"criterion": "random", "source": "wiki", "samples": 1, "seq_len": 8, "seed": 0}, 0.0)
    calls, check = [], allocate.check_ratio

    def counted(ratio):
        calls.append(ratio)
        return check(ratio)

    monkeypatch.setattr(allocate, "check_ratio", counted)
    monkeypatch.setattr(oneshot, "check_ratio", counted)
    for allocation in ("uniform", "global"):
        calls.clear()
        pruned = prune_with_scores(loaded, result, 0.25, allocation=allocation, progress=False)
        assert calls == [0.25] and sum(pruned.widths) == 96, allocation
    monkeypatch.undo()
    for call in (lambda r: prune_with_scores(loaded, result, r), lambda r: preview_widths(loaded, r),
                 lambda r: plan_widths(loaded.model, r)):
        with pytest.raises(PruneConfigError) as bad:
            call(1.0)
        assert str(bad.value) == "Ratio must be in [0, 1) (fraction of MLP neurons removed), got 1.0."
        with pytest.raises(PruneConfigError) as bad:
            call("x")
        assert str(bad.value) == "Ratio must be a number in [0, 1), got 'x'."
