"""Zero-shot accuracy with lm-eval 0.4 on an in-memory model (no fork, no reload).

    from core.zeroshot import run_zeroshot
    result = run_zeroshot(loaded.model, loaded.tokenizer, ["wiki_cloze", "wiki_nextsent"], limit=200)
    result["tasks"]["wiki_nextsent"]["acc_norm"]

The shipped tasks (``assets/tasks``, see ``core.zeroshot_tasks``) run offline. Any other lm-eval task name
(boolq, piqa, arc_easy, hellaswag, …) is looked up in lm-eval's own registry and needs its dataset
from the Hugging Face Hub, so it only works online.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import yaml
from torch import nn

from core.errors import HFPruneError
from core.measure.zeroshot_tasks import ASSETS, SHIPPED_TASKS

DEFAULT_TASKS = SHIPPED_TASKS
CHANCE = {"wiki_nextsent": 0.25, "wiki_cloze": 0.0}  # next sentence: 1 of 4 choices; cloze: any word of the vocabulary
SEPARATION_Z = 2.0  # two accuracies are told apart when they differ by more than 2 combined standard errors


class ZeroShotError(HFPruneError):
    """lm-eval is missing, a task name is unknown or cannot run offline, or the options are invalid."""


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as exc:
        raise ZeroShotError(f"Zero-shot evaluation needs lm-eval; install it with: pip install lm-eval==0.4.13 "
                            f"({exc}).") from exc


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def write_task_dir(tasks: list[str] | tuple[str, ...] = SHIPPED_TASKS, folder: str | os.PathLike | None = None) -> Path:
    """Copy the shipped task YAMLs into ``folder`` (a new temp dir by default) with ``data_files``
    made absolute, so they load from any working directory; returns the folder for
    ``TaskManager(include_path=...)``."""
    target = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="hfprune-tasks-"))
    target.mkdir(parents=True, exist_ok=True)
    for name in tasks:
        source = ASSETS / f"{name}.yaml"
        config = yaml.safe_load(source.read_text(encoding="utf-8"))
        files = config["dataset_kwargs"]["data_files"]
        for split, relative in files.items():
            path = (ASSETS / relative).resolve()
            if not path.is_file():
                raise ZeroShotError(f"The shipped task file {path} is missing; rebuild it with: "
                                    "python -m core.zeroshot_tasks build.")
            files[split] = str(path)
        (target / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return target


def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm-eval", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*pretrained.*model kwarg is not of type.*")


def task_manager(tasks: list[str]):
    """An lm-eval TaskManager that knows the shipped tasks (and lm-eval's own when others are named)."""
    from lm_eval.tasks import TaskManager

    hub = [t for t in tasks if t not in SHIPPED_TASKS]
    include = write_task_dir([t for t in tasks if t in SHIPPED_TASKS])
    return TaskManager(include_path=str(include), include_defaults=bool(hub)), include


@functools.cache
def _lm_eval_task_names() -> frozenset[str]:
    """Every task lm-eval knows; indexing its task folder takes ~15 s, so once per process."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager(include_defaults=True).all_tasks)


def check_tasks(tasks: list[str] | tuple[str, ...]) -> list[str]:
    """Validate task names before any model work; returns the cleaned list."""
    names = [t.strip() for t in tasks if t and t.strip()]
    if not names:
        raise ZeroShotError(f"No zero-shot task given; the shipped offline tasks are: {', '.join(SHIPPED_TASKS)}.")
    if len(set(names)) != len(names):
        raise ZeroShotError(f"Task names repeat in {names}; name each task once.")
    hub = [t for t in names if t not in SHIPPED_TASKS]
    if hub:
        known = _lm_eval_task_names()
        unknown = [t for t in hub if t not in known]
        if unknown:
            names = ", ".join(repr(u) for u in unknown)
            raise ZeroShotError(f"Unknown zero-shot task {names}: it is neither a shipped "
                                f"offline task ({', '.join(SHIPPED_TASKS)}) nor an lm-eval task.")
        if _offline():
            raise ZeroShotError(f"Task {', '.join(hub)} needs its dataset from the Hugging Face Hub, but the hub is "
                                f"offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); offline you can run: "
                                f"{', '.join(SHIPPED_TASKS)}.")
    return names


def _stderr(p: float, n: int) -> float | None:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def run_zeroshot(model: nn.Module, tokenizer, tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS, *,
                 limit: int | None = None, batch_size: int = 8, num_fewshot: int = 0, progress: bool = True) -> dict:
    """Evaluate an in-memory causal LM on lm-eval tasks, zero-shot by default.

    Returns ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm"?, "acc_norm_stderr"?, "n", "chance"?}},
    "limit", "num_fewshot", "seconds", "device", "lm_eval_version"}``; ``acc``/``acc_norm`` keep
    lm-eval's names and meaning (``acc_norm`` = log-likelihood divided by the character length of each choice)."""
    names = check_tasks(tasks)
    if limit is not None and limit < 1:
        raise ZeroShotError(f"--limit must be at least 1 item per task (got {limit}).")
    if batch_size < 1:
        raise ZeroShotError(f"Batch size must be at least 1 (got {batch_size}).")
    _require_lm_eval()
    _quiet_lm_eval()
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    manager, include = task_manager(names)
    start = time.perf_counter()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            output = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                     log_samples=False, bootstrap_iters=0, verbosity="ERROR")
        except (ConnectionError, OSError) as exc:
            raise ZeroShotError(f"A task's dataset could not be loaded (offline, or the hub is unreachable): "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}.") from exc
    finally:
        shutil.rmtree(include, ignore_errors=True)
    seconds = time.perf_counter() - start
    results = output["results"] if output else {}
    n_samples = (output or {}).get("n-samples", {})
    report = {}
    for name in names:
        row = results.get(name, {})
        n = int(n_samples.get(name, {}).get("effective", 0))
        entry: dict = {"n": n}
        for metric in ("acc", "acc_norm", "perplexity"):
            value = row.get(f"{metric},none")
            if isinstance(value, (int, float)):
                entry[metric] = float(value)
                if metric != "perplexity":
                    entry[f"{metric}_stderr"] = _stderr(float(value), n)
        if name in CHANCE:
            entry["chance"] = CHANCE[name]
        report[name] = entry
    return {"tasks": report, "limit": limit, "num_fewshot": num_fewshot, "seconds": round(seconds, 2),
            "device": str(getattr(model, "device", "cpu")), "lm_eval_version": lm_eval.__version__}


