"""The run store: every scoring / pruning / evaluation run on disk, listable, reloadable, deletable.

Layout under ``core.paths.runs_dir()`` (or an explicit root)::

    <run_id>/config.json          what was asked (kind, model, criterion, ...) + created_at
    <run_id>/results.json         what came out (metrics, widths, ...) + updated_at
    <run_id>/scores.safetensors   per-layer scores (score runs)
    <run_id>/kept.safetensors     per-layer kept neuron indices (prune runs)
    <run_id>/weights.safetensors  named tensors a run changed (recover runs: trained weights or LoRA adapters)

A run folder is built in a hidden temporary sibling and renamed into place, every later file write
goes through ``core.files`` (a temporary file + ``os.replace``), and deletion renames the folder
away before removing it, so a crash never leaves a half-written run in the listing.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file

from core.errors import HFPruneError
from core.files import (
    atomic_folder,
    read_layer_tensors,
    write_json,
    write_layer_tensors,
    write_safetensors,
)
from core.paths import runs_dir

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
SCORES_FILE = "scores.safetensors"
KEPT_FILE = "kept.safetensors"
WEIGHTS_FILE = "weights.safetensors"
_RUN_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[a-z_]{1,16}-[0-9a-f]{6}$")


class RunNotFoundError(HFPruneError):
    """The run id does not name a stored run."""


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_run_id(kind: str) -> str:
    """``YYYYmmdd-HHMMSS-<kind>-<6 hex>``: sortable by time, unique, safe as a folder name."""
    kind = re.sub(r"[^a-z_]", "_", kind.lower())[:16] or "run"
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{kind}-{secrets.token_hex(3)}"


def _write_json(path: Path, data: dict) -> None:
    write_json(path, data, default=_jsonable)


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _read_tensors(path: Path) -> list[torch.Tensor]:
    return read_layer_tensors(path)[0]


@dataclass
class Run:
    """One stored run: its folder, config and results (tensors are loaded on request)."""

    run_id: str
    folder: Path
    config: dict
    results: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.config.get("kind", ""))

    @property
    def created_at(self) -> str:
        return str(self.config.get("created_at", ""))

    def has_scores(self) -> bool:
        return (self.folder / SCORES_FILE).exists()

    def scores(self) -> list[torch.Tensor]:
        """Per-layer fp32 scores of a score run."""
        path = self.folder / SCORES_FILE
        if not path.exists():
            raise HFPruneError(f"Run {self.run_id} has no scores.")
        return [t.float() for t in _read_tensors(path)]

    def kept(self) -> list[torch.Tensor]:
        """Per-layer kept neuron indices of a prune run."""
        path = self.folder / KEPT_FILE
        if not path.exists():
            raise HFPruneError(f"Run {self.run_id} has no kept-neuron indices.")
        return [t.long() for t in _read_tensors(path)]

    def weights(self) -> dict[str, torch.Tensor]:
        """Named tensors stored with the run (recover runs)."""
        path = self.folder / WEIGHTS_FILE
        if not path.exists():
            raise HFPruneError(f"Run {self.run_id} has no stored weights.")
        return load_file(str(path))


class RunStore:
    """Create, update, list, load and delete runs under one root folder."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else runs_dir()
        self.root.mkdir(parents=True, exist_ok=True)

    # -- writing ---------------------------------------------------------------------------
    def create(self, kind: str, config: dict, *, results: dict | None = None,
               scores: list[torch.Tensor] | None = None, kept: list[torch.Tensor] | None = None,
               weights: dict[str, torch.Tensor] | None = None) -> Run:
        """Write a complete run atomically (temporary folder renamed into place); return it."""
        run_id = new_run_id(kind)
        full_config = {**config, "kind": kind, "run_id": run_id, "created_at": _now()}
        full_results = {**(results or {}), "updated_at": _now()}
        with atomic_folder(self.root / run_id) as tmp:
            _write_json(tmp / CONFIG_FILE, full_config)
            _write_json(tmp / RESULTS_FILE, full_results)
            if scores is not None:
                write_layer_tensors(tmp / SCORES_FILE, scores, {"run_id": run_id})
            if kept is not None:
                write_layer_tensors(tmp / KEPT_FILE, [torch.as_tensor(k, dtype=torch.long) for k in kept],
                                    {"run_id": run_id})
            if weights is not None:
                write_safetensors(tmp / WEIGHTS_FILE, weights, {"run_id": run_id})
        return Run(run_id, self.root / run_id, full_config, full_results)

    def update_results(self, run_id: str, updates: dict) -> Run:
        """Merge ``updates`` into results.json (atomic replace) and stamp ``updated_at``."""
        run = self.load(run_id)
        results = {**run.results, **updates, "updated_at": _now()}
        _write_json(run.folder / RESULTS_FILE, results)
        run.results = results
        return run

    # -- reading ---------------------------------------------------------------------------
    def _folder(self, run_id: str) -> Path:
        if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
            raise RunNotFoundError(f"'{run_id}' is not a run id.")
        folder = self.root / run_id
        if not (folder / CONFIG_FILE).is_file():
            raise RunNotFoundError(f"Run {run_id} does not exist (deleted, or stored under another folder).")
        return folder

    def load(self, run_id: str) -> Run:
        folder = self._folder(run_id)
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
            results_path = folder / RESULTS_FILE
            results = json.loads(results_path.read_text()) if results_path.exists() else {}
        except (OSError, json.JSONDecodeError) as exc:
            raise HFPruneError(f"Run {run_id} is unreadable: {exc}.") from exc
        return Run(run_id, folder, config, results)

    def list(self, kind: str | None = None) -> list[Run]:
        """All readable runs, newest first (unreadable folders are skipped, never deleted)."""
        runs = []
        for folder in self.root.iterdir():
            if folder.name.startswith(".") or not _RUN_ID.match(folder.name):
                continue
            try:
                run = self.load(folder.name)
            except HFPruneError:
                continue
            if kind is None or run.kind == kind:
                runs.append(run)
        runs.sort(key=lambda r: (r.created_at, r.run_id), reverse=True)
        return runs

    def find(self, kind: str, match: dict) -> Run | None:
        """The newest run of ``kind`` whose config has every key/value of ``match``."""
        for run in self.list(kind):
            if all(run.config.get(key) == value for key, value in match.items()):
                return run
        return None

    # -- deleting --------------------------------------------------------------------------
    def delete(self, run_id: str) -> None:
        """Remove a run: rename it out of the listing first, then delete the files."""
        folder = self._folder(run_id)
        trash = self.root / f".trash-{run_id}-{secrets.token_hex(2)}"
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
