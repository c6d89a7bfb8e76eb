"""The option mechanism: one declaration gives validation, CLI flags, UI ranges and tolerant loading."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from core.errors import PruneConfigError
from core.options import Options, knob


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
