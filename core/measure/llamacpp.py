"""llama.cpp as a measuring engine: the GGUF files this project writes (uniform ``llama`` / ``qwen2`` /
``qwen3``, per-layer ``deci``) run in llama.cpp itself, through the llama-cpp-python binding.

- **speed**: prompt processing (one batch of ``prompt_tokens``, tokens/s) and generation (``gen_tokens``
  single-token decodes from an empty context, tokens/s, as ``llama-bench``'s tg), ``threads`` CPU threads,
  every model loaded at once and the repeats *interleaved* (repeat r times model 1, 2, … before repeat r+1,
  in a rotated order), so a change of machine load hits all models alike; median and quartiles per model,
  and the speed-up over the reference with its quartile interval beside the FLOP ideal.
- **quality**: llama.cpp's own logits (``logits_all``) on the evaluation windows the torch evaluation uses
  (``core.data.text.evaluation_windows``, tokenized with the file's own tokenizer): perplexity, and the KL
  of each model's next-token distribution to the reference's, per position, averaged (nats).
- **ideal**: per-token FLOPs read from the file (2 × the weights a token passes through — the LM head
  included, the embedding lookup not — plus attention over the mean context), so the FLOP-ratio speed-up
  sits beside each measured one.

    rows = measure_llamacpp({"dense": "dense-Q8_0.gguf", "pruned": "p20-Q8_0.gguf"}, LlamaCppOptions())
"""
from __future__ import annotations

import gc
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core import metrics
from core.data.text import evaluation_windows
from core.export.gguf import GGUFOptions, save_gguf
from core.export.hf import read_meta
from core.export.kquant import llama_cpp_binding, quiet_llama_cpp
from core.measure.speed import SpeedError, speedup, spread
from core.models.gguf_read import type_counts
from core.models.loading import EMBEDDED, load_model
from core.options import Options, knob
from core.paths import cache_dir
from core.progress import check_stop


@dataclass
class LlamaCppOptions(Options):
    """How GGUF files are measured in llama.cpp (``bench --engine llama.cpp``, the dashboard's llama.cpp
    panel, ``benchmarks/llamacpp.py``)."""

    error = SpeedError

    prompt_tokens: int = knob(512, "prompt-processing tokens (one batch)", low=8, ui_high=2048, step=8,
                              flag="prefill")
    gen_tokens: int = knob(64, "generated tokens (one decode each, from an empty context)", low=1, ui_high=512,
                           flag="decode")
    repeats: int = knob(5, "interleaved repeats of each timing per model (median and quartiles)", low=1,
                        ui_high=20)
    threads: int = knob(2, "llama.cpp CPU threads (prompt and generation)", low=1, ui_high=64)
    windows: int = knob(8, "evaluation windows for perplexity and KL (0: speed only)", low=0, ui_high=64,
                        flag="eval-windows")
    seq_len: int = knob(256, "tokens per evaluation window", low=8, ui_high=2048, step=8, flag="eval-seq-len")
    text: str = knob("wiki", "evaluation text: wiki (held-out articles), news, or a .txt/.jsonl path",
                     flag="eval-text")


@dataclass
class GGUFCounts:
    """What a GGUF file holds: bytes on disk, parameters, per-token FLOPs terms, tensor types."""

    file_bytes: int
    params: int
    matmul_params: int  # weights a token is multiplied by (LM head included, embedding lookup not)
    attention_width: int  # Σ over layers of query heads × head size (the attention term per key)
    architecture: str
    widths: list[int]  # MLP width per layer
    tensor_types: dict[str, int]  # GGML type → number of 2-D tensors stored in it
    tensor_bytes: int = 0  # bytes of tensor data; file_bytes − tensor_bytes = header, tokenizer, alignment

    def flops_per_token(self, context: int) -> int:
        """2 × matmul weights + 4 × Σ heads·head_dim × ``context`` (scores and the weighted sum)."""
        return 2 * self.matmul_params + 4 * self.attention_width * int(context)


def _field(fields: dict, key: str):
    field = fields.get(key)
    return None if field is None else field.contents()


