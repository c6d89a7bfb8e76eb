"""Server-side dashboard state: one ``Session`` per browser session id, plus caches shared by all.

Nothing here holds an algorithm: the caches only remember what the engine returned. Base models
are loaded once per spec and shared read-only; scores are cached per (model, data, criterion);
pruned variants belong to the session that made them.
"""
from __future__ import annotations

import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field

from torch import nn

from core.data.text import CalibrationOptions
from core.errors import SelectionError
from core.methods.oneshot import ScoreResult
from core.models.loading import LoadedModel, load_model

MAX_SESSIONS = 64
MAX_VARIANTS_PER_SESSION = 4
MAX_MODELS = 2


@dataclass(frozen=True)
class DataSpec:
    """Calibration settings: ``source`` is what the engine reads (wiki, news or a file path);
    ``label`` is what identifies it in caches and runs (uploads are named by content hash)."""

    source: str
    label: str
    samples: int
    seq_len: int
    seed: int

    def match(self) -> dict:
        """The run-config fields that identify scores made with these settings."""
        return {"source": self.label, "samples": self.samples, "seq_len": self.seq_len, "seed": self.seed}

    @property
    def name(self) -> str:
        """What a person calls the source: 'wiki', 'news' or the uploaded file's name."""
        if self.label.startswith("upload:"):
            return self.label[len("upload:"):].rsplit("#", 1)[0]
        return self.label

    def short(self) -> str:
        """'wiki, 8 × 64 tokens, seed 0'."""
        return f"{self.name}, {self.samples} × {self.seq_len} tokens, seed {self.seed}"

    def changes(self, new: DataSpec) -> str:
        """What differs from ``new``, in words: 'seed 0 → 1', 'source wiki → news, windows 8 → 16'."""
        parts = [f"{what} {a} → {b}" for what, a, b in (("source", self.name, new.name), ("windows", self.samples,
                 new.samples), ("tokens per window", self.seq_len, new.seq_len), ("seed", self.seed, new.seed))
                 if a != b]
        return ", ".join(parts) or "the uploaded file"


@dataclass
class Variant:
    """A pruned model held by one session (its non-MLP tensors are shared with the base model)."""

    name: str
    base_spec: str
    model: nn.Module
    widths: list[int]
    meta: dict
    run_id: str | None = None
    metrics: dict | None = None


def name_taken(name: str) -> SelectionError:
    """The one sentence that refuses a variant name this session already holds."""
    return SelectionError(f"This session already holds a variant named '{name}'; type another name, or drop that "
                          "one first (Prune ▸ Variants held).")


