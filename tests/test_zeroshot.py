"""Shipped zero-shot tasks (built only from evaluation articles, deterministic, ≥ 500 items), their
offline loading through lm-eval from any directory, zero-shot end to end, and bad task names."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import make_tiny

from core.measure.zeroshot import ZeroShotError, check_tasks, run_zeroshot, task_manager, write_task_dir
from core.measure.zeroshot_tasks import ASSETS, CHOICE_TASK, CLOZE_TASK, SHIPPED_TASKS, check_assets


def _items(name: str) -> list[dict]:
    return [json.loads(line) for line in (ASSETS / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from core.models.loading import ensure_embedded

    tok = AutoTokenizer.from_pretrained(str(ensure_embedded("smollm2-135m")))
    tok.pad_token = tok.eos_token
    return tok


def test_shipped_files_exist_with_attribution():
    for name in SHIPPED_TASKS:
        assert (ASSETS / f"{name}.jsonl").is_file() and (ASSETS / f"{name}.yaml").is_file()
    attribution = (ASSETS / "ATTRIBUTION.md").read_text()
    assert "CC BY-SA 3.0" in attribution and "Wikipedia" in attribution


def test_tasks_are_deterministic_and_built_only_from_evaluation_articles():
    from core.data.text import wiki_articles

    assert check_assets() == []  # a fresh build is byte-identical to the shipped files
    split = {title: part for title, part, _text in wiki_articles()}
    text = {title: body for title, _part, body in wiki_articles()}
    cloze, choice = _items(CLOZE_TASK), _items(CHOICE_TASK)
    assert len(cloze) >= 500 and len(choice) >= 500
    assert len({i["id"] for i in cloze}) == len(cloze) and len({i["id"] for i in choice}) == len(choice)
    assert {split[i["article"]] for i in cloze + choice} == {"evaluation"}
    assert len({i["article"] for i in cloze}) >= 10  # spread over many articles
    for item in cloze[:200]:
        target = item["target"]
        assert target.startswith(" ") and target.strip().isalpha()
        assert target.strip().lower() in item["context"].lower()  # LAMBADA: the word occurred before
        assert item["context"].split()[-1] in text[item["article"]]
    labels = [i["label"] for i in choice]
    assert set(labels) == {0, 1, 2, 3} and max(labels.count(k) for k in range(4)) < 0.4 * len(labels)
    for item in choice[:200]:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert item["choices"][item["label"]] in text[item["article"]]
        others = [c for k, c in enumerate(item["choices"]) if k != item["label"]]
        assert all(c not in text[item["article"]] for c in others)  # distractors from other articles
        assert all(any(c in text[t] for t in text if split[t] == "evaluation") for c in others)


def test_shipped_tasks_load_offline_through_lm_eval_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data_files must not depend on the working directory
    manager, include = task_manager(list(SHIPPED_TASKS))
    try:
        from lm_eval.tasks import get_task_dict

        tasks = get_task_dict(list(SHIPPED_TASKS), manager)
        for name in SHIPPED_TASKS:
            docs = list(tasks[name].test_docs())
            assert len(docs) == len(_items(name))
        cloze = tasks[CLOZE_TASK]
        first = list(cloze.test_docs())[0]
        assert cloze.doc_to_text(first) == _items(CLOZE_TASK)[0]["context"]
        choice = tasks[CHOICE_TASK]
        doc = list(choice.test_docs())[0]
        assert choice.doc_to_choice(doc) == _items(CHOICE_TASK)[0]["choices"]
        assert choice.doc_to_target(doc) == _items(CHOICE_TASK)[0]["label"]
    finally:
        shutil.rmtree(include, ignore_errors=True)
    yaml_dir = write_task_dir(folder=tmp_path / "yamls")
    assert str(ASSETS) in (yaml_dir / f"{CLOZE_TASK}.yaml").read_text()


def test_zeroshot_end_to_end_on_a_tiny_model(tokenizer):
    model = make_tiny("llama")
    result = run_zeroshot(model, tokenizer, limit=4, batch_size=4, progress=False)
    cloze, choice = result["tasks"][CLOZE_TASK], result["tasks"][CHOICE_TASK]
    assert cloze["n"] == 4 and choice["n"] == 4
    assert 0.0 <= cloze["acc"] <= 1.0 and "acc_norm" not in cloze
    assert 0.0 <= choice["acc"] <= 1.0 and 0.0 <= choice["acc_norm"] <= 1.0 and choice["chance"] == 0.25
    assert result["lm_eval_version"].startswith("0.4") and result["device"] == "cpu"


def test_bad_task_names_are_clear_errors():
    with pytest.raises(ZeroShotError, match="Unknown zero-shot task 'no_such_task'"):
        check_tasks(["no_such_task"])
    with pytest.raises(ZeroShotError, match="needs its dataset from the Hugging Face Hub"):
        check_tasks(["boolq"])  # tests run with HF_HUB_OFFLINE=1
    with pytest.raises(ZeroShotError, match="No zero-shot task"):
        check_tasks([" "])
    with pytest.raises(ZeroShotError, match="at least 1"):
        run_zeroshot(make_tiny("llama"), None, limit=0)


def test_cli_zeroshot_bad_task_writes_nothing(tmp_path, capsys, monkeypatch):
    from core.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["zeroshot", "--model", "smollm2-135m", "--tasks", "wiki_cloze,nonsense", "--limit", "2"]) == 2
    assert "Unknown zero-shot task 'nonsense'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.real
def test_dense_embedded_model_scores_clearly_above_chance(real):
    result = run_zeroshot(real.model, real.tokenizer, limit=24, batch_size=8, progress=False)
    choice, cloze = result["tasks"][CHOICE_TASK], result["tasks"][CLOZE_TASK]
    assert choice["acc"] >= 0.45 and choice["acc_norm"] >= 0.45  # chance is 0.25
    assert cloze["acc"] >= 0.25  # a random tiny model scores 0 here
