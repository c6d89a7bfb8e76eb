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


def test_the_engine_used_as_a_library_is_quiet_too(tmp_path):
    """A user's script that imports the engine, loads a model folder, scores and prunes it: no torchao
    kernel-load lines and no torch._pytree notices on its terminal."""
    import subprocess
    import sys

    from conftest import ROOT

    folder = tmp_path / "tiny"
    make_tiny("llama").save_pretrained(folder)
    from core.models.loading import load_tokenizer

    load_tokenizer("smollm2-135m").save_pretrained(folder)
    script = tmp_path / "user.py"
    script.write_text(
        "from core.methods import prune_with_scores, score_model\n"
        "from core.models import load_model\n"
        f"loaded = load_model({str(folder)!r})\n"
        "result = score_model(loaded, 'entropy', samples=2, seq_len=16, progress=False)\n"
        "pruned = prune_with_scores(loaded, result, 0.25)\n"
        "print('widths', sorted(set(pruned.widths)))\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "widths [48]"
    # transformers' own "Loading weights" bar is the library's to show; torchao's and torch's notices are not
    assert not [line for line in run.stderr.splitlines() if any(n in line for n in NOISE[:3])], run.stderr
