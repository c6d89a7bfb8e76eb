"""A user's text file is split into disjoint calibration / evaluation parts: no window of one ever
shares text with a window of the other (issue 10 §1)."""
from __future__ import annotations

import json
import random

import pytest
import torch

from core.data import text as data
from core.errors import DataError

WORDS = ("river", "stone", "market", "winter", "lantern", "orchard", "copper", "harbour", "meadow", "signal",
         "thunder", "velvet", "garden", "ember", "falcon", "glacier", "island", "journey", "kettle", "ladder")


def random_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) + ("." if rng.random() < 0.1 else "") for _ in range(words))


def ngrams(windows: torch.Tensor, n: int = 12) -> set[tuple[int, ...]]:
    """Every run of ``n`` consecutive token ids inside the windows (N, T)."""
    return {tuple(row[i:i + n].tolist()) for row in windows for i in range(row.numel() - n + 1)}


def all_windows(tokenizer, source: str, split: str, seq_len: int) -> torch.Tensor:
    stream = data.token_stream(tokenizer, source, split)
    count = len(stream) // seq_len
    return stream[: count * seq_len].view(count, seq_len)


def assert_disjoint(tokenizer, source: str, seq_len: int = 32) -> None:
    """No evaluation window shares a 12-token run with any calibration window (scoring windows,
    the adaptive search's held-out slice, or any other window the calibration part can give)."""
    from core.prune.adaptive import heldout_windows

    capacity = data.window_capacity(tokenizer, source, "calibration", seq_len)
    scoring = data.calibration_windows(tokenizer, source, capacity // 2, seq_len, seed=3)
    held = heldout_windows(tokenizer, source, 2, seq_len, seed=3, score_samples=capacity // 2, score_seq_len=seq_len)
    evaluation = data.evaluation_windows(tokenizer, source, data.window_capacity(tokenizer, source, "evaluation",
                                                                                  seq_len), seq_len)
    assert evaluation.shape[0] >= 2
    seen = ngrams(evaluation)
    for windows in (scoring, held, all_windows(tokenizer, source, "calibration", seq_len)):
        assert seen.isdisjoint(ngrams(windows))


def test_jsonl_is_split_by_document(tmp_path, real_tokenizer):
    rng = random.Random(0)
    docs = [f"Document {i}. " + random_text(rng, 120) for i in range(20)]
    path = tmp_path / "notes.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    split = data.split_text_file(path)
    assert split.how == "document" and split.documents == 20
    assert list(split.evaluation) == docs[3::4] and len(split.calibration) == 15
    assert set(split.calibration).isdisjoint(split.evaluation)
    assert data.documents(str(path), "evaluation") == docs[3::4]
    assert "split by document: 15 documents" in data.describe_source(str(path))
    assert_disjoint(real_tokenizer, str(path))


def test_blank_line_separated_txt_is_split_by_document(tmp_path, real_tokenizer):
    rng = random.Random(1)
    docs = [random_text(rng, 90) for _ in range(8)]
    path = tmp_path / "essay.txt"
    path.write_text("\n\n".join(docs))
    split = data.split_text_file(path)
    assert split.how == "document" and list(split.evaluation) == [docs[3], docs[7]]
    assert_disjoint(real_tokenizer, str(path))


def test_one_long_document_is_split_by_position(tmp_path, real_tokenizer):
    rng = random.Random(2)
    text = random_text(rng, 1500)
    path = tmp_path / "book.txt"
    path.write_text(text)
    split = data.split_text_file(path)
    assert split.how == "position" and len(split.calibration) == len(split.evaluation) == 1
    cal, ev = split.calibration[0], split.evaluation[0]
    assert text.startswith(cal) and text.endswith(ev) and len(cal) + len(ev) <= len(text)
    assert 0.2 < len(ev) / len(text) < 0.3  # the last quarter, cut at a word boundary
    assert text[len(cal)].isspace()
    assert data.split_text_file(path) == split  # deterministic
    assert "split by position (1 document, too few to split by document)" in data.describe_source(str(path))
    assert_disjoint(real_tokenizer, str(path))


def test_uneven_documents_fall_back_to_position(tmp_path):
    rng = random.Random(3)
    docs = ["tiny one", "tiny two", "tiny three", "tiny four", random_text(rng, 600)]  # the held-out 4th is tiny
    path = tmp_path / "uneven.txt"
    path.write_text("\n\n".join(docs))
    split = data.split_text_file(path)
    assert split.how == "position" and "too uneven" in split.describe()


def test_too_short_file_is_refused_with_one_sentence(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("A short note that cannot be split fairly. " * 20)
    with pytest.raises(DataError) as info:
        data.split_text_file(path)
    message = str(info.value)
    assert ". " not in message and message.endswith("needed.")  # one sentence
    assert "short.txt is too short to split into calibration and held-out evaluation text" in message
    store = tmp_path / "store"
    with pytest.raises(DataError, match="too short to split"):
        data.store_text_file(path, store)
    assert not store.exists() or not any(store.iterdir())  # nothing stored


def test_cli_data_says_how_a_file_is_split(tmp_path):
    from conftest import run_cli

    rng = random.Random(4)
    path = tmp_path / "notes.jsonl"
    path.write_text("\n".join(json.dumps({"text": random_text(rng, 100)}) for _ in range(12)) + "\n")
    done = run_cli("data", "--source", str(path), "--seq-len", "32", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["how"] == "document" and (out["calibration_documents"], out["evaluation_documents"]) == (9, 3)
    assert "split by document" in out["split"] and out["evaluation_windows"] >= 1
    assert out["calibration_tokens"] > 2 * out["evaluation_tokens"]
    short = tmp_path / "short.txt"
    short.write_text("too short to split " * 10)
    done = run_cli("data", "--source", str(short))
    assert done.returncode == 2 and "too short to split" in done.stderr and not done.stdout
