"""The ``hf-remote-code`` export: a small modeling file that rebuilds per-layer MLP widths.

The saved ``config.json`` keeps the base architecture's ``model_type`` (so every tool that reads
it still sees e.g. ``llama``), adds ``intermediate_sizes`` (one width per decoder layer) and an
``auto_map`` pointing at ``modeling_hfprune.py``; ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` then builds the base class and resizes each layer's gate/up/down before
the checkpoint is loaded, so shapes match exactly and nothing is ever loaded with mismatched sizes.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

MODELING_FILE = "modeling_hfprune.py"

_TEMPLATE = '''"""Written by HFPrune Studio: {base_model} with a different MLP width in every decoder layer."""
from torch import nn
from {config_module} import {config_class}
from {model_module} import {model_class}


class HFPrune{config_class}({config_class}):
    """{config_class} plus ``intermediate_sizes``: the kept MLP width of each decoder layer."""

    def __init__(self, intermediate_sizes=None, **kwargs):
        super().__init__(**kwargs)
        self.intermediate_sizes = list(intermediate_sizes) if intermediate_sizes is not None else None


class HFPrune{model_class}({model_class}):
    """{model_class} whose layer ``i`` MLP has ``config.intermediate_sizes[i]`` hidden neurons."""

    config_class = HFPrune{config_class}

    def __init__(self, config):
        super().__init__(config)
        sizes = config.intermediate_sizes or [config.intermediate_size] * len(self.model.layers)
        if len(sizes) != len(self.model.layers):
            raise ValueError(f"intermediate_sizes has {{len(sizes)}} entries for {{len(self.model.layers)}} layers")
        for layer, width in zip(self.model.layers, sizes):
            mlp = layer.mlp
            hidden = mlp.gate_proj.in_features
            dtype = mlp.gate_proj.weight.dtype
            mlp.gate_proj = nn.Linear(hidden, width, bias=mlp.gate_proj.bias is not None, dtype=dtype)
            mlp.up_proj = nn.Linear(hidden, width, bias=mlp.up_proj.bias is not None, dtype=dtype)
            mlp.down_proj = nn.Linear(width, hidden, bias=mlp.down_proj.bias is not None, dtype=dtype)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = width
        self.post_init()
'''


def _library_class(obj: object) -> type:
    """The transformers class behind ``obj`` (skips our own subclasses when a reloaded export is re-exported)."""
    return next(c for c in type(obj).__mro__ if c.__module__.startswith("transformers.models."))


def modeling_source(model: nn.Module) -> str:
    """The modeling file for ``model``'s architecture (base classes imported from transformers)."""
    model_cls, config_cls = _library_class(model), _library_class(model.config)
    return _TEMPLATE.format(base_model=model_cls.__name__, config_module=config_cls.__module__,
                            config_class=config_cls.__name__, model_module=model_cls.__module__,
                            model_class=model_cls.__name__)


def auto_map(model: nn.Module) -> dict[str, str]:
    """``auto_map`` entries of config.json pointing at the classes in the modeling file."""
    stem = MODELING_FILE.removesuffix(".py")
    return {"AutoConfig": f"{stem}.HFPrune{_library_class(model.config).__name__}",
            "AutoModelForCausalLM": f"{stem}.HFPrune{_library_class(model).__name__}"}


def _source_for(model_type: str) -> str | None:
    """The modeling file this tool writes for a config's ``model_type`` (None if not a causal LM we know)."""
    from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config_cls = CONFIG_MAPPING[model_type]
        model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[config_cls]
    except KeyError:
        return None
    return _TEMPLATE.format(base_model=model_cls.__name__, config_module=config_cls.__module__,
                            config_class=config_cls.__name__, model_module=model_cls.__module__,
                            model_class=model_cls.__name__)


def is_own_export(folder: str | Path) -> bool:
    """True when ``folder``'s remote code is exactly what the hf-remote-code export writes: config.json's
    ``auto_map`` points only at ``modeling_hfprune``, the folder has no other Python file, and that file
    matches our template byte for byte. Only then is ``trust_remote_code`` switched on by itself."""
    import json

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    stem = MODELING_FILE.removesuffix(".py")
    targets = config.get("auto_map") or {}
    if not targets or not all(isinstance(v, str) and v.startswith(f"{stem}.") for v in targets.values()):
        return False
    if {p.name for p in folder.glob("*.py")} != {MODELING_FILE}:
        return False
    expected = _source_for(str(config.get("model_type", "")))
    return expected is not None and (folder / MODELING_FILE).read_text() == expected
