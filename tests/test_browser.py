"""A real Chromium clicks through Importance → Prune → Compare and checks the plotly charts drew.

Needs Debian's ``chromium`` (``.ci/run`` installs it) and the PyPI ``playwright`` package, which
drives it by ``executable_path`` (no browser download). Set HFPRUNE_SCREENSHOT=path to keep a
full-page screenshot (the README's picture is made this way).
"""
from __future__ import annotations

import os
import shutil

import pytest

pytestmark = [pytest.mark.real, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("Debian 'chromium' is not installed (apt-get install chromium; .ci/run does this as root)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the 'playwright' package is not installed")

TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def app(launch_dashboard, tmp_path_factory):
    yield from launch_dashboard(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def page(app):
    with sync_api.sync_playwright() as pw:
        flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=flags)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(app[0])
        yield page
        browser.close()


def rendered_plot(page, elem_id: str):
    """Wait until plotly has drawn an SVG inside the gr.Plot with this elem_id; return its locator."""
    locator = page.locator(f"#{elem_id} .js-plotly-plot .main-svg").first
    locator.wait_for(state="visible")
    return locator


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def set_number(page, label: str, value: int) -> None:
    box = page.get_by_label(label, exact=True).first
    box.fill(str(value))
    box.press("Enter")


def test_click_through_importance_prune_compare(page):
    # Keep the calibration tiny: 2 windows × 32 tokens.
    set_number(page, "number input for Calibration windows", 2)
    set_number(page, "number input for Tokens per window", 32)

    open_tab(page, "Importance")
    page.locator("#score-button").click()
    rendered_plot(page, "hist-plot")
    rendered_plot(page, "heat-plot")
    sync_api.expect(page.locator("#score-status")).to_contain_text("cross_entropy")
    bars = page.locator("#hist-plot .js-plotly-plot .barlayer .point")
    assert bars.count() > 10

    open_tab(page, "Prune")
    rendered_plot(page, "widths-plot")
    page.locator("#prune-button").click()
    sync_api.expect(page.locator("#prune-status")).to_contain_text("Pruned")

    open_tab(page, "Compare")
    page.locator("#menu-button").click()
    rendered_plot(page, "menu-plot")
    legend = page.locator("#menu-plot .legendtext").evaluate_all("nodes => nodes.map(n => n.textContent)")
    assert any(t.startswith("original") for t in legend) and any(t.startswith("entropy-20%") for t in legend)

    target = os.environ.get("HFPRUNE_SCREENSHOT")
    if target:
        open_tab(page, "Importance")
        rendered_plot(page, "hist-plot")
        page.screenshot(path=target, full_page=True)
