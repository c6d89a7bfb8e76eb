"""Atomic writes and the per-layer tensor file: one home for "write it so a crash never leaves half a file".

Every writer fills a hidden temporary sibling (``.<name>.partial`` for files, ``.<name>-XXXX`` for
folders) and renames it into place with ``os.replace`` (atomic on one filesystem); on any error the
temporary is removed and the target is untouched.

Per-layer tensor files (scores, kept indices) are safetensors with one tensor per decoder layer
under ``layer_000``, ``layer_001``, … and string metadata in the header; ``read_layer_tensors``
returns them in layer order (files written before this module used the same keys).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

LAYER_KEY = "layer_{:03d}"
_LAYER_KEY = re.compile(r"^layer_(\d+)$")


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path of ``target`` to write; on success it replaces ``target``."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.partial")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically."""
    with atomic_file(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``target`` atomically."""
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(target)


def write_json(target: str | os.PathLike, data: Any, *, indent: int | None = 2, default=None) -> Path:
    """Write ``data`` as JSON to ``target`` atomically (``default``: json.dumps' fallback encoder)."""
    return write_text(target, json.dumps(data, indent=indent, default=default))


def write_safetensors(target: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> Path:
    """Write named tensors (made contiguous, on the CPU) as safetensors atomically."""
    data = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    with atomic_file(target) as tmp:
        save_file(data, str(tmp), metadata=metadata)
    return Path(target)


def write_layer_tensors(target: str | os.PathLike, tensors: list[torch.Tensor],
                        metadata: dict[str, str] | None = None) -> Path:
    """One tensor per layer (``layer_000`` …) plus string ``metadata``, written atomically."""
    return write_safetensors(target, {LAYER_KEY.format(i): t for i, t in enumerate(tensors)}, metadata)


def read_layer_tensors(path: str | os.PathLike) -> tuple[list[torch.Tensor], dict[str, str]]:
    """(tensors in layer order, header metadata) of a per-layer tensor file."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    tensors = load_file(str(path))
    layered = sorted((int(m.group(1)), key) for key in tensors if (m := _LAYER_KEY.match(key)))
    keys = [key for _i, key in layered] if len(layered) == len(tensors) else sorted(tensors)
    return [tensors[key] for key in keys], dict(metadata)


@contextlib.contextmanager
def atomic_folder(target: Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling folder of ``target`` to fill; on success it replaces ``target``
    (which must be absent or an empty folder), on any error it is deleted, so no half-written folder
    is left. ``keep_existing``: if ``target`` appeared meanwhile (another process won a race), keep it
    and drop the new folder."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists() and keep_existing:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
