"""Architecture adapters: find each decoder layer's gated MLP (gate/up/down projections).

Every supported family computes ``a = act(W_gate x) * (W_up x)`` and ``y = W_down a`` with
``a`` of width d_ff; pruning neuron j removes row j of W_gate and W_up and column j of W_down.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import UnsupportedArchitectureError

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


@dataclass
class MLPHandle:
    """One decoder layer's MLP and its three projections."""

    index: int
    mlp: nn.Module
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear

    @property
    def width(self) -> int:
        """Number of hidden neurons d_ff (rows of gate/up, columns of down)."""
        return self.gate.out_features


def check_supported(model: nn.Module) -> None:
    """Raise one clear error unless the model is a supported causal LM."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"Architecture '{model_type}' is not supported; supported model types are: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (``model.model.layers`` in every supported family)."""
    check_supported(model)
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise UnsupportedArchitectureError(
            f"Could not find decoder layers on {type(model).__name__}; expected model.model.layers."
        )
    return layers


def mlp_handles(model: nn.Module) -> list[MLPHandle]:
    """One handle per decoder layer, in order."""
    handles = []
    for index, layer in enumerate(decoder_layers(model)):
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj", "down_proj"):
            if not isinstance(getattr(mlp, name, None), nn.Linear):
                raise UnsupportedArchitectureError(
                    f"Layer {index} MLP has no linear '{name}'; only gated MLPs are supported."
                )
        handles.append(MLPHandle(index, mlp, mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    return handles


def mlp_widths(model: nn.Module) -> list[int]:
    """Current d_ff of every layer."""
    return [h.width for h in mlp_handles(model)]
