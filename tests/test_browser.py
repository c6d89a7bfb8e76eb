"""A real Chromium walks the dashboard: the Tour's five steps, the paths issue 10 fixed (upload split,
status line, an error then a retry without reloading, Stop on the sweep, the export default of a
non-uniform variant), then the original Importance → Prune → Compare click-through.

Needs Debian's ``chromium`` (``.ci/run`` installs it) and the PyPI ``playwright`` package, which
drives it by ``executable_path`` (no browser download). The tests share one page and run in file
order. Screenshots go to a temporary folder, or to ``$HFPRUNE_SCREENSHOTS`` (``docs/`` regenerates
the README's pictures); ``HFPRUNE_SCREENSHOT=path`` keeps the README's main picture.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.real, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("Debian 'chromium' is not installed (apt-get install chromium; .ci/run does this as root)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the 'playwright' package is not installed")
expect = sync_api.expect

TIMEOUT_MS = 180_000
expect.set_options(timeout=TIMEOUT_MS)  # expect() has its own 5 s default; model work can take longer


@pytest.fixture(scope="module")
def app(launch_dashboard, tmp_path_factory):
    yield from launch_dashboard(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("HFPRUNE_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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
    """Click a tab; a tab inside a group (``hfprune_ui.layout.TAB_GROUPS``) opens its group first."""
    from hfprune_ui.layout import TAB_GROUPS

    group = next((g for g, names in TAB_GROUPS.items() if name in names), None)
    if group is not None:
        page.get_by_role("tab", name=group, exact=True).click()
    page.get_by_role("tab", name=name, exact=True).click()


def overflowed(page) -> list[str]:
    """Visible tab buttons of Gradio's '⋯' overflow menus (none when every tab fits its row)."""
    return [b.inner_text() for b in page.locator(".overflow-menu").all() if b.is_visible()]


def test_every_tab_fits_its_row_at_1500_px(page, shots):
    """Issue 20: twelve tabs in one row hid three behind '⋯' at 1500 px. The Tour, three groups and the run
    list fit one row, each group's tabs another; every tab opens from its group without an overflow menu."""
    from hfprune_ui.layout import TAB_GROUPS

    for width in (1500, 1280):
        page.set_viewport_size({"width": width, "height": 1000})
        for name in ("Tour", *TAB_GROUPS, "Runs"):
            expect(page.get_by_role("tab", name=name, exact=True)).to_be_visible()
        for group, names in TAB_GROUPS.items():
            page.get_by_role("tab", name=group, exact=True).click()
            for name in names:
                tab = page.get_by_role("tab", name=name, exact=True)
                expect(tab).to_be_visible()
                tab.click()
                expect(tab).to_have_attribute("aria-selected", "true")
            assert overflowed(page) == [], (width, group)
        if width == 1500:
            page.screenshot(path=str(shots / "tab-groups.png"))
    page.set_viewport_size({"width": 1400, "height": 1000})
    open_tab(page, "Tour")


def set_number(page, label: str, value: float) -> None:
    box = page.get_by_label(label, exact=True).first
    box.fill(str(value))
    box.press("Enter")


