"""What the dashboard says agrees with what it shows (issue 20 §5): every "<name> tab" a message
names is a tab of the dashboard, every slider's help text gives the slider's own range, and every
table has its real column headers before anything fills it. Fast: the demo is built, not launched."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import gradio as gr
import pytest

ROOT = Path(__file__).resolve().parents[1]
# "<Name> tab(s)": a capitalised word, then lower-case words or "& x" / "and X" joins, right before "tab"
TAB_REFERENCE = re.compile(r"\b([A-Z][\w-]*(?: (?:&|and) [A-Za-z][\w-]*| [a-z][\w-]*)*?) tabs?\b")
NOT_A_NAME = {"the", "a", "an", "its", "this", "that", "every", "each", "other"}  # "fills the regular tabs"


@pytest.fixture(scope="module")
def demo():
    from hfprune_ui import build_demo

    return build_demo()


def _blocks(demo, kind: type) -> list:
    return [b for b in demo.blocks.values() if isinstance(b, kind)]


def _ui_texts() -> list[tuple[str, str]]:
    """(file, text) of every string literal in hfprune_ui/ that is not a docstring; an f-string's
    fields read as '{}'."""
    out = []
    for path in sorted((ROOT / "hfprune_ui").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                out.append((path.name, node.value))
            elif isinstance(node, ast.JoinedStr):
                out.append((path.name, "".join(v.value if isinstance(v, ast.Constant) else "{}"
                                               for v in node.values)))
    return out


def test_every_tab_a_message_names_exists(demo):
    labels = {str(tab.label) for tab in _blocks(demo, gr.Tab)}
    names = labels | {label.split(" (")[0] for label in labels}  # "Vision (AMP)" is also "the Vision tab"
    assert {"Compare", "Importance", "Model & data", "Prune"} <= names
    wrong = []
    for file, text in _ui_texts():
        for match in TAB_REFERENCE.finditer(text):
            if NOT_A_NAME & set(match.group(1).lower().split()):
                continue
            for name in re.split(r" and ", match.group(1)):
                if name not in names:
                    wrong.append(f"{file}: '{name} tab' in {text[:80]!r}")
    assert not wrong, f"messages naming tabs the dashboard does not have (tabs: {sorted(labels)}): {wrong}"


def test_the_reference_pattern_finds_a_wrong_tab_name():
    found = [m.group(1) for m in TAB_REFERENCE.finditer("Compare it on the Side by side and Quantize & measure "
                                                        "tabs; load the model (Model & data tab) first.")]
    assert found == ["Side by side and Quantize & measure", "Model & data"]


NUMBER = r"-?\d+(?:\.\d+)?(?:e-?\d+)?"


def named_ranges(text: str) -> list[tuple[float | None, float | None]]:
    """Every range a help text names, as (low, high) with None for an open side: 'a–b', '[a, b]' /
    '(a, b)' / '[a, b)' intervals, and '≥ a', '> a', '≤ b', '< b' (a strict bound reads as its number:
    'τ (< 1 sharpens)' on a slider ending at 1 agrees, '(> 0)' on one starting at 0.05 does not)."""
    found: list[tuple[float | None, float | None]] = []
    for a, b in re.findall(rf"[\[(]({NUMBER}), ({NUMBER})[\])]", text):
        found.append((float(a), float(b)))
    text = re.sub(rf"[\[(]{NUMBER}, {NUMBER}[\])]", "", text)
    for a, b in re.findall(rf"(?<![\w.])({NUMBER})\s?[–-]\s?({NUMBER})(?![\w.])", text):
        found.append((float(a), float(b)))
    for sign, value in re.findall(rf"(≥|>|≤|<)\s?({NUMBER})", text):
        found.append((float(value), None) if sign in "≥>" else (None, float(value)))
    return found


def disagreements(label: str, info: str, low: float, high: float) -> list[str]:
    """The ranges ``info`` names that are not the slider's [low, high]."""
    wrong = []
    for a, b in named_ranges(info or ""):
        if (a is not None and abs(a - low) > 1e-9) or (b is not None and abs(b - high) > 1e-9):
            wrong.append(f"'{label}': slider {low:g}–{high:g}, help says {info!r}")
    return wrong


def test_every_slider_help_names_the_slider_range(demo):
    sliders = _blocks(demo, gr.Slider)
    assert len(sliders) > 30
    with_range = [s for s in sliders if named_ranges(s.info or "")]
    assert len(with_range) >= 15  # the option-group sliders say their range
    wrong = [w for s in sliders for w in disagreements(str(s.label), s.info, s.minimum, s.maximum)]
    assert not wrong, wrong


