"""Runs and exports written before the option groups existed still load: a score run and a prune run
laid out on disk exactly as the first release wrote them (config.json, results.json, per-layer
``layer_000`` safetensors, the old meta keys) are read back through the option groups."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from core.data.text import CalibrationOptions
from core.errors import DataError, PruneConfigError
from core.methods.oneshot import ScoreResult, apply_compensation
from core.models.slicing import pruned_view
from core.prune.allocate import AllocationOptions
from core.prune.compensate import CompensationOptions
from core.runs import RunStore

# What the first release wrote (core/pipeline.py and core/runs.py of 2026-11-27): no batch_size in an
# old score config, adaptive_min_keep missing from allocation_options, compensation as a bare dict.
OLD_SCORE_CONFIG = {"model": "tiny", "criterion": "entropy", "criterion_params": {}, "cost": "forward+backward",
                    "source": "wiki", "samples": 2, "seq_len": 16, "seed": 3, "tokens": 32,
                    "tool_version": "0.1.0", "kind": "score", "run_id": "20261127-120000-score-a1b2c3", "created_at": "2026-11-27"}
OLD_META = {"criterion": "entropy", "allocation": "global", "ratio": 0.5,
            "allocation_options": {"normalize": "zscore", "min_keep": 0.1, "fidelity": "kl", "mode": "independent",
                                   "halvings": 6, "heldout_samples": 4, "heldout_seq_len": 64},
            "compensation": {"method": "lsq", "samples": 2, "seq_len": 16, "damping": 0.1},
            "calibration": {"source": "wiki", "samples": 2, "seq_len": 16, "seed": 3}}


def _write_old_run(root, run_id: str, config: dict, results: dict, name: str, tensors: list[torch.Tensor]):
    folder = root / run_id
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "results.json").write_text(json.dumps(results))
    save_file({f"layer_{i:03d}": t.contiguous() for i, t in enumerate(tensors)}, str(folder / name))


def test_old_score_and_prune_runs_load_through_the_option_groups(tmp_path, tiny_loaded):
    loaded = tiny_loaded("llama", intermediate_size=16)
    scores = [torch.rand(16), torch.rand(16)]
    kept = [torch.arange(0, 16, 2), torch.arange(1, 16, 2)]
    _write_old_run(tmp_path, "20261127-120000-score-a1b2c3", OLD_SCORE_CONFIG, {"seconds": 1.5}, "scores.safetensors", scores)
    _write_old_run(tmp_path, "20261127-120500-prune-d4e5f6", {"kind": "prune", "model": "tiny", "name": "old", "run_id": "20261127-120500-prune-d4e5f6",
                                           "created_at": "2026-11-27"},
                   {"widths": [8, 8], "meta": OLD_META}, "kept.safetensors", kept)
    store = RunStore(tmp_path)
    assert {r.run_id for r in store.list()} == {"20261127-120000-score-a1b2c3", "20261127-120500-prune-d4e5f6"}

    run = store.load("20261127-120000-score-a1b2c3")
    result = ScoreResult(run.scores(), run.config, run.results["seconds"])
    assert all(torch.equal(a, b) for a, b in zip(result.scores, scores, strict=True))
    assert result.calibration == CalibrationOptions(source="wiki", samples=2, seq_len=16, seed=3)  # batch_size: default

    prune = store.load("20261127-120500-prune-d4e5f6")
    meta = prune.results["meta"]
    options = AllocationOptions.from_dict(meta["allocation_options"])
    assert (options.normalize, options.adaptive_min_keep) == ("zscore", 0.05)
    assert CompensationOptions.from_dict(meta["compensation"]).to_dict() == meta["compensation"]
    # rebuilding the old run's compensated variant reads the old meta keys
    variant = pruned_view(loaded.model, prune.kept())
    before = [h.clone() for h in (variant.model.layers[0].mlp.down_proj.weight,)]
    apply_compensation(loaded, variant, prune.kept(), meta, progress=False)
    assert not torch.equal(before[0], variant.model.layers[0].mlp.down_proj.weight)


def test_one_validator_per_knob():
    """The CLI and the engine used to disagree ([0, 1) vs (0, 1] for min_keep): now one declaration."""
    with pytest.raises(PruneConfigError, match=r"min_keep \(--min-keep\) must be in \(0, 1\), got 0.0"):
        AllocationOptions(min_keep=0.0)
    with pytest.raises(PruneConfigError, match=r"halvings \(--halvings\) must be in \[1, 16\], got 0"):
        AllocationOptions(halvings=0)
    with pytest.raises(DataError, match=r"samples \(--samples\) must be ≥ 1, got 0"):
        CalibrationOptions(samples=0)
    with pytest.raises(PruneConfigError, match="Unknown compensation 'obs'"):
        CompensationOptions(method="obs")
