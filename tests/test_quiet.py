"""A command that does not quantize leaves the terminal free of third-party noise (issue 9 §5)."""
from __future__ import annotations

import json

from conftest import make_tiny, run_cli

NOISE = ("Failed to load", "_pytree", "register_constant", "Loading weights")


def test_eval_prints_its_result_and_nothing_from_torchao_or_torch(tmp_path, real_tokenizer):
    folder = tmp_path / "tiny"
    make_tiny("llama").save_pretrained(folder)
    real_tokenizer.save_pretrained(folder)
    run = run_cli("eval", "--model", str(folder), "--windows", "1", "--seq-len", "16", "--json", fresh=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["windows"] == 1
    assert not [line for line in run.stderr.splitlines() if any(n in line for n in NOISE)], run.stderr
