"""Typed option groups, declared once: each knob's default, range, choices and help live on the
dataclass field, and the CLI flags, the dashboard controls' ranges and the stored run / meta fields
are all derived from it.

    @dataclass
    class CompensationOptions(Options):
        error = PruneConfigError
        cli_prefix = "compensate-"
        samples: int = knob(128, "calibration windows for the statistics", low=1, ui_high=256)

    CompensationOptions(samples=0)                 # PruneConfigError: one sentence naming the knob
    CompensationOptions.add_arguments(parser)      # --compensate-samples (type int, default 128, help with range)
    CompensationOptions.from_args(args)            # back from argparse
    CompensationOptions.ui("samples")              # {"minimum": 1, "maximum": 256, "value": 128, "step": 1, "info": …}
    CompensationOptions.from_dict(stored)          # tolerant of runs written before a knob existed

Adding a knob is a one-place change: a new field with ``knob(...)``. Groups that read the same kind of
thing share it by extending a base group (``CalibrationOptions`` extends ``core.data.text.TextWindows``),
giving a field a group's own default with :func:`knob_like` (the knob's help and range stay the base's):

    @dataclass
    class EncoderOptions(CalibrationOptions):
        samples: int = knob_like(CalibrationOptions, "samples", 64)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from core.errors import HFPruneError

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


@dataclass(frozen=True)
class Knob:
    """What a field accepts and how it is presented. Bounds are inclusive unless ``*_open``."""

    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    ui_low: float | None = None  # slider ends when the valid range is unbounded or too wide to be useful
    ui_high: float | None = None
    step: float | None = None  # slider step (default: 1 for ints, 0.01 for floats)
    flag: str | None = None  # CLI flag without "--" (default: cli_prefix + name with dashes)
    legacy: tuple[str, ...] = ()  # key names older stored runs used for this field
    cli: bool = True  # False: not exposed as a CLI flag (set by the command itself)

    def range_text(self) -> str:
        """'[0, 1)', '> 0', '≥ 1', 'one of a, b' — the accepted values in words."""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '≥'} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '≤'} {_num(self.high)}"
        return "any value"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def knob(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field carrying its :class:`Knob` (``low``, ``high``, ``choices``, ``ui_high`` …)."""
    return field(default=default, metadata={"knob": Knob(help=help, **spec)})


def knob_like(group: type, name: str, default: Any = dataclasses.MISSING, **changes: Any) -> Any:
    """Field ``name`` of option group ``group`` declared again in another group: the same :class:`Knob`
    (the very object: its help, range and presentation are declared once) with this group's own
    ``default`` (the base's when omitted). ``changes`` replace Knob attributes where a group must differ
    (``low=2``, ``flag="heldout-samples"``); then it is a copy. The field name may differ from ``name``."""
    fields = {f.name: f for f in dataclasses.fields(group)}
    if name not in fields or "knob" not in fields[name].metadata:
        raise TypeError(f"{group.__name__} has no knob named '{name}'.")
    base = fields[name]
    spec = dataclasses.replace(base.metadata["knob"], **changes) if changes else base.metadata["knob"]
    return field(default=base.default if default is dataclasses.MISSING else default, metadata={"knob": spec})


