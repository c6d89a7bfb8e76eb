"""The CLI contract: score / prune / eval on a local model folder; bad input exits non-zero, writes nothing."""
import json

import pytest

from conftest import make_tiny
from conftest import run_cli as cli


@pytest.fixture(scope="module")
def folder(tmp_path_factory, real_tokenizer):
    path = tmp_path_factory.mktemp("cli") / "tiny-llama"
    make_tiny("llama", intermediate_size=32).save_pretrained(path)
    real_tokenizer.save_pretrained(path)
    return path


def test_score_prune_eval_round_trip(folder, tmp_path):
    scores = tmp_path / "scores.safetensors"
    run = cli("score", "--model", str(folder), "--criterion", "entropy", "--samples", "4", "--seq-len", "32",
              "--out", str(scores))
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["criterion"] == "entropy" and info["tokens"] == 128 and scores.exists()

    out = tmp_path / "pruned"
    run = cli("prune", "--model", str(folder), "--scores", str(scores), "--ratio", "0.25", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["intermediate_sizes"] == [24, 24]
    meta = json.loads((out / "pruning_meta.json").read_text())
    assert meta["criterion"] == "entropy" and meta["calibration"]["samples"] == 4

    run = cli("eval", "--model", str(out), "--reference", str(folder), "--windows", "2", "--seq-len", "32", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    for key in ("perplexity", "kl_to_reference", "top1_agreement", "params", "mlp_params"):
        assert key in result
    assert result["kl_to_reference"] > 0 and 0 <= result["top1_agreement"] <= 1
    assert result["mlp_params"] == 2 * 3 * 32 * 24

    run = cli("eval", "--model", str(folder), "--windows", "2", "--seq-len", "32", "--json")
    result = json.loads(run.stdout)
    assert result["kl_to_reference"] is None and result["top1_agreement"] is None and result["perplexity"] > 1


@pytest.mark.parametrize("args,message", [
    (["prune", "--ratio", "1.0"], "Ratio must be in [0, 1)"),
    (["prune", "--ratio", "0.999"], "leaves layer 0 with 0 of 32 neurons"),
    (["prune", "--ratio", "0.2", "--seq-len", "100000"], "longer than the model allows"),
    (["prune", "--ratio", "0.2", "--source", "/no/such/file.txt"], "Text file not found"),
    (["prune", "--ratio", "0.2", "--samples", "100000"], "were asked for"),
])
def test_bad_prune_input_writes_nothing(folder, tmp_path, args, message):
    out = tmp_path / "never"
    run = cli(*args, "--model", str(folder), "--out", str(out))
    assert run.returncode != 0
    assert message in run.stderr and run.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_model_and_existing_output(tmp_path):
    run = cli("eval", "--model", "nobody/no-such-model", "--json")
    assert run.returncode == 2 and "Hugging Face Hub could not provide it" in run.stderr
    existing = tmp_path / "s.safetensors"
    existing.write_text("keep")
    run = cli("score", "--model", "nobody/x", "--out", str(existing))
    assert run.returncode == 2 and "already exists" in run.stderr and existing.read_text() == "keep"