def resolvable_difference(p1: float, n1: int, p2: float, n2: int, z: float = SEPARATION_Z) -> float:
    """The smallest accuracy difference that ``n1`` / ``n2`` items can tell apart: z · √(SE₁² + SE₂²),
    with binomial standard errors (inf when either n < 2; p is kept ½ item away from 0 and 1 so a
    perfect or null score on few items does not look exact)."""
    def clipped(p: float, n: int) -> float:
        return min(max(p, 0.5 / n), 1.0 - 0.5 / n) if n > 0 else p

    se1, se2 = _stderr(clipped(p1, n1), n1), _stderr(clipped(p2, n2), n2)
    if se1 is None or se2 is None:
        return math.inf
    return z * math.sqrt(se1 ** 2 + se2 ** 2)


def separates(p1: float, n1: int, p2: float, n2: int, z: float = SEPARATION_Z) -> bool:
    """True when accuracies ``p1`` (n1 items) and ``p2`` (n2 items) differ by more than
    :func:`resolvable_difference`, i.e. the difference is not within sampling noise."""
    return abs(p1 - p2) > resolvable_difference(p1, n1, p2, n2, z)


def flat_scores(result: dict) -> dict[str, float]:
    """``{"wiki_cloze/acc": …, "wiki_nextsent/acc_norm": …}`` — handy for tables and plots."""
    return {f"{task}/{metric}": value for task, row in result["tasks"].items() for metric, value in row.items()
            if metric in ("acc", "acc_norm")}
