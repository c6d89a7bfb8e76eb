"""GGUF export: the pruned model as one .gguf file that llama.cpp / Ollama run and transformers reloads,
written with the ``gguf`` package (tensor names from its ``TensorNameMap``, ``GGUFWriter``,
``quants.quantize`` for Q8_0 / Q5_0 / Q4_0, ``SpecialVocab`` for merges / special ids / chat template);
K-quants (Q4_K_M, Q5_K_M, Q6_K) are an F32 file passed through llama.cpp's own quantizer (``core.export.kquant``).

Conventions follow llama.cpp's converter (convert_hf_to_gguf.py) and transformers' GGUF loader:

- **q/k permutation** (Llama family only): HF stores the rotary halves of each head as
  [x_0..x_{d/2-1}, x_{d/2}..x_{d-1}]; llama.cpp's rope wants them interleaved, so q_proj rows are
  permuted per head with ``n_head`` and k_proj rows with ``n_head_kv`` (transformers' loader undoes it).
  Qwen2 / Qwen3 GGUFs keep HF's order (their llama.cpp rope is NEOX-style).
- **tensor types**: 1-D tensors (norms, biases) always F32; 2-D tensors F32, F16, Q8_0, Q5_0 or Q4_0, or a
  K-quant mix chosen by llama.cpp (rows in super-blocks of 256: pruned widths are rounded to 256, and the
  types the file holds are read back and reported, see ``core.export.kquant``).
  The quantized types store each row in blocks of :data:`GGUF_BLOCK` (32) values, so every 2-D row length
  (the hidden size, and the pruned MLP width of ``ffn_down``) must be a multiple of the block: a matrix
  that is not is refused with one sentence, never written in a wider type than asked (llama.cpp's
  converter silently falls back to F16). Pruning for such a file rounds the widths to the block
  (:func:`gguf_round_to`; ``prune --export gguf`` does it by default).
- **widths**: every layer the same → standard metadata (``<arch>.feed_forward_length`` a number); the
  file loads in llama.cpp, Ollama, LM Studio, vLLM's GGUF loader and transformers
  (``from_pretrained(folder, gguf_file=...)``). Per-layer widths → ``layout``:
  ``deci`` (Llama family): llama.cpp's DECI architecture (Llama-3.1-Nemotron-NAS), whose loader reads
  ``deci.feed_forward_length`` / ``deci.attention.head_count(_kv)`` as per-layer arrays and builds each
  layer at its own width — the form llama.cpp reads for models with varying FFN widths (the plain
  ``llama`` loader creates every layer at layer 0's width and refuses such a file). transformers has no
  ``deci`` model class, so :func:`load_gguf_model` here reloads it for checks;
  ``padded``: zero-pad every layer to the widest (identical outputs, standard metadata, loads everywhere,
  keeps the padded bytes and FLOPs).
- **tokenizer**: byte-level BPE (GPT-2 / Llama-3 / SmolLM style → ``tokenizer.ggml.model = gpt2``) or
  Llama sentencepiece-BPE with byte fallback (→ ``llama``): tokens in id order, token types (special
  added tokens CONTROL, other added tokens USER_DEFINED, holes UNUSED), merges, bos/eos/unk/pad ids,
  add_bos/add_eos, chat template. ``tokenizer.ggml.pre`` (llama.cpp's pre-tokenizer name) is copied from
  the source GGUF when the model came in as one (the embedded SmolLM2 says ``smollm``), else ``default``
  unless given.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.errors import ModelLoadError, PruneConfigError
from core.export.kquant import (
    KQUANT_BLOCK,
    KQUANTS,
    check_kquant_rows,
    check_kquant_types,
    llama_cpp_binding,
    quantize_file,
)
from core.models.adapters import mlp_handles
from core.models.gguf_read import read_metadata, tensor_types
from core.models.loading import EMBEDDED
from core.models.slicing import padded_copy
from core.options import Options, knob

GGUF_TYPES = ("f32", "f16", "q8_0", "q5_0", "q4_0", *KQUANTS)
# values per quantization block along a row (a 2-D tensor's row length must be a multiple); the one table
# that export, pruning defaults (prune --export gguf) and the dashboard read
GGUF_BLOCK = {"f32": 1, "f16": 1, "q8_0": 32, "q5_0": 32, "q4_0": 32, **dict.fromkeys(KQUANTS, KQUANT_BLOCK)}
GGUF_LAYOUTS = ("auto", "padded", "deci")
# transformers model_type → (gguf architecture, permute q/k for llama.cpp's rope)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                 "qwen3": ("qwen3", False)}


@dataclass
class GGUFOptions(Options):
    """How a pruned model is written as GGUF."""

    error = PruneConfigError
    cli_prefix = "gguf-"

    type: str = knob("f16", "GGUF tensor type of the matrices: f32 (exact), f16, q8_0 / q5_0 / q4_0 (8 / 5 / 4-bit, "
                     "blocks of 32: every row length, pruned widths included, must be a multiple of 32), "
                     "q4_k_m / q5_k_m / q6_k (llama.cpp's K-quants through llama-cpp-python: pruned widths in "
                     "multiples of 256; rows of other sizes fall back to 32-block types, reported); "
                     "norms stay f32", choices=GGUF_TYPES)
    layout: str = knob("auto", "per-layer widths: auto/deci = llama.cpp's 'deci' architecture with a per-layer "
                       "feed_forward_length array (Llama-family models); padded = zero-pad every layer to the "
                       "widest (standard metadata, loads in every runtime)", choices=GGUF_LAYOUTS)
    pre: str = knob("auto", "llama.cpp pre-tokenizer name (tokenizer.ggml.pre); auto = the source GGUF's, "
                    "else 'default'")

    def file_name(self) -> str:
        return f"model-{self.type.upper()}.gguf"


def block_of(kind: str) -> int:
    """Values per quantization block of GGUF type ``kind`` along a row (1 for f32 / f16, 32 for q8_0 /
    q5_0 / q4_0, 256 for the K-quants)."""
    if kind not in GGUF_BLOCK:
        raise PruneConfigError(f"Unknown GGUF type '{kind}'; available: {', '.join(GGUF_TYPES)}.")
    return GGUF_BLOCK[kind]


def gguf_round_to(kind: str, round_to: int | None = None) -> int:
    """The width multiple to prune with for a GGUF file of type ``kind``: its block when ``round_to`` is
    None (not chosen), else ``round_to`` itself, which must then be a multiple of the block."""
    block = block_of(kind)
    if round_to is None:
        return block
    if round_to >= 1 and round_to % block:  # < 1 is refused by the allocation itself
        raise PruneConfigError(f"--round-to {round_to} is not a multiple of {kind.upper()}'s block of {block}, so "
                               f"the pruned rows would not fit its blocks: use --round-to {block} (or a multiple) "
                               "or --gguf-type f16.")
    return round_to


def gguf_width_note(kind: str, widths: list[int], full_widths: list[int] | None = None) -> str:
    """One sentence for an export notice: the block ``kind`` needs, whether ``widths`` (kept MLP widths)
    fit it, and the achieved ratio (share of MLP neurons removed) when ``full_widths`` is known."""
    block = block_of(kind)
    ratio = (f" (achieved ratio {100 * (1 - sum(widths) / sum(full_widths)):.1f} %)"
             if full_widths and sum(full_widths) else "")
    if block == 1:
        fits = "are" if all(w % GGUF_BLOCK["q8_0"] == 0 for w in widths) else "are not"
        return (f"GGUF {kind.upper()} stores any width{ratio}; Q8_0 / Q5_0 / Q4_0 would need multiples of "
                f"{GGUF_BLOCK['q8_0']}, which these widths {fits}.")
    if all(w % block == 0 for w in widths):
        return f"Widths rounded to multiples of {block} for {kind.upper()}{ratio}."
    shown = str(widths[0]) if len(set(widths)) == 1 else f"{min(widths)}–{max(widths)}"
    return (f"Widths {shown} are not all multiples of {block}, which {kind.upper()} needs{ratio}: prune with "
            f"round-to {block} or choose f16.")


def check_gguf_widths(kind: str, widths: list[int], name: str = "this model") -> None:
    """Refuse, in one sentence saying what to do, kept MLP ``widths`` that are not multiples of the block of
    GGUF type ``kind`` (the dashboard exports a variant pruned earlier, possibly without rounding)."""
    block = block_of(kind)
    bad = sorted({int(w) for w in widths if int(w) % block})
    if bad:
        shown = ", ".join(map(str, bad[:3])) + (" …" if len(bad) > 3 else "")
        raise PruneConfigError(f"GGUF {kind.upper()} stores rows in blocks of {block}, but {name} keeps MLP widths "
                               f"{shown} that are not multiples of {block}: prune again with widths rounded to "
                               f"{block} (Round widths to a multiple of), or choose f16.")


def _qtype(name: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0, "q5_0": gguf.GGMLQuantizationType.Q5_0,
            "q4_0": gguf.GGMLQuantizationType.Q4_0}[name]


def _file_type(name: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[name]


def check_block_rows(model: nn.Module, kind: str) -> None:
    """Refuse (one sentence naming the tensor) a 2-D weight whose row length is not a multiple of the
    block of GGUF type ``kind``: a pruned ``down_proj`` (its row is the kept width), or a hidden / attention
    size of the model itself."""
    block = block_of(kind)
    if block == 1:
        return
    if kind in KQUANTS:
        check_kquant_rows({k: tuple(t.shape) for k, t in model.state_dict().items()}, kind)
        return
    for key, tensor in model.state_dict().items():
        row = int(tensor.shape[-1]) if tensor.dim() >= 2 else 0
        if tensor.dim() < 2 or row % block == 0:
            continue
        if key.endswith("down_proj.weight"):
            raise PruneConfigError(f"GGUF {kind.upper()} stores rows in blocks of {block}, but '{key}' has rows of "
                                   f"{row} (its kept MLP width): prune with --round-to {block} or choose f16.")
        raise PruneConfigError(f"GGUF {kind.upper()} stores rows in blocks of {block}, but '{key}' has rows of {row} "
                               "(a size of the model that pruning does not change): choose f16 or f32.")


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF → llama.cpp rotary order: (n_head·d, in) rows regrouped per head from halves to pairs."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def source_pre_tokenizer(spec: str | None) -> str | None:
    """``tokenizer.ggml.pre`` of the GGUF a model came from: an embedded alias's packaged file or a
    .gguf path; None for anything else (or an unreadable file)."""
    if not spec:
        return None
    try:
        if spec in EMBEDDED:
            entry = EMBEDDED[spec]
            path = EMBEDDED[entry.derive_from].locate() if entry.derive_from else entry.locate()
        elif str(spec).lower().endswith(".gguf") and Path(spec).is_file():
            path = Path(spec)
        else:
            return None
        pre = read_metadata(path).get("tokenizer.ggml.pre")
        return str(pre) if pre is not None else None
    except (OSError, ValueError, KeyError, ImportError, ModelLoadError):  # unreadable: fall back to "default"
        return None


def _check_model(model: nn.Module) -> tuple[str, bool]:
    config = model.config
    kind = getattr(config, "model_type", "")
    if kind not in ARCHITECTURES:
        raise PruneConfigError(f"GGUF export supports {', '.join(sorted(ARCHITECTURES))} models; this one is "
                               f"'{kind}' (export it as hf-native / hf-remote-code instead).")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = (rope.get("rope_type") or rope.get("type") or "default") if isinstance(rope, dict) else "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise PruneConfigError(f"GGUF export handles default, linear and llama3 rope scaling; this model uses "
                               f"'{rope_type}'.")
    return ARCHITECTURES[kind]


def _rope(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    out = dict(rope) if isinstance(rope, dict) else {}
    out.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    out["rope_type"] = out.get("rope_type") or out.get("type") or "default"
    return out


def llama3_rope_factors(config) -> torch.Tensor:
    """Per-frequency divisors of Llama-3.1's rope scaling, (head_dim/2,) fp32 — llama.cpp reads them from
    the ``rope_freqs.weight`` tensor (its rope divides each frequency by the factor)."""
    rope = _rope(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _add_metadata(writer, model: nn.Module, arch: str, widths: list[int], options: GGUFOptions, name: str) -> None:
    config = model.config
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    layers = int(config.num_hidden_layers)
    per_layer = arch == "deci"
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(layers)
    writer.add_feed_forward_length([int(w) for w in widths] if per_layer else int(widths[0]))
    writer.add_head_count([heads] * layers if per_layer else heads)
    writer.add_head_count_kv([kv] * layers if per_layer else kv)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch in ("llama", "deci"):
        writer.add_rope_dimension_count(head_dim)
    if rope["rope_type"] == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(_file_type(options.type))


def _token_table(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order and their llama.cpp types for a byte-level BPE vocabulary."""
    import gguf

    vocab = tokenizer.get_vocab()  # token → id, added tokens included
    reverse = {i: t for t, i in vocab.items()}
    added = {int(i): tok for i, tok in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(max(vocab_size, len(vocab))):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(reverse[i])
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(reverse[i])
            types.append(int(gguf.TokenType.NORMAL))
    return tokens, types


def _add_tokenizer(writer, tokenizer, vocab_size: int, pre: str) -> None:
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise PruneConfigError("GGUF export needs a fast (tokenizer.json) tokenizer.")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    decoder = (spec.get("decoder") or {}).get("type")
    with tempfile.TemporaryDirectory(prefix="hfprune-gguf-tok-") as folder:
        tokenizer.save_pretrained(folder)
        if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel":
            tokens, types = _token_table(tokenizer, vocab_size)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre)
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
        elif model.get("type") == "BPE" and model.get("byte_fallback"):
            vocab = gguf.LlamaHfVocab(Path(folder))
            tokens, scores, types = [], [], []
            for text, score, kind in vocab.all_tokens():
                tokens.append(text)
                scores.append(score)
                types.append(int(kind))
            for i in range(len(tokens), vocab_size):  # an embedding padded past the tokenizer
                tokens.append(f"[PAD{i}]".encode())
                scores.append(-1000.0)
                types.append(int(gguf.TokenType.UNUSED))
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
        else:
            raise PruneConfigError("GGUF export writes byte-level BPE (GPT-2 / Llama-3 / SmolLM style) and Llama "
                                   f"sentencepiece-BPE tokenizers; this one is {model.get('type')!r}.")