def gguf_counts(path: str | os.PathLike) -> GGUFCounts:
    """Read :class:`GGUFCounts` from a GGUF file's header and tensor table."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    arch = str(_field(fields, "general.architecture"))
    layers = int(_field(fields, f"{arch}.block_count"))
    heads = _field(fields, f"{arch}.attention.head_count")
    heads = [int(h) for h in heads] if isinstance(heads, list) else [int(heads)] * layers
    hidden = int(_field(fields, f"{arch}.embedding_length"))
    head_dim = _field(fields, f"{arch}.attention.key_length")
    head_dim = int(head_dim) if head_dim is not None else hidden // max(1, heads[0])
    widths = _field(fields, f"{arch}.feed_forward_length")
    widths = [int(w) for w in widths] if isinstance(widths, list) else [int(widths)] * layers
    sizes = {t.name: int(t.n_elements) for t in reader.tensors}
    shapes = {t.name: len(t.shape) for t in reader.tensors}
    matmul = sum(n for name, n in sizes.items() if shapes[name] >= 2 and name != "token_embd.weight")
    if "output.weight" not in sizes:  # tied embeddings: the LM head multiplies by token_embd
        matmul += sizes.get("token_embd.weight", 0)
    types = {t.name: t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2}
    return GGUFCounts(Path(path).stat().st_size, sum(sizes.values()), matmul, sum(h * head_dim for h in heads), arch,
                      widths, type_counts(types), sum(int(t.n_bytes) for t in reader.tensors))


def gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer stored in a GGUF file (the ``deci`` files too), as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    return PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)


def check_files(models: dict[str, str | os.PathLike]) -> dict[str, Path]:
    """Each name → an existing .gguf file, else one sentence naming the missing or wrong one."""
    if not models:
        raise SpeedError("Give at least one GGUF file to measure.")
    out = {}
    for name, path in models.items():
        path = Path(path)
        if not path.is_file():
            raise SpeedError(f"No GGUF file at {path}; give the path of a .gguf file (prune --export gguf writes one).")
        with path.open("rb") as handle:
            if handle.read(4) != b"GGUF":
                raise SpeedError(f"{path} is not a GGUF file (its first bytes are not 'GGUF').")
        out[name] = path
    return out


def gguf_file(spec: str) -> tuple[Path, dict | None]:
    """(the .gguf file, the export's pruning_meta.json or None) of a .gguf path, a ``prune --export gguf``
    folder or an embedded alias (its packaged GGUF); anything else is one sentence."""
    if spec in EMBEDDED:
        return EMBEDDED[spec].locate(), None
    path = Path(spec)
    if path.is_dir():
        meta = read_meta(path) or {}
        if meta.get("gguf_file") and (path / meta["gguf_file"]).is_file():
            return path / meta["gguf_file"], meta
        raise SpeedError(f"{path} holds no GGUF export; llama.cpp measures .gguf files (prune --export gguf "
                         "writes one).")
    return check_files({spec: path})[spec], None


def dense_gguf(spec: str, gguf: dict) -> Path:
    """The dense model ``spec`` as a GGUF of the same type / layout as an export (``gguf``: its recorded
    GGUFOptions), written once into the cache: the same-format baseline of a pruned file."""
    options = GGUFOptions.from_dict(gguf)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("._") or "model"
    target = cache_dir() / "gguf" / f"{safe}-{options.type.upper()}.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        loaded = load_model(spec)
        save_gguf(loaded.model, loaded.tokenizer, target, options, source=spec, name=f"{safe} (dense)")
    return target


def _open(path: Path, n_ctx: int, n_batch: int, threads: int, logits_all: bool):
    binding = llama_cpp_binding()
    quiet_llama_cpp(binding)
    try:
        return binding.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                             n_threads=threads, n_threads_batch=threads, logits_all=logits_all, verbose=False)
    except ValueError as exc:  # the binding's "Failed to load model from file"
        raise SpeedError(f"llama.cpp could not load {path.name}: {exc}.") from exc


def _close(models: dict) -> None:
    for llm in models.values():
        llm.close()
    models.clear()
    gc.collect()


def _timed(llm, tokens: list[int], one_by_one: bool) -> float:
    """Seconds to decode ``tokens`` from an empty context: one batch, or one token per decode."""
    llm.reset()
    began = time.perf_counter()
    if one_by_one:
        for token in tokens:
            llm.eval([token])
    else:
        llm.eval(tokens)
    return time.perf_counter() - began


def _tokens(count: int, vocab: int) -> list[int]:
    """Fixed token ids for timing (speed does not depend on which tokens; seeded, away from id 0)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(1, max(2, vocab), (count,), generator=generator).tolist()


def measure_speed_llamacpp(models: dict[str, Path], options: LlamaCppOptions,
                           stop: Callable[[], bool] | None = None,
                           on_progress: Callable[[int, int], None] | None = None) -> dict[str, dict[str, list[float]]]:
    """Interleaved prompt and generation timings of every model: name → {"prompt_s": [...], "gen_s": [...]}
    (seconds per repeat). ``on_progress(done, total)`` after each timing; ``stop()`` ends with Stopped."""
    opened: dict = {}
    try:
        for name, path in models.items():
            opened[name] = _open(path, options.prompt_tokens + options.gen_tokens, options.prompt_tokens,
                                 options.threads, logits_all=False)
        vocab = min(llm.n_vocab() for llm in opened.values())
        prompt, gen = _tokens(options.prompt_tokens, vocab), _tokens(options.gen_tokens, vocab)
        names = list(opened)
        for name in names:  # warm-up: page the weights in, size the buffers
            _timed(opened[name], prompt, False)
            _timed(opened[name], gen[:4], True)
        samples = {name: {"prompt_s": [], "gen_s": []} for name in names}
        total, done = 2 * options.repeats * len(names), 0
        for repeat in range(options.repeats):
            order = names[repeat % len(names):] + names[:repeat % len(names)]
            for key, tokens, one in (("prompt_s", prompt, False), ("gen_s", gen, True)):
                for name in order:
                    check_stop(stop, "The llama.cpp measurement was stopped.")
                    samples[name][key].append(_timed(opened[name], tokens, one))
                    done += 1
                    if on_progress is not None:
                        on_progress(done, total)
        return samples
    finally:
        _close(opened)


def _log_probs(llm, window: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(window)
    return metrics.log_probs(torch.from_numpy(np.array(llm.scores[: len(window)], dtype=np.float32)))


def llamacpp_logits(path: str | os.PathLike, windows: torch.Tensor, threads: int = 2) -> torch.Tensor:
    """llama.cpp's logits of the GGUF file ``path`` on ``windows`` (N, T) token ids, each from an empty
    context: (N, T, V) fp32 — what the torch model's ``logits`` are compared with."""
    path = check_files({"model": path})["model"]
    llm = _open(path, int(windows.shape[1]), int(windows.shape[1]), threads, logits_all=True)
    try:
        out = []
        for window in windows.tolist():
            llm.reset()
            llm.eval(window)
            out.append(torch.from_numpy(np.array(llm.scores[: len(window)], dtype=np.float32)))
        return torch.stack(out)
    finally:
        llm.close()


def measure_quality_llamacpp(models: dict[str, Path], reference: str, windows: torch.Tensor, threads: int = 2,
                             stop: Callable[[], bool] | None = None) -> dict[str, dict]:
    """Perplexity of every model and its KL to ``reference`` (a name in ``models``) from llama.cpp's logits
    on ``windows`` (N, T) token ids: name → {"perplexity", "kl_to_reference", "top1_agreement", "tokens"}."""
    seq_len = int(windows.shape[1])
    opened: dict = {}
    sums = {name: {"nll": 0.0, "kl": 0.0, "agree": 0.0} for name in models}
    count = 0
    try:
        for name, path in models.items():
            opened[name] = _open(path, seq_len, seq_len, threads, logits_all=True)
        for window in windows.tolist():
            check_stop(stop, "The llama.cpp measurement was stopped.")
            targets = torch.tensor(window[1:])
            ref = _log_probs(opened[reference], window)[:-1]
            for name, llm in opened.items():
                logp = ref if name == reference else _log_probs(llm, window)[:-1]
                sums[name]["nll"] += float(metrics.nll(logp, targets).double().sum())
                sums[name]["kl"] += float(metrics.kl(ref, logp).double().sum())
                sums[name]["agree"] += float((logp.argmax(-1) == ref.argmax(-1)).double().sum())
            count += len(targets)
    finally:
        _close(opened)
    return {name: {"perplexity": float(np.exp(s["nll"] / count)), "kl_to_reference": s["kl"] / count,
                   "top1_agreement": s["agree"] / count, "tokens": count} for name, s in sums.items()}


def measure_llamacpp(models: dict[str, str | os.PathLike], options: LlamaCppOptions | None = None, *,
                     reference: str | None = None, tokenizer=None, stop: Callable[[], bool] | None = None,
                     on_progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Speed and quality of GGUF files in llama.cpp, one row per model (``reference`` — default the first —
    first): file size, parameters, tensor types, prompt / generation tokens/s (median, quartiles), speed-ups
    over the reference with their intervals beside the FLOP ideal, and, with ``options.windows`` > 0,
    perplexity and KL to the reference. ``tokenizer``: for the evaluation windows (default: the reference
    file's own)."""
    options = options or LlamaCppOptions()
    paths = check_files(models)
    reference = reference or next(iter(paths))
    if reference not in paths:
        raise SpeedError(f"The reference '{reference}' is not among the measured models ({', '.join(paths)}).")
    paths = {reference: paths[reference], **{k: v for k, v in paths.items() if k != reference}}
    counts = {name: gguf_counts(path) for name, path in paths.items()}
    times = measure_speed_llamacpp(paths, options, stop=stop, on_progress=on_progress)
    quality: dict[str, dict] = {}
    if options.windows > 0:
        tokenizer = tokenizer or gguf_tokenizer(paths[reference])
        ids = evaluation_windows(tokenizer, options.text, options.windows, options.seq_len)
        quality = measure_quality_llamacpp(paths, reference, ids, options.threads, stop=stop)
    return [llamacpp_row(name, paths[name], counts, times, quality, reference, options) for name in paths]


def llamacpp_row(name: str, path: Path, counts: dict[str, GGUFCounts], times: dict, quality: dict, reference: str,
                 options: LlamaCppOptions) -> dict:
    """One model's row of :func:`measure_llamacpp` from its parts: ``counts`` (:func:`gguf_counts` per name),
    ``times`` (:func:`measure_speed_llamacpp`), ``quality`` (:func:`measure_quality_llamacpp`, may be {}),
    speed-ups over ``reference``."""
    mine, base = counts[name], counts[reference]
    prompt, gen = spread(times[name]["prompt_s"]), spread(times[name]["gen_s"])
    row = {"model": name, "file": str(path), "architecture": mine.architecture, "widths": mine.widths,
           "file_bytes": mine.file_bytes, "params": mine.params, "tensor_types": mine.tensor_types,
           "threads": options.threads, "prompt_tokens": options.prompt_tokens, "gen_tokens": options.gen_tokens,
           "repeats": options.repeats,
           "prompt_tokens_per_s": options.prompt_tokens / prompt.median,
           "prompt_tokens_per_s_q1_q3": [options.prompt_tokens / prompt.q3, options.prompt_tokens / prompt.q1],
           "gen_tokens_per_s": options.gen_tokens / gen.median,
           "gen_tokens_per_s_q1_q3": [options.gen_tokens / gen.q3, options.gen_tokens / gen.q1],
           "prompt_s_all": times[name]["prompt_s"], "gen_s_all": times[name]["gen_s"],
           "param_ratio": mine.params / base.params, "file_ratio": mine.file_bytes / base.file_bytes,
           "tensor_bytes": mine.tensor_bytes, "tensor_ratio": mine.tensor_bytes / max(1, base.tensor_bytes)}
    prompt_ideal = base.flops_per_token(options.prompt_tokens // 2) / mine.flops_per_token(options.prompt_tokens // 2)
    gen_ideal = base.flops_per_token(options.gen_tokens // 2) / mine.flops_per_token(options.gen_tokens // 2)
    row["same_format"] = set(mine.tensor_types) == set(base.tensor_types)
    if not row["same_format"]:  # another storage type: the FLOP ratio is not what bounds the speed-up
        prompt_ideal = gen_ideal = None
    if name != reference:
        row["prompt_speedup"] = speedup(spread(times[reference]["prompt_s"]), prompt, prompt_ideal).to_dict()
        row["gen_speedup"] = speedup(spread(times[reference]["gen_s"]), gen, gen_ideal).to_dict()
    row["prompt_ideal"], row["gen_ideal"] = prompt_ideal, gen_ideal
    row.update(quality.get(name, {}))
    return row
