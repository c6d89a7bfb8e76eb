"""Calibration and evaluation text, and fixed-length token windows.

Built-in sources (no network): ``wiki`` — the English Wikipedia excerpt shipped in the gensim
wheel, cleaned and split *by article* into disjoint calibration / evaluation sets; ``news`` — the
300 Lee news paragraphs shipped with gensim (split by paragraph). A path to a .txt or .jsonl file
(``text`` field per line) is split deterministically into disjoint calibration and evaluation parts
(:func:`split_text_file`: by document when it has enough documents, else by position), so nothing is
ever evaluated on the text it was calibrated on.
"""
from __future__ import annotations

import bz2
import functools
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import DataError
from core.files import write_bytes, write_json
from core.options import Options, knob
from core.paths import data_dir

BUILTIN_SOURCES = ("wiki", "news")
SPLITS = ("calibration", "evaluation")
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
MAX_UPLOAD_BYTES = 50 * 1024 * 1024


@dataclass
class TextSource(Options):
    """Windows of ``seq_len`` tokens from the calibration split of ``source`` (never its evaluation split):
    the base of every group that reads such text. :class:`TextWindows` adds which windows are drawn (a
    scoring pass, the stability draws, an encoder's text windows); :class:`TrainingText` adds the held-out
    slice that training (recovery, DDP) leaves out. A group whose method wants another default gives it
    with ``core.options.knob_like``; the help and range stay these."""

    error = DataError

    source: str = knob("wiki", "calibration text: wiki, news, or a .txt/.jsonl path")
    seq_len: int = knob(128, "tokens per window", low=8, ui_low=16, ui_high=1024, step=16)


@dataclass
class TextWindows(TextSource):
    """A calibration draw: ``samples`` windows of ``seq_len`` tokens from the calibration split of
    ``source``, chosen by ``seed`` (:func:`calibration_windows`)."""

    samples: int = knob(16, "calibration windows", low=1, ui_high=256)
    seed: int = knob(0, "which calibration windows are drawn", low=0)


@dataclass
class CalibrationOptions(TextWindows):
    """Which calibration windows a scoring (or compensation, or training) pass reads: ``samples``
    windows of ``seq_len`` tokens from the calibration split of ``source``, drawn by ``seed``, run
    ``batch_size`` at a time. Recorded with every score / prune run (``ScoreResult.config``)."""

    batch_size: int = knob(4, "windows per forward/backward pass", low=1, ui_high=32)


@dataclass
class HeldoutWindows(Options):
    """A held-out slice of the calibration split: ``heldout_windows`` windows of ``heldout_seq_len``
    tokens that training never reads; the KL curve of a training run is measured on them (0: none)."""

    error = DataError

    heldout_windows: int = knob(8, "held-out calibration windows for the KL curve", low=0, ui_high=64)
    heldout_seq_len: int = knob(128, "tokens per held-out window", low=8, ui_high=1024, step=8)


