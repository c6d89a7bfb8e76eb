"""Architecture adapters: find each transformer block's MLP (gate/up/down projections).

Gated families (the causal LMs, DINOv2's SwiGLU) compute ``a = act(W_gate x) * (W_up x)``, plain
ones (ViT, DINOv2, CLIP-vision, BERT) ``a = act(W_fc1 x)``; both then ``y = W_down a`` with ``a`` of
width d_ff. Pruning neuron j removes row j of W_gate (if any) and W_up (= fc1) and column j of
W_down (= fc2). :class:`MLPHandle` is the one view of either kind: ``gate`` is None when the MLP
has no gate, and :meth:`MLPHandle.replace` swaps a projection wherever the family keeps it.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from core.errors import UnsupportedArchitectureError

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# Encoders (no LM head): where the block list lives, relative to the model (first that exists:
# transformers 5 moved ViT's to ``layers`` and CLIPVisionModel's to ``encoder.layers``).
ENCODER_LAYERS: dict[str, tuple[str, ...]] = {
    "dinov2": ("encoder.layer",), "vit": ("layers", "encoder.layer"), "bert": ("encoder.layer",),
    "clip_vision_model": ("encoder.layers", "vision_model.encoder.layers")}
ENCODER_MODEL_TYPES: tuple[str, ...] = tuple(ENCODER_LAYERS)
# MLP layouts, tried in order inside each block: role -> dotted path relative to the block.
_LAYOUTS: tuple[dict[str, str], ...] = (
    {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},  # LLMs, DINOv2 SwiGLU
    {"up": "mlp.fc1", "down": "mlp.fc2"},  # ViT, DINOv2, CLIP
    {"up": "intermediate.dense", "down": "output.dense"},  # BERT
)


class _SplitMLP(nn.Module):
    """A detached view over an MLP whose projections live in different submodules (BERT's
    ``intermediate.dense`` / ``output.dense``), so ``handle.mlp.parameters()`` is exactly the MLP's."""

    def __init__(self, up: nn.Linear, down: nn.Linear):
        super().__init__()
        self.up, self.down = up, down


@dataclass
class MLPHandle:
    """One block's MLP and its projections (``gate`` is None for a plain fc1/fc2 MLP)."""

    index: int
    mlp: nn.Module
    gate: nn.Linear | None
    up: nn.Linear
    down: nn.Linear
    block: nn.Module | None = None  # the transformer block holding the MLP
    paths: dict[str, str] | None = None  # role -> dotted path relative to ``block``

    @property
    def width(self) -> int:
        """Number of hidden neurons d_ff (rows of gate/up, columns of down)."""
        return self.up.out_features

    @property
    def linears(self) -> dict[str, nn.Linear]:
        """The projections present, by role (``gate`` only for gated MLPs)."""
        out = {"gate": self.gate} if self.gate is not None else {}
        return {**out, "up": self.up, "down": self.down}

    def replace(self, role: str, linear: nn.Linear) -> None:
        """Put ``linear`` in place of the ``role`` projection ("gate" / "up" / "down") in the model."""
        if self.block is None or self.paths is None:  # a handle built by hand around a gated mlp
            setattr(self.mlp, f"{role}_proj", linear)
        else:
            parent, _, name = self.paths[role].rpartition(".")
            setattr(self.block.get_submodule(parent), name, linear)
        setattr(self, role, linear)


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def is_encoder(model: nn.Module) -> bool:
    """True for the supported encoders (ViT, DINOv2, CLIP-vision, BERT), which have no LM head."""
    return model_type_of(model) in ENCODER_MODEL_TYPES


def check_supported(model: nn.Module) -> None:
    """Raise one clear error unless the model is a supported causal LM."""
    model_type = model_type_of(model)
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