def _tensors(model: nn.Module, arch: str, permute: bool):
    """(gguf name, fp32 tensor) for every weight, q/k permuted for llama.cpp's rope where needed."""
    import gguf

    config = model.config
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), int(config.num_hidden_layers))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PruneConfigError(f"GGUF export does not know where the tensor '{key}' goes in a {arch} file.")
        data = tensor.detach().to("cpu", torch.float32)
        if permute and key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            data = permute_qk(data, heads)
        elif permute and key.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            data = permute_qk(data, kv)
        yield name, data
    if _rope(config)["rope_type"] == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(config)


def _encode(data: torch.Tensor, kind: str) -> tuple[np.ndarray, object]:
    """(array to write, raw dtype or None): 1-D → F32; 2-D → the asked type (quantized types need rows of
    block·k, checked beforehand by :func:`check_block_rows`)."""
    import gguf

    array = data.numpy()
    if array.ndim < 2 or kind == "f32":
        return array.astype(np.float32), None
    if kind == "f16":
        return array.astype(np.float16), None
    qtype = _qtype(kind)
    return gguf.quants.quantize(array, qtype), qtype


def _layout(model: nn.Module, base_arch: str, options: GGUFOptions) -> tuple[nn.Module, list[int], str]:
    """(model to write — a zero-padded copy for ``padded`` —, its MLP widths, the GGUF architecture)."""
    widths = [h.width for h in mlp_handles(model)]
    if len(set(widths)) > 1:
        if options.layout == "padded":
            return padded_copy(model, max(widths)), [max(widths)] * len(widths), base_arch
        if base_arch != "llama":
            raise PruneConfigError(f"Per-layer widths of a {base_arch} model have no GGUF form llama.cpp reads; "
                                   "use --gguf-layout padded (or a uniform allocation).")
        return model, widths, "deci"
    return model, widths, "deci" if options.layout == "deci" and base_arch == "llama" else base_arch


