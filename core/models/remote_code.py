"""The ``hf-remote-code`` export: a small modeling file that rebuilds per-layer MLP widths.

The saved ``config.json`` keeps the base architecture's ``model_type`` (so every tool that reads
it still sees e.g. ``llama``), adds ``intermediate_sizes`` (one width per decoder layer) and an
``auto_map`` pointing at ``modeling_hfprune.py``; ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` then builds the base class and resizes each layer's gate/up/down before
the checkpoint is loaded, so shapes match exactly and nothing is ever loaded with mismatched sizes.
Head-pruned decoders (core.ddp) also carry ``layer_num_attention_heads`` / ``layer_num_key_value_heads``
and their file then rebuilds each layer's q/k/v/o at those counts (``num_key_value_groups`` per layer).

Encoders (ViT, DINOv2, CLIP-vision, BERT) get a second template: their MLPs live at family-specific
paths, so ``config.json`` also carries ``hfprune_mlp_paths`` (per block: role → dotted module path)
and ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` resizes exactly those linears.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from core.models.adapters import ENCODER_MODEL_TYPES, blocks_path, mlp_handles

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
{heads_block}        self.post_init()
'''

# Added to the decoder modeling file only for head-pruned exports (core.ddp), so MLP-only exports stay
# byte-identical to what earlier versions wrote and are still recognised as our own.
_HEADS_BLOCK = '''        heads = getattr(config, "layer_num_attention_heads", None)
        kv_heads = getattr(config, "layer_num_key_value_heads", None)
        if heads is not None:  # per-layer attention heads
            for layer, n_q, n_kv in zip(self.model.layers, heads, kv_heads):
                attn = layer.self_attn
                d, hidden, dtype = attn.head_dim, attn.q_proj.in_features, attn.q_proj.weight.dtype
                attn.q_proj = nn.Linear(hidden, n_q * d, bias=attn.q_proj.bias is not None, dtype=dtype)
                attn.k_proj = nn.Linear(hidden, n_kv * d, bias=attn.k_proj.bias is not None, dtype=dtype)
                attn.v_proj = nn.Linear(hidden, n_kv * d, bias=attn.v_proj.bias is not None, dtype=dtype)
                attn.o_proj = nn.Linear(n_q * d, attn.o_proj.out_features, bias=attn.o_proj.bias is not None,
                                        dtype=dtype)
                attn.num_key_value_groups = n_q // n_kv
'''


_ENCODER_TEMPLATE = '''"""Written by HFPrune Studio: {base_model} with a different MLP width in every block."""
from torch import nn
from {config_module} import {config_class}
from {model_module} import {model_class}

try:  # transformers renames legacy checkpoint keys only for its own classes: register ours too
    from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                 register_checkpoint_conversion_mapping)

    _renames = get_checkpoint_conversion_mapping("{model_class}") or get_checkpoint_conversion_mapping("{model_type}")
    if _renames:
        register_checkpoint_conversion_mapping("HFPrune{model_class}", _renames, overwrite=True)
except ImportError:  # older transformers: no renaming, nothing to register
    pass


class HFPrune{config_class}({config_class}):
    """{config_class} plus ``intermediate_sizes`` (the kept MLP width of each block) and
    ``hfprune_mlp_paths`` (per block: role -> dotted path of that MLP projection)."""

    def __init__(self, intermediate_sizes=None, hfprune_mlp_paths=None, **kwargs):
        super().__init__(**kwargs)
        self.intermediate_sizes = list(intermediate_sizes) if intermediate_sizes is not None else None
        self.hfprune_mlp_paths = list(hfprune_mlp_paths) if hfprune_mlp_paths is not None else None


class HFPrune{model_class}({model_class}):
    """{model_class} whose block ``i`` MLP has ``config.intermediate_sizes[i]`` hidden neurons."""

    config_class = HFPrune{config_class}

    def __init__(self, config):
        super().__init__(config)
        sizes, paths = config.intermediate_sizes or [], config.hfprune_mlp_paths or []
        if len(sizes) != len(paths):
            raise ValueError(f"intermediate_sizes has {{len(sizes)}} entries for {{len(paths)}} MLPs")
        for width, roles in zip(sizes, paths):
            for role, path in roles.items():
                parent, _, name = path.rpartition(".")
                owner = self.get_submodule(parent)
                old = getattr(owner, name)
                shape = (width, old.out_features) if role == "down" else (old.in_features, width)
                setattr(owner, name, nn.Linear(*shape, bias=old.bias is not None, dtype=old.weight.dtype))
        self.post_init()
'''


def _encoder(model_or_config) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) in ENCODER_MODEL_TYPES


def mlp_paths(model: nn.Module) -> list[dict[str, str]]:
    """Per block, role → dotted path (from the model root) of each MLP projection (encoders)."""
    root = blocks_path(model)
    return [{role: f"{root}.{h.index}.{path}" for role, path in h.paths.items()} for h in mlp_handles(model)]


def _library_class(obj: object) -> type:
    """The transformers class behind ``obj`` (skips our own subclasses when a reloaded export is re-exported)."""
    return next(c for c in type(obj).__mro__ if c.__module__.startswith("transformers.models."))


def has_pruned_heads(model_or_config) -> bool:
    """True when a model (or config, or config.json dict) records per-layer attention head counts."""
    if isinstance(model_or_config, dict):
        return model_or_config.get("layer_num_attention_heads") is not None
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "layer_num_attention_heads", None) is not None


def modeling_source(model: nn.Module) -> str:
    """The modeling file for ``model``'s architecture (base classes imported from transformers); a
    head-pruned decoder's file also rebuilds each layer's attention at its recorded head counts."""
    model_cls, config_cls = _library_class(model), _library_class(model.config)
    template = _ENCODER_TEMPLATE if _encoder(model) else _TEMPLATE
    return template.format(base_model=model_cls.__name__, config_module=config_cls.__module__,
                            config_class=config_cls.__name__, model_module=model_cls.__module__,
                            model_class=model_cls.__name__, model_type=config_cls.model_type,
                            heads_block=_HEADS_BLOCK if has_pruned_heads(model) else "")


def auto_map(model: nn.Module) -> dict[str, str]:
    """``auto_map`` entries of config.json pointing at the classes in the modeling file."""
    stem = MODELING_FILE.removesuffix(".py")
    auto = "AutoModel" if _encoder(model) else "AutoModelForCausalLM"
    return {"AutoConfig": f"{stem}.HFPrune{_library_class(model.config).__name__}",
            auto: f"{stem}.HFPrune{_library_class(model).__name__}"}


def _source_for(model_type: str, heads: bool = False) -> str | None:
    """The modeling file this tool writes for a config's ``model_type`` (None if not a causal LM we know)."""
    from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    encoder = model_type in ENCODER_MODEL_TYPES
    try:
        config_cls = CONFIG_MAPPING[model_type]
        model_cls = (MODEL_MAPPING if encoder else MODEL_FOR_CAUSAL_LM_MAPPING)[config_cls]
    except KeyError:
        return None
    template = _ENCODER_TEMPLATE if encoder else _TEMPLATE
    return template.format(base_model=model_cls.__name__, config_module=config_cls.__module__,
                           config_class=config_cls.__name__, model_module=model_cls.__module__,
                           model_class=model_cls.__name__, model_type=config_cls.model_type,
                           heads_block=_HEADS_BLOCK if heads else "")


def is_own_export(folder: str | Path) -> bool:
    """True when ``folder``'s remote code is exactly what the hf-remote-code export writes: config.json's
    ``auto_map`` points only at ``modeling_hfprune``, the folder has no other Python file, and that file
    matches our template byte for byte. Only then is ``trust_remote_code`` switched on by itself."""
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
    expected = _source_for(str(config.get("model_type", "")), heads=has_pruned_heads(config))
    return expected is not None and (folder / MODELING_FILE).read_text() == expected