@dataclass
class TrainingText(HeldoutWindows, TextSource):
    """Training text (recovery, DDP): every window of ``seq_len`` tokens of the calibration split of
    ``source`` that does not touch the held-out slice (:func:`training_windows`)."""

    def windows(self, tokenizer, seed: int, *, max_length: int | None = None,
                min_windows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(training windows (N, seq_len), held-out windows (heldout_windows, heldout_seq_len))."""
        return training_windows(tokenizer, self.source, self.seq_len, heldout=self.heldout_windows,
                                heldout_seq_len=self.heldout_seq_len, seed=seed, max_length=max_length,
                                min_windows=min_windows)


_CLEAN_VERSION = 1


def _gensim_test_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise DataError("The built-in corpora need the 'gensim' package (pip install gensim==4.4.0).")
    return Path(spec.origin).parent / "test" / "test_data"


_MARKUP_LINE = re.compile(r"^\s*(\||\{|\}|!|=|\[\[|<|thumb\b)")


def clean_wiki_text(raw: str) -> str:
    """Wiki markup → plain paragraphs: gensim's filter_wiki, then drop headings/table/markup lines."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(raw)
    kept = []
    for line in text.splitlines():
        line = line.replace("'''", "").replace("''", "").strip()
        line = re.sub(r"\s+([,.;:)])", r"\1", re.sub(r"\(\s*[,;]?\s*\)", "", line))
        line = re.sub(r"\s{2,}", " ", line)
        if not line or _MARKUP_LINE.match(line) or len(line.split()) < 6:
            continue
        kept.append(line)
    return "\n".join(kept)


def _is_evaluation_article(title: str) -> bool:
    """Fixed, seed-independent split: one article in four (by title hash) is held out for evaluation."""
    return int(hashlib.md5(title.encode("utf-8")).hexdigest(), 16) % 4 == 0


@functools.lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str, str], ...]:
    """All cleaned articles as (title, split, text), cached as JSON under the data cache."""
    cache = data_dir() / f"wiki_clean_v{_CLEAN_VERSION}.json"
    if cache.exists():
        return tuple(tuple(row) for row in json.loads(cache.read_text()))
    from gensim.corpora.wikicorpus import extract_pages

    source = _gensim_test_data() / WIKI_FILE
    if not source.exists():
        raise DataError(f"The Wikipedia excerpt is missing from gensim ({source}).")
    rows = []
    with bz2.BZ2File(source) as handle:
        for title, raw, _pageid in extract_pages(handle):
            if raw.lstrip().lower().startswith("#redirect"):
                continue
            text = clean_wiki_text(raw)
            if len(text) < 500:
                continue
            rows.append((title, "evaluation" if _is_evaluation_article(title) else "calibration", text))
    rows.sort(key=lambda row: row[0])
    write_json(cache, rows, indent=None)
    return tuple(rows)


def news_paragraphs() -> list[str]:
    path = _gensim_test_data() / NEWS_FILE
    if not path.exists():
        raise DataError(f"The news paragraphs are missing from gensim ({path}).")
    return [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


def read_text_file(path: str | os.PathLike) -> list[str]:
    """User text: a .txt (blank-line separated documents) or .jsonl with a ``text`` field per line."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"Text file not found: {path}.")
    size = file.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise DataError(f"Text file {file.name} is {size / 2**20:.0f} MiB; the limit is "
                        f"{MAX_UPLOAD_BYTES // 2**20} MiB.")
    try:
        content = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"Text file {file.name} is not UTF-8 text.") from exc
    if file.suffix.lower() == ".jsonl":
        docs = []
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{file.name} line {number} is not valid JSON.") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{file.name} line {number} has no string 'text' field.")
            docs.append(record["text"])
    elif file.suffix.lower() in (".txt", ".md", ".text", ""):
        docs = [block.strip() for block in re.split(r"\n\s*\n", content)]
    else:
        raise DataError(f"Unsupported text file type '{file.suffix}'; use .txt or .jsonl.")
    docs = [doc for doc in docs if doc.strip()]
    if not docs:
        raise DataError(f"Text file {file.name} contains no text.")
    return docs


def store_text_file(path: str | os.PathLike, folder: str | os.PathLike) -> tuple[Path, str]:
    """Validate a user text file (:func:`read_text_file`: not empty, not too large, UTF-8, valid
    JSONL) and copy it into ``folder`` named by its content hash, atomically; a file already stored
    is reused. Returns (stored path, 16-hex-digit SHA-256 prefix)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"Text file not found: {path}.")
    if file.stat().st_size == 0:
        raise DataError(f"The text file {file.name} is empty.")
    split_documents(read_text_file(file), f"The text file {file.name}")  # bad/empty/too short: a DataError
    content = file.read_bytes()
    digest = hashlib.sha256(content).hexdigest()[:16]
    target_dir = Path(folder)
    target_dir.mkdir(parents=True, exist_ok=True)
    stored = target_dir / f"{digest}{file.suffix.lower() or '.txt'}"
    if not stored.exists():
        write_bytes(stored, content)
    return stored, digest


HELD_OUT_EVERY = 4  # one document in four (or the last quarter of a file's text) is held out for evaluation
MIN_PART_CHARS = 400  # each part of a split user file holds at least this many characters (~90 tokens)


