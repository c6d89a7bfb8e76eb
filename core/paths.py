"""Where the project keeps converted models, cleaned corpora and runs on disk."""
from __future__ import annotations

import os
from pathlib import Path

# The checkout's assets/ folder: shipped task files, the Tour's precomputed numbers, CSS, logo, page script.
ASSETS = Path(__file__).resolve().parents[1] / "assets"
# The checkout's benchmark results (benchmarks/*.py write them): the dashboard's recommendations cite them.
BENCHMARK_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


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