def save_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, options: GGUFOptions | None = None, *,
              source: str | None = None, name: str | None = None) -> Path:
    """Write ``model`` (+ tokenizer) to the GGUF file ``path`` (atomically); returns the path.

    ``source``: the spec the model was loaded from (for the pre-tokenizer name of a source GGUF).
    A quantized type refuses a 2-D row length that is not a multiple of its block (:func:`check_block_rows`).
    A K-quant is written as F32 first, then quantized by llama.cpp (needs llama-cpp-python) and its
    tensor types checked (:mod:`core.export.kquant`). Uniform widths give a standard ``llama`` / ``qwen2`` /
    ``qwen3`` file; per-layer widths follow ``options.layout`` (module docstring)."""
    options = options or GGUFOptions()
    base_arch, permute = _check_model(model)
    model, widths, arch = _layout(model, base_arch, options)
    check_block_rows(model, options.type)  # before any byte is written
    pre = options.pre if options.pre != "auto" else (source_pre_tokenizer(source) or "default")
    title = name or f"{Path(str(getattr(model.config, '_name_or_path', '') or 'model')).name} (pruned)"
    target = Path(path)
    tmp = target.with_name(f".{target.name}.partial")
    if options.type not in KQUANTS:
        _write(model, tokenizer, tmp, arch, permute, widths, options, pre, title)
        os.replace(tmp, target)
        return target
    llama_cpp_binding()  # a missing binding is one sentence before anything is written
    f32 = target.with_name(f".{target.name}.f32.partial")
    try:
        _write(model, tokenizer, f32, arch, permute, widths, options.replace(type="f32"), pre, title)
        quantize_file(f32, tmp, options.type)
        check_kquant_types(tensor_types(tmp, matrices=True), options.type)
        os.replace(tmp, target)
    finally:
        f32.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return target


def _write(model: nn.Module, tokenizer, path: Path, arch: str, permute: bool, widths: list[int],
           options: GGUFOptions, pre: str, title: str) -> None:
    """One GGUF file at ``path`` with the gguf package (a block type already checked); removed on failure."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch, use_temp_file=True)
    try:
        _add_metadata(writer, model, arch, widths, options, title)
        _add_tokenizer(writer, tokenizer, int(model.config.vocab_size), pre)
        for tensor_name, data in _tensors(model, arch, permute):
            array, raw = _encode(data, options.type)
            writer.add_tensor(tensor_name, array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)
        raise