@dataclass(frozen=True)
class TextSplit:
    """A user file cut into disjoint calibration / evaluation documents, and how it was cut.

    ``how``: "document" (every ``HELD_OUT_EVERY``-th document held out) or "position" (the text's
    last 1/``HELD_OUT_EVERY`` held out, cut at a word boundary)."""

    how: str
    calibration: tuple[str, ...]
    evaluation: tuple[str, ...]
    documents: int  # documents in the file

    def describe(self) -> str:
        """One sentence for a user: how the file was split and how much each part holds."""
        cal, ev = sum(map(len, self.calibration)), sum(map(len, self.evaluation))
        if self.how == "document":
            return (f"split by document: {len(self.calibration)} documents ({cal:,} characters) calibrate, "
                    f"{len(self.evaluation)} (every {HELD_OUT_EVERY}th) are held out for evaluation "
                    f"({ev:,} characters)")
        why = "too few" if self.documents < HELD_OUT_EVERY else "too uneven"
        return (f"split by position ({self.documents} document{'s' if self.documents != 1 else ''}, {why} to split "
                f"by document): the first {cal:,} characters calibrate, the last {ev:,} (about "
                f"1/{HELD_OUT_EVERY}) are held out for evaluation")


def split_documents(docs: list[str], name: str = "the text") -> TextSplit:
    """Deterministic disjoint split of ``docs``: by document when there are at least
    ``HELD_OUT_EVERY`` and both parts reach ``MIN_PART_CHARS``, else by position (the last quarter of
    the joined text, cut at whitespace). Too little text for two parts is a DataError."""
    if len(docs) >= HELD_OUT_EVERY:
        held = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
        kept = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
        if min(sum(map(len, held)), sum(map(len, kept))) >= MIN_PART_CHARS:
            return TextSplit("document", tuple(kept), tuple(held), len(docs))
    text = "\n\n".join(docs)
    needed = HELD_OUT_EVERY * MIN_PART_CHARS
    if len(text) < needed:
        raise DataError(f"{name} is too short to split into calibration and held-out evaluation text: it has "
                        f"{len(text):,} characters and at least {needed:,} are needed.")
    cut = len(text) - len(text) // HELD_OUT_EVERY
    boundary = re.search(r"\s", text[cut:])  # the first whitespace at or after the cut keeps words whole
    cut += boundary.start() if boundary else 0
    calibration, evaluation = text[:cut].strip(), text[cut:].strip()
    if min(len(calibration), len(evaluation)) < MIN_PART_CHARS:
        raise DataError(f"{name} is too short to split into calibration and held-out evaluation text: its last "
                        f"quarter has no word boundary that leaves {MIN_PART_CHARS} characters on each side.")
    return TextSplit("position", (calibration,), (evaluation,), len(docs))


@functools.lru_cache(maxsize=8)
def _split_file(path: str, mtime: float, size: int) -> TextSplit:
    return split_documents(read_text_file(path), f"The text file {Path(path).name}")


