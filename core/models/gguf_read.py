"""Reading GGUF files: metadata, per-layer widths, and rebuilding a Llama-family model (``llama`` or
``deci``) from one (the file's tensors de-quantized to fp32, the q/k rotary permutation undone).
Writing lives in ``core.export.gguf``; both follow llama.cpp's conventions described there.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from core.errors import ModelLoadError
from core.models.slicing import prune_mlp_neurons


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_qk` (llama.cpp → HF)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a GGUF file (key → value; string arrays such as the vocabulary are left as counts
    by transformers' header reader, which skips what the pure-Python ``gguf.GGUFReader`` spends
    seconds parsing; the latter is the fallback)."""
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata

        return dict(read_gguf_metadata(str(path))[0])
    except ImportError:  # an older transformers: parse everything with gguf
        import gguf

        return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}


def read_gguf_widths(path: str | os.PathLike) -> tuple[str, list[int] | int]:
    """(architecture, feed_forward_length) of a GGUF file: a number, or a per-layer list."""
    fields = read_metadata(path)
    arch = str(fields["general.architecture"])
    widths = fields[f"{arch}.feed_forward_length"]
    return arch, [int(w) for w in widths] if isinstance(widths, (list, tuple)) else int(widths)


def tensor_types(path: str | os.PathLike, matrices: bool = False) -> dict[str, str]:
    """GGUF tensor name → the GGML type it is stored in ('F32', 'F16', 'Q8_0', 'Q4_K' …), read from the file's
    tensor table; ``matrices``: 2-D tensors only (the weights a quantized type applies to)."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors
            if not matrices or len(t.shape) >= 2}


def type_counts(types: dict[str, str]) -> dict[str, int]:
    """{'Q4_K': 12, 'Q5_0': 60, …}: how many tensors each type holds, most first."""
    counts: dict[str, int] = {}
    for kind in types.values():
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def load_gguf_model(path: str | os.PathLike) -> nn.Module:
    """Rebuild a Llama-family model from a ``llama`` or ``deci`` GGUF this module wrote — fp32, eval mode,
    each layer at its own MLP width — by de-quantizing with gguf and undoing the q/k permutation. Used to
    check per-layer files, which transformers' GGUF loader cannot read (it has no ``deci`` class)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    reader = gguf.GGUFReader(str(path))
    fields = reader.fields

    def get(key: str, default=None):
        field = fields.get(f"{arch}.{key}")
        return field.contents() if field is not None else default

    arch = str(fields["general.architecture"].contents())
    if arch not in ("llama", "deci"):
        raise ModelLoadError(f"load_gguf_model reads llama / deci files; {path} is '{arch}'.")
    widths = get("feed_forward_length")
    layers = int(get("block_count"))
    widths = [int(w) for w in widths] if isinstance(widths, list) else [int(widths)] * layers
    heads, kv = get("attention.head_count"), get("attention.head_count_kv")
    heads = int(heads[0] if isinstance(heads, list) else heads)
    kv = int(kv[0] if isinstance(kv, list) else kv)
    names = {t.name for t in reader.tensors}
    config = LlamaConfig(vocab_size=int(get("vocab_size")), hidden_size=int(get("embedding_length")),
                         intermediate_size=max(widths), num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=int(get("attention.key_length")),
                         max_position_embeddings=int(get("context_length")),
                         rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
                         rope_theta=float(get("rope.freq_base", 10000.0)),
                         tie_word_embeddings="output.weight" not in names)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    if len(set(widths)) > 1:
        model = prune_mlp_neurons(model, [torch.arange(w) for w in widths])
    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    state = {}
    for key in model.state_dict():
        name = mapping.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is not None:
            state[name] = key
    loaded = {}
    for tensor in reader.tensors:
        if tensor.name not in state:
            continue
        data = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        key = state[tensor.name]
        if key.endswith("q_proj.weight"):
            data = unpermute_qk(data, heads)
        elif key.endswith("k_proj.weight"):
            data = unpermute_qk(data, kv)
        loaded[key] = data
    if config.tie_word_embeddings:
        loaded["lm_head.weight"] = loaded["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    if [k for k in missing if "rotary" not in k] or unexpected:
        raise ModelLoadError(f"{path} does not match a Llama layout: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}.")
    return model