class Options:
    """Base of every option group: validates on construction and derives CLI / UI / storage views."""

    error: ClassVar[type[HFPruneError]] = HFPruneError  # raised for a bad value
    cli_prefix: ClassVar[str] = ""  # e.g. "compensate-" → --compensate-samples
    label: ClassVar[str] = ""  # when set, errors read "<label> <field> must be …" (no flag named)

    def __post_init__(self) -> None:
        self.validate()

    # -- the declared knobs ---------------------------------------------------------------
    @classmethod
    def knobs(cls) -> list[tuple[dataclasses.Field, Knob, type]]:
        """(field, knob, python type) of every knob field, in declaration order."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            spec = f.metadata.get("knob")
            if spec is not None:
                out.append((f, spec, _python_type(hints[f.name])))
        return out

    @classmethod
    def flag(cls, name: str) -> str:
        """The CLI flag of field ``name`` (with the dashes)."""
        for f, spec, _ in cls.knobs():
            if f.name == name:
                return "--" + (spec.flag or (cls.cli_prefix + f.name.replace("_", "-")))
        raise KeyError(name)

    def validate(self) -> None:
        """Coerce each knob to its type and check its range / choices; one sentence on failure."""
        for f, spec, kind in self.knobs():
            value = getattr(self, f.name)
            if self.label:
                label = f"{self.label} {f.name}"
            else:
                label = f"{f.name} ({self.flag(f.name)})" if spec.cli else f.name
            try:
                value = _coerce(value, kind)
            except (TypeError, ValueError):
                raise self.error(f"{label} must be {kind.__name__}, got {value!r}.") from None
            if spec.choices is not None and value not in spec.choices:
                raise self.error(f"{label} must be {spec.range_text()}, got {value!r}.")
            if kind in (int, float) and not _in_range(value, spec):
                raise self.error(f"{label} must be {spec.range_text()}, got {value}.")
            object.__setattr__(self, f.name, value)

    # -- stored runs / meta -------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON-able dict of every field (what stored runs and pruning_meta.json record)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None, **overrides: Any) -> Options:
        """Build from a stored dict: unknown keys are ignored, missing or None values take defaults,
        and keys older runs used (``Knob.legacy``) are read too; ``overrides`` win over ``data``."""
        data = dict(data or {})
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            names = (f.name, *(f.metadata["knob"].legacy if "knob" in f.metadata else ()))
            for key in names:
                if data.get(key) is not None:
                    values[f.name] = data[key]
                    break
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    # -- command line ---------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                      skip: tuple[str, ...] = (), defaults: dict | None = None, only_given: bool = False) -> None:
        """Add one flag per knob (``skip`` names are left to the command); the help shows the range.
        ``only_given``: a flag that is not on the command line leaves no attribute (so a command can
        tell which were given, e.g. parameters of another criterion)."""
        defaults = defaults or {}
        for f, spec, kind in cls.knobs():
            if f.name in skip or not spec.cli:
                continue
            default = defaults.get(f.name, f.default)
            accepted = "" if spec.range_text() == "any value" else f"{spec.range_text()}; "
            help_text = f"{spec.help} ({accepted}default {default})".replace("%", "%%")  # argparse formats help with %
            value = argparse.SUPPRESS if only_given else default
            if kind is bool:
                parser.add_argument(cls.flag(f.name), dest=cls._dest(f.name), action=argparse.BooleanOptionalAction,
                                    default=value, help=help_text)
            elif spec.choices is not None:
                parser.add_argument(cls.flag(f.name), dest=cls._dest(f.name), type=kind, default=value,
                                    choices=spec.choices, help=help_text)
            else:
                parser.add_argument(cls.flag(f.name), dest=cls._dest(f.name), type=kind, default=value,
                                    help=help_text, metavar=f.name.upper())

    @classmethod
    def _dest(cls, name: str) -> str:
        return cls.flag(name)[2:].replace("-", "_")

    @classmethod
    def given(cls, args: argparse.Namespace) -> dict:
        """{field: value} of the flags present in ``args`` (with ``only_given`` parsers: those typed)."""
        return {f.name: getattr(args, cls._dest(f.name)) for f, spec, _ in cls.knobs()
                if spec.cli and hasattr(args, cls._dest(f.name))}

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> Options:
        """The option group from parsed flags (flags a command skipped keep their defaults)."""
        values = cls.given(args)
        values.update(overrides)
        return cls(**values)

    # -- dashboard controls ---------------------------------------------------------------------
    @classmethod
    def ui(cls, name: str, defaults: dict | None = None) -> dict:
        """Keyword arguments for a gradio Slider / Number / Dropdown of field ``name``: ``minimum``,
        ``maximum``, ``value``, ``step`` (numbers) or ``choices``, ``value`` (choices), and ``info``.
        ``defaults``: a method's own defaults for this group (e.g. recovery's learning rate), the same
        dict its CLI passes to :meth:`add_arguments`."""
        for f, spec, kind in cls.knobs():
            if f.name != name:
                continue
            value = (defaults or {}).get(name, f.default)
            if spec.choices is not None:
                return {"choices": list(spec.choices), "value": value, "info": spec.help}
            if kind is bool:
                return {"value": value, "info": spec.help}
            step = spec.step if spec.step is not None else (1 if kind is int else 0.01)
            low = spec.ui_low if spec.ui_low is not None else spec.low
            high = spec.ui_high if spec.ui_high is not None else spec.high
            if low is not None and spec.low_open and spec.ui_low is None:
                low = low + step
            if high is not None and spec.high_open and spec.ui_high is None:
                high = high - step
            low, high = (kind(low) if low is not None else None), (kind(high) if high is not None else None)
            # the help names the control's own ends (the CLI's --help gives the accepted range)
            shown = f"{_num(low)}–{_num(high)}" if low is not None and high is not None else spec.range_text()
            return {"minimum": low, "maximum": high, "value": value, "step": step, "info": f"{spec.help} ({shown})"}
        raise KeyError(name)

    def replace(self, **changes: Any) -> Options:
        """A validated copy with ``changes``."""
        return dataclasses.replace(self, **changes)


def _python_type(hint: Any) -> type:
    """int / float / str / bool from an annotation (``X | None`` → X)."""
    if isinstance(hint, type):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type):
        return args[0]
    raise TypeError(f"Option fields must be int, float, str or bool, got {hint!r}.")


def _coerce(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
        return bool(value)
    if kind is int:
        if isinstance(value, bool):
            raise TypeError(value)
        as_float = float(value)
        if not as_float.is_integer():
            raise ValueError(value)
        return int(as_float)
    if kind is float:
        if isinstance(value, bool):
            raise TypeError(value)
        return float(value)
    return kind(value)


def _in_range(value: float, spec: Knob) -> bool:
    if isinstance(value, float) and math.isnan(value):
        return False
    if spec.low is not None and (value < spec.low or (spec.low_open and value == spec.low)):
        return False
    return not (spec.high is not None and (value > spec.high or spec.high_open and value == spec.high))


__all__ = ["Knob", "Options", "dataclass", "knob", "knob_like"]