def split_text_file(path: str | os.PathLike) -> TextSplit:
    """The calibration / evaluation split of a .txt or .jsonl file (:func:`split_documents`)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"Text file not found: {path}.")
    stat = file.stat()
    return _split_file(str(file), stat.st_mtime, stat.st_size)


def describe_source(source: str, name: str | None = None) -> str:
    """How a source's calibration and evaluation text are kept apart, in one phrase; a file is called
    ``name`` when given (the name its user gave it, not the name it is stored under)."""
    if source == "wiki":
        return "Wikipedia excerpt, split by article: one article in four (by title hash) is held out for evaluation"
    if source == "news":
        return "news paragraphs, split by paragraph: every 4th paragraph is held out for evaluation"
    return f"{name or Path(source).name}, {split_text_file(source).describe()}"


def upload_rule() -> str:
    """What a user's text file must hold, in one sentence (the checks :func:`store_text_file` and
    :func:`split_documents` make)."""
    return (f"A .txt (documents separated by blank lines) or .jsonl (a \"text\" field per line), UTF-8, at most "
            f"{MAX_UPLOAD_BYTES // 2**20} MiB and at least {HELD_OUT_EVERY * MIN_PART_CHARS:,} characters: one "
            f"document in {HELD_OUT_EVERY} (or the last quarter of one long text) is held out for evaluation and "
            f"each part needs {MIN_PART_CHARS} characters; the calibration part must also hold the windows × tokens "
            "per window chosen below.")


def documents(source: str, split: str) -> list[str]:
    """The documents of a source for one role (``calibration`` or ``evaluation``); the two never share text."""
    if split not in SPLITS:
        raise DataError(f"Unknown split '{split}'; use one of {SPLITS}.")
    if source == "wiki":
        return [text for _title, part, text in wiki_articles() if part == split]
    if source == "news":
        paragraphs = news_paragraphs()
        return [p for i, p in enumerate(paragraphs) if (i % 4 == 3) == (split == "evaluation")]
    parts = split_text_file(source)
    return list(parts.calibration if split == "calibration" else parts.evaluation)


def _tokenizer_key(tokenizer) -> str:
    return f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}"


_TOKEN_CACHE: dict[tuple[str, str, str, float], torch.Tensor] = {}


def token_stream(tokenizer, source: str, split: str) -> torch.Tensor:
    """All documents tokenised and joined with the EOS token: 1-D LongTensor of token ids."""
    mtime = os.path.getmtime(source) if os.path.isfile(source) else 0.0
    key = (_tokenizer_key(tokenizer), source, split, mtime)
    if key not in _TOKEN_CACHE:
        docs = documents(source, split)
        eos = tokenizer.eos_token_id
        ids: list[int] = []
        for encoded in tokenizer(docs, add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
            if eos is not None:
                ids.append(eos)
        if len(_TOKEN_CACHE) > 16:
            _TOKEN_CACHE.clear()
        _TOKEN_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    return _TOKEN_CACHE[key]


def _check_lengths(count: int, seq_len: int, max_length: int | None, what: str) -> None:
    if count < 1:
        raise DataError(f"The number of {what} must be at least 1 (got {count}).")
    if seq_len < 8:
        raise DataError(f"Sequence length must be at least 8 tokens (got {seq_len}).")
    if max_length is not None and seq_len > max_length:
        raise DataError(f"Sequence length {seq_len} is longer than the model allows ({max_length} tokens).")


def calibration_windows(tokenizer, source: str = TextWindows.source, samples: int = TextWindows.samples,
                        seq_len: int = TextWindows.seq_len, seed: int = TextWindows.seed,
                        max_length: int | None = None) -> torch.Tensor:
    """``samples`` non-overlapping windows of ``seq_len`` tokens from the calibration split,
    chosen at random by ``seed`` (deterministic). Returns LongTensor (samples, seq_len)."""
    _check_lengths(samples, seq_len, max_length, "calibration samples")
    stream = token_stream(tokenizer, source, "calibration")
    bos, body = window_body(tokenizer, seq_len)  # text tokens per window; the BOS token (if any) comes first
    available = len(stream) // body
    if available < samples:
        raise DataError(f"The calibration text has {len(stream)} tokens: enough for {available} windows of "
                        f"{seq_len}, but {samples} were asked for.")
    starts = calibration_starts(len(stream), samples, body, seed)
    return with_bos(torch.stack([stream[s:s + body] for s in starts]), bos)


def calibration_starts(stream_tokens: int, samples: int, body: int, seed: int) -> list[int]:
    """Sorted start offsets of the ``samples`` windows of ``body`` text tokens that ``seed`` draws."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randperm(stream_tokens // body, generator=generator)[:samples].sort().values * body).tolist()


def disjoint_calibration_windows(tokenizer, source: str = TextWindows.source, draws: int = 2,
                                 samples: int = TextWindows.samples, seq_len: int = TextWindows.seq_len,
                                 seed: int = TextWindows.seed, max_length: int | None = None) -> list[torch.Tensor]:
    """``draws`` sets of ``samples`` calibration windows, no window in two sets: the random order of
    the split's window slots that ``seed`` gives, cut into consecutive groups (each sorted). Draw 0
    is exactly :func:`calibration_windows` with the same seed. Returns ``draws`` × (samples, seq_len)."""
    _check_lengths(samples, seq_len, max_length, "calibration samples")
    stream = token_stream(tokenizer, source, "calibration")
    bos, body = window_body(tokenizer, seq_len)
    available = len(stream) // body
    if available < draws * samples:
        raise DataError(f"The calibration text has room for {available} windows of {seq_len} tokens, but "
                        f"{draws} disjoint draws of {samples} need {draws * samples}.")
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))  # same as calibration_starts
    return [with_bos(torch.stack([stream[s:s + body] for s in (order[k * samples:(k + 1) * samples].sort().values
                                                               * body).tolist()]), bos) for k in range(draws)]