@dataclass
class Session:
    """Everything one browser session has made; touched only through its own handlers."""

    session_id: str
    model_spec: str | None = None
    data: DataSpec | None = None
    scores: dict[str, ScoreResult] = field(default_factory=dict)  # criterion → scores (active model/data)
    score_runs: dict[str, str] = field(default_factory=dict)  # criterion → run id
    variants: OrderedDict[str, Variant] = field(default_factory=OrderedDict)
    stop: threading.Event = field(default_factory=threading.Event)
    export_dir: str | None = None  # temporary folder of the last .zip download
    last_used: float = field(default_factory=time.time)
    replace: str | None = None  # the variant to drop when the session is full (None: the oldest)
    notices: list[str] = field(default_factory=list)  # things the user must be told once (toasts)
    set_aside: str = ""  # the last time scores were set aside by a change of model or data, in words

    @property
    def calibration(self) -> DataSpec:
        """The session's calibration settings, or the engine's defaults (wiki, 16 × 128, seed 0) before
        any were chosen."""
        if self.data is not None:
            return self.data
        default = CalibrationOptions()
        return DataSpec(default.source, default.source, default.samples, default.seq_len, default.seed)

    @property
    def source(self) -> str:
        """The text the engine reads for this session (a corpus name or an uploaded file's path)."""
        return self.calibration.source

    def new_job(self) -> threading.Event:
        """A fresh stop flag for a job that starts now: Stop sets the current job's flag only, so a
        job started right after a Stop is not cancelled by it, and a stopped job stays stopped."""
        self.stop = threading.Event()
        return self.stop

    def set_context(self, model_spec: str, data: DataSpec) -> None:
        """Switching model or data forgets the scores of the old context (they stay cached, so switching
        back restores them); switching model also drops the variants cut from the old one, which no
        longer have an original here. Either is recorded as a notice for the user."""
        if data != self.data and self.data is not None and self.scores and model_spec == self.model_spec:
            self._set_aside(f"the calibration data changed ({self.data.changes(data)})")
        if data != self.data:
            self.scores.clear()
            self.score_runs.clear()
        self.switch_model(model_spec)
        self.data = data

    def _set_aside(self, why: str) -> None:
        names = ", ".join(self.scores)
        self.set_aside = (f"Scores for {names} were set aside because {why}; they stay cached, so going back "
                          "restores them instantly.")
        self.notices.append(self.set_aside)

    def take_notices(self) -> list[str]:
        """The pending notices (each shown once)."""
        out, self.notices = self.notices, []
        return out

    def switch_model(self, model_spec: str) -> None:
        """Make ``model_spec`` the session's model; a different one drops the old model's scores and variants."""
        if model_spec != self.model_spec:
            if self.scores and self.model_spec:
                self._set_aside(f"the model changed ({self.model_spec} → {model_spec})")
            self.scores.clear()
            self.score_runs.clear()
            dropped = [n for n, v in self.variants.items() if v.base_spec != model_spec]
            for name in dropped:
                del self.variants[name]
            if dropped:
                self.notices.append(f"Variants {', '.join(dropped)} were dropped from this session: they were cut "
                                    f"from {self.model_spec}, not {model_spec} (their runs stay on disk).")
        self.model_spec = model_spec

    def next_to_drop(self, keep: Collection[str] = ()) -> str | None:
        """The variant a new one would replace when the session is full: the user's pick, else the oldest,
        never one in ``keep`` (the variant the action under way reads from). None while there is room,
        or when only variants in ``keep`` are left."""
        if len(self.variants) < MAX_VARIANTS_PER_SESSION:
            return None
        if self.replace in self.variants and self.replace not in keep:
            return self.replace
        return next((name for name in self.variants if name not in keep), None)

    def free_name(self, name: str) -> str:
        """``name``, or ``name-2``, ``name-3``… when this session already holds a variant called ``name``."""
        if name not in self.variants:
            return name
        k = 2
        while f"{name}-{k}" in self.variants:
            k += 1
        return f"{name}-{k}"

    def new_name(self, typed: str | None, default: str) -> str:
        """The name of a variant about to be made: the one the user typed (refused when this session already
        holds it, so nothing is replaced silently), else ``default`` with a suffix when it is taken."""
        typed = (typed or "").strip()
        if not typed:
            return self.free_name(default)
        if typed in self.variants:
            raise name_taken(typed)
        return typed

    def room_for(self, keep: Collection[str] = ()) -> str | None:
        """The variant a new one would push out (None: there is room), checked before the work starts; refused
        with one sentence when the only ones that could go are in ``keep`` (what the action reads from)."""
        if len(self.variants) < MAX_VARIANTS_PER_SESSION:
            return None
        if self.replace in self.variants and self.replace in keep:
            raise SelectionError(f"This session is full and '{self.replace}' is chosen to make room, but this action "
                                 "reads from it; choose another variant to replace, or drop one (Prune ▸ Variants "
                                 "held).")
        victim = self.next_to_drop(keep)
        if victim is None:
            raise SelectionError(f"This session is full ({MAX_VARIANTS_PER_SESSION} variants) and the only ones that "
                                 "could make room are what this action reads from; drop a variant first (Prune ▸ "
                                 "Variants held).")
        return victim

    def add_variant(self, variant: Variant, keep: Collection[str] = (), replace: bool = False) -> str | None:
        """Store a variant under its name. A name already held is refused unless ``replace`` (then a notice
        says so, except when the same stored run is loaded again); when the session is full, the variant
        :meth:`room_for` names makes room, never one in ``keep`` (its run stays on disk). Returns the
        dropped name, if any, and leaves a notice. Nothing changes when it is refused."""
        old = self.variants.get(variant.name)
        if old is not None and not replace:
            raise name_taken(variant.name)
        evicted = None if old is not None else self.room_for(keep)
        if old is not None:
            del self.variants[variant.name]
            if not (old.run_id and old.run_id == variant.run_id):
                self.notices.append(f"'{variant.name}' was replaced by the new variant of the same name"
                                    + (" (the earlier one's run stays on disk)." if old.run_id else "."))
        if evicted is not None:
            gone = self.variants.pop(evicted)
            if self.replace == evicted:
                self.replace = None
            where = ("its run stays on disk; reload it from Runs" if gone.run_id else
                     "it was not stored on disk; make it again from its source")
            self.notices.append(f"This session holds {MAX_VARIANTS_PER_SESSION} variants: '{evicted}' was dropped to "
                                f"make room for '{variant.name}' ({where}).")
        self.variants[variant.name] = variant
        return evicted

    def drop_variant(self, name: str) -> None:
        """Forget a variant (its run stays on disk)."""
        self.variants.pop(name, None)
        if self.replace == name:
            self.replace = None


class SessionStore:
    """Sessions keyed by Gradio's per-browser session hash; the least recently used are dropped."""

    def __init__(self, capacity: int = MAX_SESSIONS) -> None:
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()
        self.capacity = capacity

    def get(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.pop(session_id, None) or Session(session_id)
            session.last_used = time.time()
            self._sessions[session_id] = session
            while len(self._sessions) > self.capacity:
                self._sessions.popitem(last=False)
            return session

    def drop(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None and session.export_dir:
            shutil.rmtree(session.export_dir, ignore_errors=True)

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions


class ModelCache:
    """Base models loaded once per spec and shared read-only by every session (LRU of a few)."""

    def __init__(self, capacity: int = MAX_MODELS) -> None:
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self.capacity = capacity

    def get(self, spec: str) -> LoadedModel:
        spec = (spec or "").strip()
        with self._lock:  # one load at a time; a second caller for the same spec waits and reuses it
            if spec in self._models:
                self._models.move_to_end(spec)
                return self._models[spec]
            loaded = load_model(spec)
            self._models[spec] = loaded
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return loaded

    def cached(self, spec: str) -> bool:
        return spec in self._models


class ScoreCache:
    """Scores per (model, data, criterion) in memory; the run store is the persistent layer below."""

    def __init__(self) -> None:
        self._scores: dict[tuple, tuple[ScoreResult, str]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(model_spec: str, data: DataSpec, criterion: str, params: dict | None = None) -> tuple:
        return (model_spec, data.label, data.samples, data.seq_len, data.seed, criterion,
                tuple(sorted((params or {}).items())))

    def get(self, key: tuple) -> tuple[ScoreResult, str] | None:
        with self._lock:
            return self._scores.get(key)

    def put(self, key: tuple, result: ScoreResult, run_id: str) -> None:
        with self._lock:
            self._scores[key] = (result, run_id)

    def forget_run(self, run_id: str) -> None:
        with self._lock:
            for key in [k for k, (_r, rid) in self._scores.items() if rid == run_id]:
                del self._scores[key]