def test_the_range_check_catches_a_help_text_with_another_range():
    from core.prune.compensate import CompensationOptions

    spec = CompensationOptions.ui("samples")
    assert spec["info"].endswith(f"({spec['minimum']}–{spec['maximum']})")  # derived from the knob's ui range
    assert disagreements("x", spec["info"], spec["minimum"], spec["maximum"]) == []
    assert disagreements("x", "windows (≥ 1)", 4, 256) and disagreements("x", "share (in [0, 1))", 0, 0.9)
    assert disagreements("x", "tokens (16–512)", 16, 1024) and disagreements("x", "K ≥ 2 re-scores", 1, 8)
    assert named_ranges("τ (0.05–1) and a (> 0)") == [(0.05, 1.0), (0.0, None)]


def test_every_table_has_its_column_headers_before_it_is_filled(demo):
    tables = _blocks(demo, gr.Dataframe)
    assert len(tables) >= 14
    default = [str(i) for i in range(1, 4)]
    blank = [t.label or t.elem_id for t in tables if t.value["headers"][:3] == default or not t.value["headers"]]
    assert not blank, f"tables showing '1 2 3' as headers: {blank}"


def test_whitespace_tokens_label_their_bars_visibly():
    from types import SimpleNamespace

    from core.measure.outputs import shown_token, shown_tokens
    from core.studies.report import menu_figure
    from hfprune_ui import figures, inspect_figures

    assert [shown_token(t) for t in (" ", " Paris", "\n", "", "\t", "\x00")] == ["␣", "␣Paris", "⏎", "∅", "⇥", "\\x00"]
    assert shown_tokens([" ", "␣"]) == ["␣", "␣ ·2"]  # never two bars with one label
    tokens = [" Paris", " ", "\n"]
    menu = figures.token_menu(tokens, {"original": [0.7, 0.2, 0.1]}, {"original": 1.0})
    assert list(menu.data[0].x) == ["␣Paris", "␣", "⏎"]
    change = inspect_figures.menu_change([{"token": t, "p_before": 0.3, "p_after": 0.2} for t in tokens], "t")
    assert list(change.data[0].x) == ["␣Paris", "␣", "⏎"]
    report = menu_figure(SimpleNamespace(tokens=tokens, probs={"original": [0.7, 0.2, 0.1]},
                                         entropy={"original": 1.0}, context="The capital of France is"))
    assert report["data"][0]["x"] == ["␣Paris", "␣", "⏎"]


def test_numbers_keep_enough_digits_to_tell_variants_apart():
    import pandas as pd
    import torch

    from hfprune_ui.state import Session, Variant
    from hfprune_ui.status import digits_needed, distinct, number, readable
    from hfprune_ui.tabs.prune import variant_rows

    assert distinct([1.20341, 1.20348, None]) == [1.2034, 1.2035, None]  # 4 digits would read 1.203 twice
    assert distinct([0.91234, 1.70011]) == [0.9123, 1.7] and digits_needed([2.0, 2.0]) == 4
    assert number(1.0000001, [1.0000002]) == "1.0000001" and number(0.5) == "0.5" and number(None) == "—"
    frame = readable(pd.DataFrame({"kl": [0.123451, 0.123459], "name": ["a", "b"]}))
    assert frame["kl"].tolist() == [0.12345, 0.12346] and frame["name"].tolist() == ["a", "b"]
    session = Session("s")
    for name, kl in (("a", 0.91234561), ("b", 0.91234569)):
        session.add_variant(Variant(name, "m", torch.nn.Linear(1, 1), [6], {"criterion": "entropy"},
                                    metrics={"kl": kl}))
    shown = variant_rows(session)["KL to original"].tolist()
    assert shown[0] != shown[1] and str(shown[0]).startswith("0.912345")


