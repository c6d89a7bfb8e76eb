"""K-quants (Q4_K_M, Q5_K_M, Q6_K) through llama.cpp's own quantizer, reached with the llama-cpp-python
binding, and the one place that imports that binding (with the sentence that says how to install it).

llama.cpp's K-quants store a row in super-blocks of :data:`KQUANT_BLOCK` (256) values. Its quantizer picks
a type per tensor (the ``_M`` mixes give some ``ffn_down`` / ``attn_v`` more bits) and, for a tensor whose
row length is not a multiple of 256, silently *falls back* to a 32-block type (Q4_K → Q5_0, Q5_K → Q5_1,
Q6_K → Q8_0) or, when even 32 does not divide the row, to F16. Here the pruned rows (``ffn_down``, the
kept MLP width) must fill the super-blocks — checked before anything is written — and the types the file
really holds are read back and reported, so a fallback of the model's own sizes (SmolLM2's hidden size
576 is 2.25 super-blocks) is shown, never hidden.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from core.errors import HFPruneError, PruneConfigError

KQUANT_BLOCK = 256  # values per K-quant super-block along a row
# our type name → the binding's llama_ftype constant name (LLAMA_FTYPE_MOSTLY_*)
KQUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
           "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
# GGML tensor types a K-quant file may hold for a 2-D weight: the K types, and the 32-block types the
# quantizer falls back to (or mixes in) — never F16 / F32
K_TYPES = frozenset({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"})
BLOCK_TYPES = K_TYPES | {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
INSTALL = ("llama.cpp is reached through llama-cpp-python, which is not installed here: run `pip install "
           "llama-cpp-python==0.3.36` (it builds llama.cpp from source, about {minutes} on 2 cores).")
BUILD_MINUTES = "5–10 minutes"  # the source build of 0.3.36 on a 2-core CPU: 4.5 min quiet, 10.5 min shared (README)


class LlamaCppMissing(HFPruneError):
    """The llama-cpp-python binding is not importable."""


def llama_cpp_binding():
    """The ``llama_cpp`` module, imported on first use: it is built from source when installed (minutes of
    compiling) and may be missing, so the engine, the dashboard and the tests import and run without it; a
    missing binding is :class:`LlamaCppMissing` with the install sentence."""
    try:
        import llama_cpp  # optional backend, imported only when llama.cpp is asked for (see above)
    except ImportError as exc:
        raise LlamaCppMissing(INSTALL.format(minutes=BUILD_MINUTES)) from exc
    return llama_cpp


def llama_cpp_missing() -> str | None:
    """None when the binding can be imported, else the sentence that says how to install it (nothing is
    imported: the dashboard asks this to show or hide its llama.cpp panel)."""
    return None if importlib.util.find_spec("llama_cpp") else INSTALL.format(minutes=BUILD_MINUTES)


def quiet_llama_cpp(binding) -> None:
    """Silence llama.cpp's own log (loading and quantizing print hundreds of lines to stderr)."""
    if getattr(binding, "_hfprune_quiet", None) is None:
        @binding.llama_log_callback
        def _drop(level, text, user_data):  # noqa: ARG001 - the C callback's signature
            return None

        binding._hfprune_quiet = _drop  # keep the callback alive as long as the module
        binding.llama_log_set(_drop, None)


def check_kquant_rows(shapes: dict[str, tuple[int, ...]], kind: str) -> None:
    """Refuse, in one sentence, a pruned row that does not fill K-quant super-blocks (``ffn_down``:
    its row is the kept MLP width), or a row that does not fill even a 32-block (the quantizer would
    write it in F16). ``shapes``: HF state-dict name → shape."""
    for key, shape in shapes.items():
        if len(shape) < 2:
            continue
        row = int(shape[-1])
        if key.endswith("down_proj.weight") and row % KQUANT_BLOCK:
            raise PruneConfigError(f"GGUF {kind.upper()} stores rows in super-blocks of {KQUANT_BLOCK}, but '{key}' "
                                   f"has rows of {row} (its kept MLP width), which llama.cpp would silently store "
                                   f"in another type: prune with --round-to {KQUANT_BLOCK} or choose q8_0 / q4_0.")
        if row % 32:
            raise PruneConfigError(f"GGUF {kind.upper()} would store '{key}' (rows of {row}, a size of the model that "
                                   "pruning does not change) in F16: choose f16 or f32.")


def quantize_file(source: str | os.PathLike, target: str | os.PathLike, kind: str, threads: int = 0) -> Path:
    """Quantize the F32 / F16 GGUF ``source`` into ``target`` as K-quant ``kind`` with llama.cpp's
    ``llama_model_quantize`` (``threads`` 0: every core); returns ``target``."""
    if kind not in KQUANTS:
        raise PruneConfigError(f"Unknown K-quant '{kind}'; available: {', '.join(KQUANTS)}.")
    binding = llama_cpp_binding()
    quiet_llama_cpp(binding)
    params = binding.llama_model_quantize_default_params()
    params.ftype = getattr(binding, KQUANTS[kind])
    params.nthread = int(threads)
    code = binding.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if code != 0:
        Path(target).unlink(missing_ok=True)
        raise PruneConfigError(f"llama.cpp's quantizer could not write {kind.upper()} (llama_model_quantize returned "
                               f"{code}).")
    return Path(target)


def check_kquant_types(types: dict[str, str], kind: str) -> None:
    """After quantizing: every ``ffn_down`` must hold a K type and no 2-D weight F16 / F32 (a silent
    fallback would break the promise of :func:`check_kquant_rows`). ``types``: GGUF tensor → type name,
    2-D weights only."""
    for name, stored in types.items():
        if ".ffn_down." in name and stored not in K_TYPES:
            raise PruneConfigError(f"llama.cpp stored '{name}' as {stored} instead of a {kind.upper()} type; the file "
                                   "was not kept.")
        if stored not in BLOCK_TYPES:
            raise PruneConfigError(f"llama.cpp stored '{name}' as {stored} in a {kind.upper()} file; the file was "
                                   "not kept.")
