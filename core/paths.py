"""Where the project keeps converted models, cleaned corpora and runs on disk."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    """Root cache folder: $HFPRUNE_CACHE, else $XDG_CACHE_HOME/hfprune-studio, else ~/.cache/hfprune-studio."""
    explicit = os.environ.get("HFPRUNE_CACHE")
    if explicit:
        root = Path(explicit)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(base) / "hfprune-studio"
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_dir() -> Path:
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    path = cache_dir() / "data"
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    """Run store root: $HFPRUNE_RUNS, else <cache>/runs."""
    explicit = os.environ.get("HFPRUNE_RUNS")
    path = Path(explicit) if explicit else cache_dir() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``target`` to fill; on success it replaces ``target`` (which
    must be absent or an empty folder), on any error it is deleted, so no half-written folder is left."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
