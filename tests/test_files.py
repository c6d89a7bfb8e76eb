"""core.files: atomic writes leave nothing half-written; per-layer tensor files read old and new files."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from core.files import (
    atomic_file,
    atomic_folder,
    read_layer_tensors,
    write_bytes,
    write_json,
    write_layer_tensors,
    write_text,
)
from core.methods.oneshot import ScoreResult
from core.runs import RunStore


def test_atomic_writes_replace_whole_files_and_leave_no_partial(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"x": 1})
    write_text(tmp_path / "b.txt", "hello")
    write_bytes(tmp_path / "c.bin", b"\x00\x01")
    assert json.loads(target.read_text()) == {"x": 1}
    assert (tmp_path / "b.txt").read_text() == "hello" and (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"x": 1}  # the old content survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.txt", "c.bin"]


def test_atomic_folder_cleans_up_on_error_and_keeps_a_race_winner(tmp_path):
    with pytest.raises(ValueError):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
            raise ValueError
    assert list(tmp_path.iterdir()) == []
    winner = tmp_path / "model"
    with atomic_folder(winner, keep_existing=True) as tmp:
        (tmp / "mine").write_text("late")
        winner.mkdir()
        (winner / "theirs").write_text("first")
    assert [p.name for p in winner.iterdir()] == ["theirs"] and len(list(tmp_path.iterdir())) == 1


def test_layer_tensor_files_round_trip_in_layer_order(tmp_path):
    tensors = [torch.arange(n, dtype=torch.float32) for n in (3, 5, 4)]
    write_layer_tensors(tmp_path / "s.safetensors", tensors, {"k": "v"})
    back, meta = read_layer_tensors(tmp_path / "s.safetensors")
    assert [t.tolist() for t in back] == [t.tolist() for t in tensors] and meta == {"k": "v"}


def test_files_written_the_old_way_still_load(tmp_path):
    """Score files and runs written before core.files existed (save_file by hand) load unchanged."""
    scores = [torch.rand(6), torch.rand(6)]
    old = tmp_path / "old.safetensors"
    config = {"criterion": "entropy", "samples": 4, "seq_len": 32, "tokens": 128}
    save_file({f"layer_{i:03d}": s for i, s in enumerate(scores)}, str(old),
              metadata={"config": json.dumps(config), "seconds": "1.5"})
    loaded = ScoreResult.load(old)
    assert loaded.config == config and loaded.seconds == 1.5
    assert all(torch.equal(a, b) for a, b in zip(loaded.scores, scores))

    run_dir = tmp_path / "runs" / "20260101-000000-score-abcdef"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"kind": "score", "run_id": run_dir.name, **config}, indent=2))
    (run_dir / "results.json").write_text(json.dumps({"seconds": 1.5}, indent=2))
    save_file({f"layer_{i:03d}": s for i, s in enumerate(scores)}, str(run_dir / "scores.safetensors"),
              metadata={"run_id": run_dir.name})
    run = RunStore(tmp_path / "runs").load(run_dir.name)
    assert all(torch.equal(a, b) for a, b in zip(run.scores(), scores))