def test_runs_table_says_what_each_run_is(tmp_path):
    from types import SimpleNamespace

    from core.runs import RunStore
    from hfprune_ui.tabs.runs import COLUMNS, run_choices, runs_table

    store = RunStore(tmp_path / "runs")
    data = {"source": "upload:notes.txt#abc123", "samples": 8, "seq_len": 64, "seed": 0}
    store.create("score", {"model": "m", "criterion": "entropy", **data, "session": "me"})
    prune = store.create("prune", {"model": "m", "name": "entropy-30%", "criterion": "entropy", "ratio": 0.3,
                                   "allocation": "adaptive", "compensation": {"method": "lsq", "samples": 64},
                                   **data, "session": "me"},
                         results={"metrics": {"perplexity": 91.63412}})
    store.create("recover", {"model": "m", "name": "entropy-30%+kd-mlp", "source_variant": "entropy-30%",
                             "source_run": prune.run_id, "params": "mlp",
                             "recover_options": {"source": "wiki", "seq_len": 128},
                             "train": {"minutes": 1.0, "steps": 0, "batch_size": 4}, "session": "other"})
    store.create("ddp", {"model": "m", "name": "ddp-mlp-20", "criterion": "ddp", "allocation": "learned (mlp)",
                         "ratio": 0.2, "ddp": {"units": "mlp"}, "source": "wiki", "samples": 40, "seq_len": 128,
                         "seed": 0})
    store.create("stability", {"model": "m", "criteria": ["entropy", "cross_entropy"], "draws": 4, "source": "wiki",
                               "samples": 8, "seq_len": 64, "seed": 0})
    table = runs_table(SimpleNamespace(runs=store), False, "me")
    assert list(table.columns) == COLUMNS and len(table) == 5
    rows = {r["kind"]: r for r in table.to_dict("records")}
    text = " ".join(str(v) for r in rows.values() for v in r.values())
    assert "None" not in text and "nan" not in text.lower()
    assert rows["score"]["run"] == "entropy scores" and rows["score"]["data"] == "notes.txt, 8 × 64 tokens, seed 0"
    assert rows["prune"]["criterion / method"] == "entropy" and rows["prune"]["ratio"] == "30 %"
    assert rows["prune"]["compensation"] == "lsq (64 windows)" and rows["prune"]["perplexity"] == 91.63
    recover = rows["recover"]  # the cut it started from: criterion, ratio, allocation; its own windows per step
    assert recover["criterion / method"] == "entropy cut, then recovery (mlp, 1 min)" and recover["ratio"] == "30 %"
    assert recover["allocation"] == "adaptive" and recover["data"] == "wiki, 4 × 128 tokens per step"
    assert rows["ddp"]["criterion / method"] == "DDP gates (mlp)" and rows["ddp"]["ratio"] == "20 %"
    assert rows["stability"]["run"] == "rank stability of entropy, cross_entropy"
    assert rows["stability"]["data"] == "wiki, 8 × 64 tokens, seed 0, 4 draws"
    assert [r["mine"] for r in table.to_dict("records") if r["kind"] in ("score", "prune")] == ["yes", "yes"]
    label, value = next(c for c in run_choices(table) if c[1] == prune.run_id)
    assert label.startswith("entropy-30% · prune · m · ") and value == prune.run_id  # not a bare id
    mine = runs_table(SimpleNamespace(runs=store), True, "me")
    assert sorted(mine["kind"]) == ["prune", "score"]


def _legend_clear_of_title(fig) -> bool:
    """The top margin holds the title's lines and every legend row (the legend sits above the plot)."""
    from hfprune_ui import figures

    text = fig.layout.title.text or ""
    lines = 1 + text.count("<br>") if text else 0
    need = figures.TITLE_LINE_HEIGHT * lines + figures.LEGEND_ROW_HEIGHT * figures.legend_rows(fig)
    return fig.layout.margin.t >= need and (not lines or fig.layout.title.yref == "container")


def test_legends_never_run_into_titles():
    from hfprune_ui import figures
    from hfprune_ui.tabs import ddp

    point = {"m": 0.1, "tokens": 1, "elapsed": 1, "heldout": 0.5,
             **{k: {"expected_sparsity": 0.1, "open": 0.9, "target": 0.2, "lambdas": [1, 2, 3]}
                for k in ("mlp", "heads")}}
    sparsity = ddp.sparsity_figure([{**point, "step": i} for i in range(3)])
    assert figures.legend_rows(sparsity) == 7  # seven long names: one a row in a half-width plot
    trace = figures.adaptive_trace([{"layer": i, "tried": [(10, 0.1), (20, 0.05)], "width": 20} for i in range(12)])
    assert figures.legend_rows(trace) >= 3  # the Vision tab's search over 12 layers
    widths = figures.widths([64, 64], [30, 40], "Kept MLP width per layer: a", "entropy scores")
    for fig in (sparsity, ddp.lambda_figure([{**point, "step": 1}]), trace, widths):
        assert _legend_clear_of_title(fig), fig.layout.title.text
    assert sparsity.layout.height - sparsity.layout.margin.t == 380 - 60  # the plot keeps its size
    assert figures.legend_rows(figures.per_layer_bars([0.1, 0.2], "t", "y")) == 0  # one trace: no legend


def test_point_names_do_not_overlap_or_leave_the_plot():
    from hfprune_ui import figures

    names = ["original", "entropy-30%", "entropy-30%+lsq", "entropy-30%+lsq+kd"]
    params, perplexity = [134.5e6, 110.6e6, 110.6e6, 110.6e6], [20.1, 91.6, 60.2, 58.0]
    spots = figures.label_spots(names, [p / 1e6 for p in params], perplexity)
    assert spots[2] != spots[3]  # the refit and the recovered one sit almost on one spot
    fig = figures.params_vs_perplexity(names, params, perplexity)
    assert [t.textposition for t in fig.data] == spots and all(t.cliponaxis is False for t in fig.data)
    low, high = fig.layout.yaxis.range
    assert low < 20.1 - 10 and high > 91.6 + 10  # room for the names above the top and below the bottom point
    low, high = fig.layout.xaxis.range
    assert low < 110.6 - 3 and high > 134.5 + 3
    pareto = figures.pareto(names, [538, 442, 442, 442], perplexity, "perplexity")
    assert pareto.layout.yaxis.range[1] > 91.6 and all(t.cliponaxis is False for t in pareto.data[1:])
