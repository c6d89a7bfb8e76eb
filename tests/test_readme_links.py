"""The README's links into the repository resolve: each linked file exists and each ``#anchor`` is a
heading of that file (GitHub's slug rule: lower case, punctuation dropped, spaces to hyphens)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading's text."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


def local_links(markdown: Path) -> list[tuple[str, str]]:
    """(file, anchor) of every link in ``markdown`` that is not a web address."""
    out = []
    for target in LINK.findall(markdown.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file, _, anchor = target.partition("#")
        out.append((file, anchor))
    return out


def test_slug_follows_github():
    assert slug("Dashboard: responsiveness, Tour and adaptive default") == "dashboard-responsiveness-tour-and-adaptive-default"
    assert slug("Quantization × pruning: measured speed") == "quantization--pruning-measured-speed"


def test_readme_links_resolve():
    broken = []
    for file, anchor in local_links(ROOT / "README.md"):
        path = ROOT / file if file else ROOT / "README.md"
        if not path.exists():
            broken.append(f"{file} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{file}#{anchor} (no such heading)")
    assert not broken, "README links that lead nowhere: " + "; ".join(broken)