def set_slider(page, elem_id: str, value: float) -> None:
    """Type into the number box of the slider with this elem_id (labels repeat across tabs)."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def toast(page, kind: str, text: str):
    """The visible toast of ``kind`` (warning / info / error) containing ``text``."""
    locator = page.locator(f".toast-body.{kind}").filter(has_text=text).first
    locator.wait_for(state="visible")
    return locator


def close_toasts(page) -> None:
    for button in page.locator(".toast-close").all():
        if button.is_visible():
            button.click()


def status_line(page):
    return page.locator("#status-line")


def open_accordion(page, elem_id: str, inside: str) -> None:
    """Open the accordion ``elem_id`` unless the element ``inside`` it is already visible."""
    if not page.locator(f"#{inside}").is_visible():
        page.locator(f"#{elem_id} button").first.click()
        page.locator(f"#{inside}").wait_for(state="visible")


def test_tour_tells_the_story_in_five_clicks(page, shots):
    open_tab(page, "Tour")
    expect(status_line(page)).to_contain_text("Nothing loaded yet")
    page.locator("#tour-1").click()
    expect(page.locator("#tour-1-out")).to_contain_text("precomputed")
    expect(status_line(page)).to_contain_text("entropy (precomputed), cross_entropy (precomputed)")
    page.locator("#tour-2").click()
    rendered_plot(page, "tour-2-plot")
    titles = page.locator("#tour-2-plot .annotation-text").all_text_contents()
    assert titles[:2] == ["entropy", "cross_entropy"]  # one panel per criterion
    page.locator("#tour-3").click()
    rendered_plot(page, "tour-3-plot")
    expect(page.locator("#tour-3-out")).to_contain_text("two random choices would share")
    legend = page.locator("#tour-3-plot .legendtext").all_text_contents()
    assert any(t.startswith("two random choices") for t in legend)  # the chance line
    page.locator("#tour-4").click()
    expect(page.locator("#tour-4-table")).to_contain_text("tour-cross_entropy-30%")
    expect(page.locator("#tour-4-table")).to_contain_text("110.6 M")
    expect(status_line(page)).to_contain_text("Variants 2 of 4: tour-entropy-30%, tour-cross_entropy-30%")
    page.locator("#tour-5").click()
    rendered_plot(page, "tour-5-plot")
    expect(page.locator("#tour-5-out")).to_contain_text("Paris")
    page.screenshot(path=str(shots / "tour.png"), full_page=True)
    # every result also landed in the regular tabs
    open_tab(page, "Importance")
    rendered_plot(page, "hist-plot")
    open_tab(page, "Compare")
    rendered_plot(page, "menu-plot")


def test_an_error_is_a_toast_and_the_inputs_stay_usable(page, shots):
    open_tab(page, "Prune")
    open_accordion(page, "sweep-accordion", "sweep-ratios")
    ratios = page.locator("#sweep-ratios textarea, #sweep-ratios input").first
    ratios.fill("0.2, lots")
    page.locator("#sweep-button").click()
    toast(page, "warning", "Ratios must be numbers")
    page.wait_for_timeout(800)  # the toast's fade-in
    page.screenshot(path=str(shots / "error-toast.png"))
    assert page.locator("#sweep-table .error, #sweep-plot .error").count() == 0  # no red box over the outputs
    ratios.fill("0.2")  # fix the input and press the same button again: no reload needed
    close_toasts(page)
    set_slider(page, "sweep-windows", 2)
    set_slider(page, "sweep-len", 32)
    page.locator("#sweep-button").click()
    expect(page.locator("#sweep-note")).to_contain_text("rows measured")
    expect(page.locator("#sweep-table")).to_contain_text("random (baseline)")
    rendered_plot(page, "sweep-plot")


def test_stop_on_the_sweep_keeps_the_rows_it_measured(page, shots):
    ratios = page.locator("#sweep-ratios textarea, #sweep-ratios input").first
    ratios.fill("0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8")
    set_slider(page, "sweep-windows", 8)
    set_slider(page, "sweep-len", 128)
    page.locator("#sweep-button").click()
    expect(page.locator("#sweep-note")).to_contain_text("1 of 24 rows")  # the first row is in
    page.locator("#sweep-stop").click()
    # the Stop button says when the sweep has stopped; the sweep's own last word says which rows stay
    expect(page.locator("#sweep-note")).to_contain_text(re.compile(r"Stopped (the sweep|after \d+ of 24 rows)"))
    rows = page.locator("#sweep-table tbody tr").count()
    assert 1 <= rows < 24
    page.screenshot(path=str(shots / "sweep-stop.png"))
    # the model is free again: a new sweep runs to the end
    ratios.fill("0.2")
    set_slider(page, "sweep-windows", 2)
    set_slider(page, "sweep-len", 32)
    page.locator("#sweep-button").click()
    expect(page.locator("#sweep-note")).to_contain_text("3 of 3 rows")


def test_export_defaults_to_the_format_that_works(page, shots):
    page.locator("#allocation input").first.click()
    page.get_by_role("option", name="global", exact=True).click()
    page.get_by_label("Variant name").fill("global30")
    set_number(page, "number input for Ratio of MLP neurons removed", 0.3)
    page.locator("#prune-button").click()
    expect(page.locator("#prune-status")).to_contain_text("Pruned global30")
    expect(page.locator("#prune-status")).to_contain_text("Quality at a glance")
    open_accordion(page, "export-accordion", "export-format")
    expect(page.locator("#export-why")).to_contain_text("hf-remote-code: the layers have different widths")
    assert page.locator("#export-format input").first.input_value() == "hf-remote-code"
    page.locator("#export-accordion").screenshot(path=str(shots / "export-default.png"))


def test_upload_is_split_and_the_status_line_follows(page, shots, tmp_path):
    rng = random.Random(0)
    words = ["river", "stone", "market", "winter", "lantern", "orchard", "copper", "harbour", "meadow", "signal"]
    notes = tmp_path / "class-notes.jsonl"
    notes.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(150))})
                               for _ in range(24)))
    open_tab(page, "Model & data")
    page.get_by_label("Uploaded file").check()
    page.locator("#upload input[type=file]").set_input_files(str(notes))
    set_number(page, "number input for Calibration windows", 2)
    set_number(page, "number input for Tokens per window", 32)
    page.locator("#load-button").click()
    expect(page.locator("#model-status")).to_contain_text("split by document: 18 documents")
    expect(page.locator("#model-status")).to_contain_text("held out for evaluation")
    toast(page, "warning", "were set aside because the calibration data changed")
    expect(status_line(page)).to_contain_text("Data class-notes.jsonl, 2 × 32 tokens, seed 0")
    expect(status_line(page)).to_contain_text("Scored none yet")
    expect(status_line(page)).to_contain_text("set aside")
    page.wait_for_timeout(800)
    page.screenshot(path=str(shots / "upload-split.png"), full_page=True)
    close_toasts(page)
    page.get_by_label("Wikipedia (built-in)").check()


def test_click_through_importance_prune_compare(page):
    # Keep the calibration tiny: 2 windows × 32 tokens.
    open_tab(page, "Model & data")
    set_number(page, "number input for Calibration windows", 2)
    set_number(page, "number input for Tokens per window", 32)

    open_tab(page, "Importance")
    page.locator("#score-button").click()
    rendered_plot(page, "hist-plot")
    rendered_plot(page, "heat-plot")
    expect(page.locator("#score-status")).to_contain_text("cross_entropy")
    bars = page.locator("#hist-plot .js-plotly-plot .barlayer .point")
    assert bars.count() > 10

    open_tab(page, "Prune")
    page.locator("#allocation input").first.click()
    page.get_by_role("option", name="uniform", exact=True).click()
    page.get_by_label("Variant name").fill("")
    set_number(page, "number input for Ratio of MLP neurons removed", 0.2)
    rendered_plot(page, "widths-plot")
    page.locator("#prune-button").click()
    # the name, not just "Pruned": an earlier test of this page left "Pruned global30" there
    expect(page.locator("#prune-status")).to_contain_text("Pruned entropy-20%")

    open_tab(page, "Compare")
    expect(page.locator("#compare-variants")).to_contain_text("entropy-20%")  # the tab lists every variant
    page.locator("#menu-button").click()
    expect(page.locator("#menu-text")).to_contain_text("entropy-20%")
    rendered_plot(page, "menu-plot")
    legend = page.locator("#menu-plot .legendtext").evaluate_all("nodes => nodes.map(n => n.textContent)")
    assert any(t.startswith("original") for t in legend) and any(t.startswith("entropy-20%") for t in legend)

    target = os.environ.get("HFPRUNE_SCREENSHOT")
    if target:
        open_tab(page, "Importance")
        rendered_plot(page, "hist-plot")
        page.screenshot(path=target, full_page=True)


def plot_point_position(page, elem_id: str, index: int) -> tuple[float, float]:
    """Page coordinates of point ``index`` of the first trace of the plotly chart in ``#elem_id``."""
    return tuple(page.evaluate("""([id, i]) => {
        const gd = document.querySelector(`#${id} .js-plotly-plot`);
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, box = gd.getBoundingClientRect();
        return [box.left + xa._offset + xa.l2p(gd.data[0].x[i]), box.top + ya._offset + ya.l2p(gd.data[0].y[i])];
    }""", [elem_id, index]))


