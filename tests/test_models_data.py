"""Model resolution (alias, folder, .gguf, hub id) and calibration/evaluation data."""
import json
import zipfile

import pytest
import torch

from conftest import make_tiny

from core.data import text as data
from core.errors import DataError, ModelLoadError, UnsupportedArchitectureError
from core.models.loading import load_model


@pytest.fixture
def tiny_folder(tmp_path, real_tokenizer):
    """A local model folder built from a config (stands in for any hub download)."""
    model = make_tiny("qwen3")
    model.save_pretrained(tmp_path / "qwen3")
    real_tokenizer.save_pretrained(tmp_path / "qwen3")
    return tmp_path / "qwen3", model


def test_local_folder_loads_with_same_logits(tiny_folder):
    folder, model = tiny_folder
    loaded = load_model(str(folder))
    ids = torch.randint(0, 49152, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded.model.config.model_type == "qwen3" and not loaded.model.training


def test_unknown_hub_id_offline_is_one_clear_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not an embedded alias.*Hugging Face Hub could not provide it"):
        load_model("someone/does-not-exist-model")


@pytest.mark.parametrize("spec,message", [
    ("", "No model given"),
    ("./missing-folder", "Model folder not found"),
    ("missing.gguf", "GGUF file not found"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec)


def test_folder_without_config_and_corrupt_weights(tmp_path, tiny_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    folder, _ = tiny_folder
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="Could not load"):
        load_model(str(folder))
    plain = tmp_path / "notes.txt"
    plain.write_text("hi")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(plain))


def test_unsupported_architecture_names_supported_ones(tmp_path, real_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    real_tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported.*llama, mistral, qwen2, qwen3"):
        load_model(str(tmp_path / "gpt2"))


def test_wiki_split_is_by_article_and_disjoint():
    articles = data.wiki_articles()
    calib = {t for t, split, _ in articles if split == "calibration"}
    evals = {t for t, split, _ in articles if split == "evaluation"}
    assert len(articles) >= 90 and calib.isdisjoint(evals) and len(evals) >= 15
    assert sum(len(text) for *_, text in articles) > 2_000_000
    joined = "\n".join(data.documents("wiki", "evaluation"))
    assert "'''" not in joined and "{{" not in joined and "[[" not in joined


def test_windows_deterministic_by_seed_and_disjoint_from_eval(real_tokenizer):
    a = data.calibration_windows(real_tokenizer, "wiki", 8, 64, seed=0)
    b = data.calibration_windows(real_tokenizer, "wiki", 8, 64, seed=0)
    c = data.calibration_windows(real_tokenizer, "wiki", 8, 64, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    e = data.evaluation_windows(real_tokenizer, "wiki", 4, 64)
    assert e.shape == (4, 64) and torch.equal(e, data.evaluation_windows(real_tokenizer, "wiki", 4, 64))
    n = data.calibration_windows(real_tokenizer, "news", 4, 64)
    assert n.shape == (4, 64)


def test_user_files(tmp_path, real_tokenizer):
    txt = tmp_path / "a.txt"
    txt.write_text("First document here.\n\nSecond document " + "word " * 400)
    assert len(data.read_text_file(txt)) == 2
    w = data.calibration_windows(real_tokenizer, str(txt), 2, 32)
    assert w.shape == (2, 32)
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "hello " * 50}) + "\n" + json.dumps({"text": "world " * 50}) + "\n")
    assert data.read_text_file(jl) == ["hello " * 50, "world " * 50]


@pytest.mark.parametrize("content,suffix,message", [
    ("", ".txt", "contains no text"),
    ("   \n\n  ", ".txt", "contains no text"),
    ('{"nottext": 1}\n', ".jsonl", "no string 'text' field"),
    ("{broken\n", ".jsonl", "line 1 is not valid JSON"),
    ("a,b\n", ".csv", "Unsupported text file type"),
])
def test_bad_text_files(tmp_path, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        data.read_text_file(path)


def test_too_short_text_and_lengths(tmp_path, real_tokenizer):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here " * 80)
    with pytest.raises(DataError, match="has 302 tokens: enough for 4 windows of 64, but 40 were asked for"):
        data.calibration_windows(real_tokenizer, str(short), 40, 64)
    with pytest.raises(DataError, match="longer than the model allows"):
        data.calibration_windows(real_tokenizer, "wiki", 2, 4096, max_length=2048)
    with pytest.raises(DataError, match="at least 1"):
        data.evaluation_windows(real_tokenizer, "wiki", 0, 64)
    with pytest.raises(DataError, match="Text file not found"):
        data.calibration_windows(real_tokenizer, "/nonexistent/file.txt", 2, 64)


class _BosTokenizer:
    """The real SmolLM2 tokenizer, but one that puts a BOS token in front of every text by default
    (as Gemma's and Llama-3's do)."""

    def __init__(self, inner):
        self.inner, self.bos_token_id, self.eos_token_id = inner, inner.bos_token_id, inner.eos_token_id
        self.name_or_path = "bos-wrapper"

    def __len__(self):
        return len(self.inner)

    def __call__(self, text, add_special_tokens=True, **kwargs):
        out = self.inner(text, add_special_tokens=False, **kwargs)
        if add_special_tokens:
            ids = out["input_ids"]
            out["input_ids"] = [[self.bos_token_id, *x] for x in ids] if ids and isinstance(ids[0], list) \
                else [self.bos_token_id, *ids]
        return out


def test_windows_start_with_bos_when_the_tokenizer_adds_one(real_tokenizer):
    from core.prune.adaptive import heldout_windows

    assert data.bos_token(real_tokenizer) is None  # SmolLM2 adds no BOS: its windows are plain text
    plain = data.calibration_windows(real_tokenizer, "wiki", 4, 32, seed=0)
    assert not (plain[:, 0] == real_tokenizer.bos_token_id).all()

    tok = _BosTokenizer(real_tokenizer)
    bos = data.bos_token(tok)
    assert bos == real_tokenizer.bos_token_id
    cal = data.calibration_windows(tok, "wiki", 6, 32, seed=3)
    ev = data.evaluation_windows(tok, "wiki", 3, 32)
    for windows in (cal, ev):
        assert windows.shape[1] == 32 and (windows[:, 0] == bos).all()
        assert not (windows[:, 1:] == bos).any()  # one BOS per window, the rest is text
    stream = data.token_stream(tok, "wiki", "calibration")
    starts = data.calibration_starts(len(stream), 6, 31, 3)
    assert torch.equal(cal[:, 1:], torch.stack([stream[s:s + 31] for s in starts]))
    # the held-out slice of the adaptive search avoids the scoring windows' text, with BOS too
    held = heldout_windows(tok, "wiki", 4, 16, seed=3, score_samples=6, score_seq_len=32)
    assert held.shape == (4, 16) and (held[:, 0] == bos).all()
    used = {tuple(stream[s + i:s + i + 15].tolist()) for s in starts for i in range(31 - 14)}
    assert not any(tuple(h[1:].tolist()) in used for h in held)


def test_store_text_file_validates_and_names_by_content(tmp_path):
    from core.data.text import store_text_file
    from core.errors import DataError

    src = tmp_path / "notes.TXT"
    src.write_text("First document about pruning. " * 40 + "\n\nSecond document. " * 30)
    stored, digest = store_text_file(src, tmp_path / "store")
    assert stored.name == f"{digest}.txt" and stored.read_bytes() == src.read_bytes() and len(digest) == 16
    assert store_text_file(src, tmp_path / "store") == (stored, digest)  # the same content is stored once
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="bad.jsonl line 2 is not valid JSON"):
        store_text_file(bad, tmp_path / "store")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        store_text_file(empty, tmp_path / "store")
    short = tmp_path / "short.txt"
    short.write_text("Too short to hold out a fair evaluation part. " * 10)
    with pytest.raises(DataError, match="short.txt is too short to split .* 459 characters"):
        store_text_file(short, tmp_path / "store")
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [stored.name]


def test_zip_folder_keeps_one_top_folder(tmp_path):
    from core.export.hf import zip_folder

    folder = tmp_path / "my-variant"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "x.bin").write_bytes(b"\x00\x01")
    archive = zip_folder(folder, tmp_path / "out.zip")
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == ["my-variant/config.json", "my-variant/sub/x.bin"]
        assert zf.read("my-variant/sub/x.bin") == b"\x00\x01"
    assert not list(tmp_path.glob(".*partial"))
