"""Every third-party module the project imports is provided by a distribution that a requirements file
reaches: named in one of ``requirements*.txt`` (root or benchmarks/), or a dependency of one that is
(read from ``importlib.metadata``). A missing line fails here, naming the file and the module, instead
of on a fresh machine."""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("core", "hfprune_ui", "benchmarks", "tests")
# requirements files whose packages are installed with --no-deps: their own dependencies are not reached
NO_DEPS = {"requirements-embedded.txt"}


def project_modules() -> set[str]:
    """Top-level names that are the project's own: its packages, and the loose modules tests and
    benchmarks import from their own folders."""
    own = {"core", "hfprune_ui", "app"}
    for folder in ("tests", "benchmarks"):
        own |= {p.stem for p in (ROOT / folder).glob("*.py")}
    return own


def imported_modules() -> dict[str, set[str]]:
    """Top-level module → the files (relative paths) that import it, absolute imports only."""
    found: dict[str, set[str]] = {}
    files = [ROOT / "app.py", *(p for d in SOURCES for p in (ROOT / d).rglob("*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def requirement_files() -> list[Path]:
    return sorted([*ROOT.glob("requirements*.txt"), *ROOT.glob("benchmarks/requirements*.txt")])


def requirements(path: Path) -> list[Requirement]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            out.append(Requirement(line))
        except InvalidRequirement as exc:
            raise AssertionError(f"{path.name}: cannot parse '{line}': {exc}") from exc
    return out


def reached_distributions() -> set[str]:
    """Canonical names of every distribution the requirements files name, plus (except for --no-deps
    files) everything those depend on, transitively, as installed."""
    reached: set[str] = set()
    todo: list[str] = []
    for path in requirement_files():
        for req in requirements(path):
            name = canonicalize_name(req.name)
            reached.add(name)
            if path.name not in NO_DEPS:
                todo.append(name)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            deps = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in deps:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            reached.add(dep)
            todo.append(dep)
    return reached


def missing_modules() -> list[str]:
    """One line per third-party module that no requirements file reaches: 'module (imported by …)'."""
    providers = md.packages_distributions()
    reached = reached_distributions()
    own = project_modules()
    bad = []
    for module, files in sorted(imported_modules().items()):
        if module in own or module in sys.stdlib_module_names or module == "__future__":
            continue
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        if not dists:  # not installed here: accept it only when a requirements file names it outright
            dists = {canonicalize_name(module)}
        if not dists & reached:
            where = ", ".join(sorted(files)[:3]) + (" …" if len(files) > 3 else "")
            bad.append(f"'{module}' (imported by {where}; distribution {', '.join(sorted(dists))})")
    return bad


def test_every_imported_module_is_reached_by_a_requirements_file():
    bad = missing_modules()
    files = ", ".join(p.relative_to(ROOT).as_posix() for p in requirement_files())
    assert not bad, f"no requirements file ({files}) provides: " + "; ".join(bad)


def test_every_requirement_is_pinned():
    loose = [f"{path.name}: {req}" for path in requirement_files() for req in requirements(path)
             if not re.fullmatch(r"==[^,;*]+", str(req.specifier))]
    assert not loose, f"pin these with ==: {loose}"


def test_the_check_notices_a_deleted_line(tmp_path, monkeypatch):
    """The check itself can fail: with matplotlib's line removed, it names matplotlib and who imports it."""
    copy = tmp_path / "requirements.txt"
    copy.write_text("\n".join(line for line in (ROOT / "requirements.txt").read_text().splitlines()
                              if not line.startswith("matplotlib")))
    real = requirement_files()
    monkeypatch.setattr(sys.modules[__name__], "requirement_files",
                        lambda: [copy if p.name == "requirements.txt" and p.parent == ROOT else p for p in real])
    bad = missing_modules()
    assert any(line.startswith("'matplotlib'") and "benchmarks/" in line for line in bad), bad


def readme_commands() -> list[str]:
    """The shell lines of the README's bash blocks."""
    text = (ROOT / "README.md").read_text()
    return [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]


def test_ci_runs_exactly_the_readmes_test_command_in_its_own_environment():
    tests = [line for line in readme_commands() if line.rstrip().endswith("python -m pytest")]
    assert len(tests) == 1, f"the README should show one test command, found {tests}"
    command = tests[0]
    assert command.startswith("python -m venv .venv && . .venv/bin/activate && "), command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci, ".ci/run does not run the README's test command verbatim"
    assert "/.venv/" in (ROOT / ".gitignore").read_text().splitlines(), "the README's .venv is not git-ignored"