def blocks_path(model: nn.Module) -> str:
    """Dotted path of an encoder's block list (e.g. ``encoder.layer``)."""
    paths = ENCODER_LAYERS[model_type_of(model)]
    for path in paths:
        try:
            if isinstance(model.get_submodule(path), nn.ModuleList):
                return path
        except AttributeError:
            continue
    raise UnsupportedArchitectureError(
        f"Could not find the blocks of {type(model).__name__} at {' or '.join(paths)}; load the bare encoder "
        f"(e.g. Dinov2Model, ViTModel, CLIPVisionModel, BertModel), not a task head.")


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a supported causal LM or encoder, in order."""
    if not is_encoder(model):
        return decoder_layers(model)
    return model.get_submodule(blocks_path(model))


def _linear_at(block: nn.Module, path: str) -> nn.Linear | None:
    try:
        found = block.get_submodule(path)
    except AttributeError:
        return None
    return found if isinstance(found, nn.Linear) else None


def mlp_handles(model: nn.Module) -> list[MLPHandle]:
    """One handle per block, in order (gated gate/up/down, or plain fc1/fc2 with ``gate=None``)."""
    handles = []
    encoder = is_encoder(model)
    for index, block in enumerate(blocks(model)):
        layouts = _LAYOUTS if encoder else _LAYOUTS[:1]
        for paths in layouts:
            found = {role: _linear_at(block, path) for role, path in paths.items()}
            if all(v is not None for v in found.values()):
                break
        else:
            kind = "an fc1/fc2 or gated" if encoder else "a gated gate_proj/up_proj/down_proj"
            raise UnsupportedArchitectureError(f"Layer {index} has no MLP of {kind} form that the engine can prune.")
        up, down, gate = found["up"], found["down"], found.get("gate")
        parent = paths["up"].rpartition(".")[0]
        mlp = block.get_submodule(parent) if parent == paths["down"].rpartition(".")[0] else _SplitMLP(up, down)
        handles.append(MLPHandle(index, mlp, gate, up, down, block=block, paths=dict(paths)))
    return handles


def set_config_widths(config, widths: list[int]) -> None:
    """Record per-layer MLP widths on a config: ``intermediate_size`` when all are equal, else
    ``intermediate_sizes``. DINOv2 has no intermediate_size (its width is ``hidden · mlp_ratio``
    with an integer ratio), so equal widths there are native only at a multiple of the hidden size."""
    uniform = len(set(widths)) == 1
    if getattr(config, "model_type", None) == "dinov2":
        native = uniform and widths[0] % config.hidden_size == 0 and not getattr(config, "use_swiglu_ffn", False)
        if native:
            config.mlp_ratio = widths[0] // config.hidden_size
    else:
        native = uniform
        if native:
            config.intermediate_size = widths[0]
    if native:
        if hasattr(config, "intermediate_sizes"):
            del config.intermediate_sizes
    else:
        config.intermediate_sizes = list(widths)


def mlp_widths(model: nn.Module) -> list[int]:
    """Current d_ff of every layer."""
    return [h.width for h in mlp_handles(model)]


@dataclass
class AttentionHandle:
    """One decoder layer's self-attention: ``heads`` query heads on ``kv_heads`` key/value heads of
    ``head_dim`` each. Query head h reads KV head ``h // (heads // kv_heads)`` (HF's ``repeat_kv``)."""

    index: int
    attn: nn.Module
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads


def attention_handles(model: nn.Module) -> list[AttentionHandle]:
    """One handle per decoder layer (``layer.self_attn`` with q/k/v/o projections), counts read from
    the projections' shapes, so an already head-pruned model reports its true per-layer counts."""
    handles = []
    for index, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(isinstance(getattr(attn, n, None), nn.Linear)
                                   for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise UnsupportedArchitectureError(f"Layer {index} has no self_attn with q/k/v/o projections.")
        head_dim = int(attn.head_dim)
        handles.append(AttentionHandle(index, attn, attn.q_proj.out_features // head_dim,
                                       attn.k_proj.out_features // head_dim, head_dim))
    return handles


def head_counts(model: nn.Module) -> tuple[list[int], list[int]]:
    """(query heads, KV heads) per decoder layer."""
    handles = attention_handles(model)
    return [h.heads for h in handles], [h.kv_heads for h in handles]