def evaluation_windows(tokenizer, source: str = "wiki", windows: int = 8, seq_len: int = 128,
                       max_length: int | None = None) -> torch.Tensor:
    """The first ``windows`` non-overlapping windows of the evaluation split: (windows, seq_len)."""
    _check_lengths(windows, seq_len, max_length, "evaluation windows")
    stream = token_stream(tokenizer, source, "evaluation")
    bos, body = window_body(tokenizer, seq_len)
    available = len(stream) // body
    if available < windows:
        raise DataError(f"The evaluation text has {len(stream)} tokens: enough for {available} windows of "
                        f"{seq_len}, but {windows} were asked for.")
    return with_bos(stream[: windows * body].view(windows, body).clone(), bos)


def window_capacity(tokenizer, source: str, split: str, seq_len: int) -> int:
    """How many non-overlapping windows of ``seq_len`` tokens the ``split`` of ``source`` holds."""
    return len(token_stream(tokenizer, source, split)) // window_body(tokenizer, seq_len)[1]


def bos_token(tokenizer) -> int | None:
    """The BOS id if the tokenizer puts one in front of every text by default (Gemma, Llama-2/3), else
    None (SmolLM2, Qwen). Models trained that way degrade badly on windows that lack it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def window_body(tokenizer, seq_len: int) -> tuple[int | None, int]:
    """(BOS id or None, text tokens per window of ``seq_len``)."""
    bos = bos_token(tokenizer)
    return bos, seq_len - (bos is not None)


def with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """(N, T−1) → (N, T) with ``bos`` in front, or the windows unchanged when bos is None."""
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def training_windows(tokenizer, source: str = TrainingText.source, seq_len: int = TrainingText.seq_len, *,
                     heldout: int = TrainingText.heldout_windows, heldout_seq_len: int = TrainingText.heldout_seq_len,
                     seed: int = 0, max_length: int | None = None,
                     min_windows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Training text for recovery, from the *calibration* split only (never the evaluation split):
    ``heldout`` windows of ``heldout_seq_len`` drawn at random by ``seed``, and every non-overlapping
    window of ``seq_len`` that does not touch them. Returns (train (N, seq_len), held-out
    (heldout, heldout_seq_len)); fewer than ``min_windows`` training windows is a DataError."""
    _check_lengths(max(1, heldout), heldout_seq_len, max_length, "held-out windows")
    _check_lengths(min_windows, seq_len, max_length, "training windows")
    stream = token_stream(tokenizer, source, "calibration")
    bos, held_body = window_body(tokenizer, heldout_seq_len)
    used = torch.zeros(len(stream), dtype=torch.bool)
    held = stream.new_zeros((0, held_body))
    if heldout > 0:
        slots = len(stream) // held_body
        if slots < heldout + 1:
            raise DataError(f"The calibration text has {len(stream)} tokens: too few for {heldout} held-out windows "
                            f"of {heldout_seq_len} and any training text.")
        generator = torch.Generator().manual_seed(seed + 7_919)
        picks = torch.randperm(slots, generator=generator)[:heldout].sort().values.tolist()
        held = torch.stack([stream[i * held_body:(i + 1) * held_body] for i in picks])
        for i in picks:
            used[i * held_body:(i + 1) * held_body] = True
    _bos, body = window_body(tokenizer, seq_len)
    starts = [s for s in range(0, len(stream) - body + 1, body) if not used[s:s + body].any()]
    if len(starts) < min_windows:
        raise DataError(f"The calibration text leaves {len(starts)} training windows of {seq_len} tokens outside the "
                        f"held-out slice; at least {min_windows} are needed (use more text, a shorter sequence or a "
                        "smaller batch).")
    train = torch.stack([stream[s:s + body] for s in starts]) if starts else stream.new_zeros((0, body))
    return with_bos(train, bos), with_bos(held, bos)