def test_inspector_from_the_scatter_the_stability_view_and_a_report(page, shots, tmp_path):
    """Issue 16: a click on a rank-scatter dot opens the neuron inspector; the stability view draws;
    every chart offers PNG and SVG downloads; a run's HTML report opens offline with its plots."""
    open_tab(page, "Model & data")
    set_number(page, "number input for Calibration windows", 2)
    set_number(page, "number input for Tokens per window", 32)
    open_tab(page, "Entropy vs cross-entropy")
    page.locator("#compare-button").click()
    rendered_plot(page, "rank-plot")
    page.wait_for_function("() => { const gd = document.querySelector('#rank-plot .js-plotly-plot');"
                           " return gd && gd.data && gd.data.length && (gd.data[0].x || []).length > 8; }")
    page.locator("#rank-plot").scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    x, y = plot_point_position(page, "rank-plot", 7)
    page.mouse.move(x, y)
    page.mouse.click(x, y)
    expect(page.locator("#inspect-status")).to_contain_text("neuron 7 of 1536", timeout=TIMEOUT_MS)
    expect(page.locator("#inspect-ranks")).to_contain_text("cross_entropy", timeout=TIMEOUT_MS)
    assert page.locator("#inspect-contexts .tok").count() > 10  # shaded tokens around each context
    rendered_plot(page, "inspect-menu-plot")
    legend = page.locator("#inspect-menu-plot .legendtext").all_text_contents()
    assert legend == ["dense", "this neuron removed"]
    page.screenshot(path=str(shots / "inspector.png"), full_page=True)

    # every chart: the modebar saves PNG (camera) and SVG (the added button), named after the title
    page.locator("#inspect-menu-plot .js-plotly-plot").hover()
    with page.expect_download() as download:
        page.locator('#inspect-menu-plot .modebar-btn[data-title="Download plot as SVG"]').click()
    assert download.value.suggested_filename.startswith("after-") and download.value.suggested_filename.endswith(".svg")
    assert download.value.path().read_text().startswith("<svg")
    with page.expect_download() as download:
        page.locator('#inspect-menu-plot .modebar-btn[data-title="Download plot as a png" i]').click()
    assert download.value.suggested_filename.endswith(".png")

    set_number(page, "number input for Disjoint draws K", 2)
    page.locator("#stability-button").click()
    expect(page.locator("#stability-status")).to_contain_text("two draws agree at mean ρ", timeout=TIMEOUT_MS)
    rendered_plot(page, "stability-plot")
    rendered_plot(page, "stability-overlap-plot")
    legend = page.locator("#stability-plot .legendtext").all_text_contents()
    assert "entropy vs cross_entropy: same draw" in legend and "entropy: draw vs draw" in legend
    page.locator("#stability-plot").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "stability.png"), full_page=True)

    page.get_by_text("Report: a stored run as one HTML file").click()
    page.get_by_role("button", name="Refresh list").click()
    page.locator("#report-button").click()
    link = page.locator("#report-file a").first
    link.wait_for(state="visible")
    with page.expect_download() as download:
        link.click()
    report = tmp_path / "report.html"
    download.value.save_as(report)
    offline = page.context.browser.new_page()
    requests: list[str] = []
    offline.on("request", lambda request: requests.append(request.url))
    offline.goto(report.as_uri())
    offline.locator(".js-plotly-plot .main-svg").first.wait_for(state="visible")
    assert offline.locator(".js-plotly-plot").count() >= 1
    assert [u for u in requests if not u.startswith("file:") and not u.startswith("data:")] == []
    offline.close()
