"""The dashboard keeps its word on a busy machine (issue 20's proof), in a real Chromium while a
CPU-burning process runs beside it for the whole test:

- the Tour walks its six steps and every sentence that compares numbers agrees with the tables and
  plots shown beside it (read back from the page, not from the engine);
- the estimates shown before a job (the sweep's, Measure's, Tour step 6's "about N s") are within 2×
  of the time this test measures, and the progress shown during each job never goes back;
- Measure shows one row per model, each within its time budget (total ≤ the estimate + slack);
- pruning twice with the default name keeps both variants; quantizing with four variants held keeps
  the variant it quantizes.

One test function (the steps share one page and depend on each other's state, and pytest-xdist may
hand separate tests of a file to separate workers). Step 6 runs as shipped (a one-minute recovery, a
64-window refit): shortened to 6 s and 16 windows its fixed costs dominated and this very check read
its estimate at 0.46-0.62x, so the estimate a class sees is what is checked.
"""
from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time

import pytest
from test_browser import (
    app,  # noqa: F401  (a fixture: the dashboard in this process)
    expect,
    rendered_plot,
    status_line,
    sync_api,
)
from test_browser import page as browser_page  # noqa: F401  (a fixture: Chromium on the dashboard)

pytestmark = [pytest.mark.real, pytest.mark.browser]

BURNERS = 1  # CPU-burning processes beside the dashboard (the machine has 2 cores)
SLACK_S = 3.0  # a browser round trip and a redraw, added to every time bound


@pytest.fixture()
def burner():
    """``BURNERS`` processes spinning on the CPU until the test ends."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(BURNERS)]
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


# -- reading the page -------------------------------------------------------------------------------
def open_tab(page, name: str) -> None:
    """Show the tab called ``name`` wherever it sits: in the top row, in a row's overflow menu ("More
    tabs"), or nested inside a group tab (then the group is clicked first)."""
    page.get_by_role("tab").first.wait_for()
    if _show(page, name):
        return
    groups = [t.strip() for t in page.get_by_role("tab").filter(visible=True).all_text_contents() if t.strip()]
    for group in groups:
        page.get_by_role("tab", name=group, exact=True).filter(visible=True).first.click()
        if _show(page, name, wait_ms=2000):
            return
    raise AssertionError(f"no tab called {name!r} (tabs seen: {groups})")


def _show(page, name: str, wait_ms: float = 200) -> bool:
    tab = page.get_by_role("tab", name=name, exact=True).filter(visible=True).first
    try:
        tab.wait_for(state="visible", timeout=wait_ms)
        tab.click()
        return True
    except sync_api.TimeoutError:
        pass
    for more in page.locator("button[aria-label='More tabs']").filter(visible=True).all():
        more.click()
        item = page.locator(".overflow-dropdown button").filter(has_text=re.compile(rf"^\s*{re.escape(name)}\s*$"))
        if item.count() and item.first.is_visible():
            item.first.click()
            return True
        more.click()  # close the menu again
    return False


TABLE_JS = """(id) => {
    const root = document.querySelector(`#${id}`);
    const heads = new Map();
    root.querySelectorAll('th[role=columnheader]').forEach(
        th => heads.set(th.dataset.heading, (th.getAttribute('title') ?? th.innerText).trim()));
    const rows = [...root.querySelectorAll('[role=row].virtual-row')]
        .sort((a, b) => Number(a.dataset.index) - Number(b.dataset.index))
        .map(row => [...row.querySelectorAll('[role=gridcell]')].map(cell => cell.innerText.trim()));
    return {heads: [...heads.values()], rows};
}"""


def table(page, elem_id: str) -> list[dict[str, str]]:
    """The rows of the gr.Dataframe ``elem_id`` as shown: one {header: cell text} per row."""
    shown = page.evaluate(TABLE_JS, elem_id)
    return [dict(zip(shown["heads"], row)) for row in shown["rows"]]


def plot_data(page, elem_id: str) -> list[dict]:
    """The traces of the plotly chart in ``#elem_id``: name, x, y."""
    rendered_plot(page, elem_id)
    return page.evaluate("""(id) => document.querySelector(`#${id} .js-plotly-plot`).data.map(
        d => ({name: d.name || '', x: Array.from(d.x || []), y: Array.from(d.y || [])}))""", elem_id)


def text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def bullets(page, elem_id: str) -> list[str]:
    return [t.strip() for t in page.locator(f"#{elem_id} li").all_inner_texts()]


def held_in_status(page) -> list[str]:
    """The variants the status line says this session holds, in its order (oldest first)."""
    shown = status_line(page).inner_text()
    found = re.search(r"Variants \d+ of \d+: (.+?)(?: — full|$)", shown, re.M)
    return found.group(1).split(", ") if found else []


def number(cell: str) -> float:
    return float(re.search(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", cell.replace(",", "")).group())


def parse_duration(shown: str) -> float:
    """Seconds of the first 'about …' figure in ``shown``: '45 s', '3 min 20 s', '1 h 05 min'."""
    found = re.search(r"(\d+) h (\d+) min|(\d+) min (\d+) s|(\d+) s\b", shown)
    assert found, f"no duration in {shown!r}"
    h, hm, m, ms, s = (int(g) if g else 0 for g in found.groups())
    return 3600 * h + 60 * hm + 60 * m + ms + s


def says(sentence: str, pattern: str, *values: float, within: float = 6e-4) -> None:
    """``sentence`` matches ``pattern`` and the numbers it captures are ``values`` as shown rounded
    (the tables keep more digits than the sentences)."""
    found = re.search(pattern, sentence)
    assert found, f"{pattern!r} not in {sentence!r}"
    shown = [float(g) for g in found.groups()]
    assert all(abs(a - b) <= within for a, b in zip(shown, values, strict=True)), (sentence, values)


def token(label: str) -> str:
    """A token as a sentence quotes it or a plot labels it, spaces made visible either way."""
    return label.strip("'\"").replace("␣", " ").strip()


# -- watching progress ------------------------------------------------------------------------------
RECORDER_JS = """() => {
    window.__progress = []; window.__rows = [];
    const last = {}; let rows = {};
    clearInterval(window.__recorder);
    window.__recorder = setInterval(() => {
        const now = performance.now() / 1000;
        document.querySelectorAll('.progress-level-inner').forEach(el => {
            const block = el.closest('.block'); const id = block ? block.id : '';
            const shown = el.textContent.trim();
            if (shown && last[id] !== shown) { last[id] = shown; window.__progress.push([now, id, shown]); }
        });
        document.querySelectorAll('[data-watch-rows]').forEach(el => {
            const n = el.querySelectorAll('[role=row].virtual-row').length;
            if (rows[el.id] !== n) { rows[el.id] = n; window.__rows.push([now, el.id, n]); }
        });
    }, 100);
}"""


class Job:
    """Times one job from its click to ``done`` and records every progress line shown meanwhile."""

    def __init__(self, page, *, rows_of: str | None = None) -> None:
        self.page = page
        if rows_of:
            page.locator(f"#{rows_of}").evaluate("el => el.setAttribute('data-watch-rows', '1')")
        page.evaluate(RECORDER_JS)
        self.page_start = page.evaluate("performance.now() / 1000")
        self.started = time.monotonic()

    def finish(self) -> float:
        """Seconds since the click; stops recording."""
        self.seconds = time.monotonic() - self.started
        self.page_end = self.page.evaluate("clearInterval(window.__recorder), performance.now() / 1000")
        self.progress = self.page.evaluate("window.__progress")
        self.rows = self.page.evaluate("window.__rows")
        return self.seconds

    def check_progress(self, what: str) -> list[int]:
        """One progress bar for the job; its '… 53 % …' never goes back; its 'about 40 s left' once half
        done is not wildly off the time that was really left. Returns the percents shown."""
        assert self.progress, f"{what}: no progress line was shown"
        per_element: dict[str, list[tuple[float, str]]] = {}
        for at, elem, shown in self.progress:
            per_element.setdefault(elem, []).append((at, shown))
        assert len(per_element) == 1, f"{what}: a progress bar on each of {sorted(per_element)}"
        busiest: list[int] = []
        for elem, lines in per_element.items():
            shares = [int(m.group(1)) for _, s in lines if (m := re.search(r"(\d+) % ·", s))]
            assert shares == sorted(shares), f"{what}: the progress on #{elem} went back: {shares}"
            for at, shown in lines:
                share, left = re.search(r"(\d+) % ·", shown), re.search(r"about (.+) left", shown)
                if share and left and int(share.group(1)) >= 50:
                    really = self.page_end - at
                    assert parse_duration(left.group(1)) <= 3 * really + 15, \
                        f"{what}: '{shown}' with {really:.0f} s really left"
            busiest = max(busiest, shares, key=len)
        return busiest


def check_estimate(what: str, estimate: float, actual: float) -> None:
    """The estimate shown before the job is within 2× of the time it took (plus a round trip)."""
    print(f"{what}: estimate {estimate:.0f} s, actual {actual:.1f} s ({actual / max(estimate, 1e-9):.2f}×)")
    assert estimate / 2 - SLACK_S <= actual <= 2 * estimate + SLACK_S, \
        f"{what}: estimated {estimate:.0f} s, took {actual:.1f} s"


# -- the Tour: its sentences against its numbers ----------------------------------------------------
def check_step3(page) -> None:
    """'agree on X % … two random choices would share Y %' against the overlap bars and the dashed line."""
    shown = text(page, "tour-3-out")
    agree = re.search(r"agree on ([\d.]+) %", shown)
    chance = re.search(r"two random choices would share ([\d.]+) %", shown)
    bars, line = plot_data(page, "tour-3-plot")[:2]
    assert abs(float(agree.group(1)) - 100 * statistics.mean(bars["y"])) < 0.06, shown
    assert abs(float(chance.group(1)) - 100 * line["y"][0]) < 0.06, shown
    assert float(agree.group(1)) > float(chance.group(1))  # the page's claim: far above chance


def check_step4(page) -> dict[str, float]:
    """The live sentence against the live table, each calibration-draw sentence against the draws table."""
    live = {r["criterion"]: r for r in table(page, "tour-4-table")}
    kl = {c: number(r["KL to original (nats/token)"]) for c, r in live.items()}
    assert set(kl) == {"entropy", "cross_entropy"}, live
    better, worse = sorted(kl, key=kl.get)
    sentence = text(page, "tour-4-live")
    ppl = {c: number(r["perplexity (original → cut)"].split("→")[1]) for c, r in live.items()}
    assert f"{better.replace('_', '-')}'s cut came out closer" in sentence, sentence
    says(sentence, r"\(KL ([\d.]+) vs ([\d.]+),", kl[better], kl[worse])
    says(sentence, r"perplexity ([\d.]+) vs ([\d.]+)\)", ppl[better], ppl[worse], within=0.06)
    draws = {r["removed"]: r for r in table(page, "tour-4-draws-table")}
    average = draws["30 %"]["closer on average"].split(",")[0]
    assert ("the opposite of the average" in sentence) == (average != better), (sentence, average)
    if average == better:
        assert ("inside the calibration noise" in sentence) == draws["30 %"]["ranges overlap"].startswith("yes")
    for line in bullets(page, "tour-4-draws-out"):
        check_draw_sentence(line, draws)
    return kl


def check_draw_sentence(line: str, draws: dict[str, dict]) -> None:
    found = re.match(r"At (\d+) %, ([\w-]+)'s cut is on average ([\d.]+) % closer.*?\(KL ([\d.]+ ± [\d.]+) vs "
                     r"([\d.]+ ± [\d.]+) over (\d+) draws\)", line)
    if found:
        row = draws[f"{found.group(1)} %"]
        closer, gap = row["closer on average"].split(", by ")
        assert closer.replace("_", "-") == found.group(2) and gap == f"{found.group(3)} %", (line, row)
        kls = sorted(v for k, v in row.items() if k.startswith("KL "))
        assert sorted([found.group(4), found.group(5)]) == kls, (line, row)
        wins, total = row["draws it is closer in"].split(" of ")
        every = wins == total
        assert ("closer in every one of them" in line) == every, (line, row)
        if not every:
            assert f"closer in only {wins} of the {total} draws" in line, (line, row)
        inside = row["ranges overlap"].startswith("yes")
        assert ("inside the calibration noise" in line) == inside, (line, row)
        assert ("beyond the calibration noise" in line) == (not inside), (line, row)
        return
    found = re.match(r"At (\d+) %, the two criteria scored on the same draw remove (\d+) % of the same neurons", line)
    if found:
        row = draws[f"{found.group(1)} %"]
        assert row["same neurons removed: criteria, same draw"] == f"{found.group(2)} %", (line, row)
        within = {k.split("two draws of ")[1].replace("_", "-"): v for k, v in row.items() if "two draws of" in k}
        for name, share in within.items():
            assert f"two draws of {name} share {share}" in line, (line, row)
        assert f"would share {row['…: chance']}" in line, (line, row)
        across = number(row["same neurons removed: criteria, same draw"])
        assert ("changes the cut more than which of the two criteria" in line) == \
            (across > max(number(v) for v in within.values())), (line, row)


def menu_top1(page, elem_id: str) -> dict[str, tuple[str, float, str]]:
    """{model: (its most likely token, probability, legend)} from a next-token menu plot."""
    out = {}
    for bar in plot_data(page, elem_id):
        best = max(range(len(bar["y"])), key=lambda i: bar["y"][i])
        out[bar["name"].split(" (H=")[0]] = (token(bar["x"][best]), bar["y"][best], bar["name"])
    return out


def check_step5(page) -> None:
    """'**name**: top-1 'tok' (P %), prediction entropy H nats' against the menu plot."""
    top = menu_top1(page, "tour-5-plot")
    summary = text(page, "tour-5-out")
    for part in summary.split(" · "):
        found = re.match(r"(\S+): top-1 (.+) \((\d+) %\), prediction entropy ([\d.]+) nats", part.strip())
        assert found, summary
        name, tok, share, entropy = found.groups()
        assert top[name][0] == token(tok) and f"{100 * top[name][1]:.0f}" == share, (part, top[name])
        assert f"H={entropy} nats" in top[name][2], (part, top[name])


def check_step6(page) -> None:
    """Step 6's sentences against its table (KL per model) and its menu plot (each model's top token)."""
    rows = table(page, "tour-6-table")
    kl = {r["variant"]: number(r["KL to original (nats/token)"]) for r in rows}
    names = [r["variant"] for r in rows]
    assert len(names) == 4 and names[0] == "original", names
    _, cut, refit, recovered = names
    lines = bullets(page, "tour-6-out")
    refit_line = next(line for line in lines if line.startswith("The least-squares refit"))
    assert ("down from" in refit_line) == (kl[refit] < kl[cut]), (refit_line, kl)
    says(refit_line, r"from ([\d.]+) to ([\d.]+)", kl[cut], kl[refit])
    recovery_line = next(line for line in lines if "of recovery" in line)
    assert ("took KL down from" in recovery_line) == (kl[recovered] < kl[refit]), (recovery_line, kl)
    says(recovery_line, r"from ([\d.]+) to ([\d.]+)", kl[refit], kl[recovered])
    top = menu_top1(page, "tour-6-plot")
    menu_line = next(line for line in lines if line.startswith("The original puts"))
    said = re.match(r"The original puts (.+?) first \((\d+) %\)", menu_line)
    assert token(said.group(1)) == top["original"][0] and said.group(2) == f"{100 * top['original'][1]:.0f}", \
        (menu_line, top)
    favourite = top["original"][0]
    back = next((n for n in (refit, recovered) if top[n][0] == favourite), None) if top[cut][0] != favourite else None
    assert ("is back on top" in menu_line) == (back is not None), (menu_line, top)


def tour_steps_1_to_5(page, timings: dict) -> None:
    open_tab(page, "Tour")
    page.locator("#tour-1").click()
    expect(page.locator("#tour-1-out")).to_contain_text("precomputed")
    page.locator("#tour-2").click()
    rendered_plot(page, "tour-2-plot")
    page.locator("#tour-3").click()
    expect(page.locator("#tour-3-out")).to_contain_text("two random choices would share")
    check_step3(page)
    job = Job(page)
    page.locator("#tour-4").click()
    expect(page.locator("#tour-4-live")).to_contain_text("came out closer")
    timings["tour step 4"] = job.finish()
    job.check_progress("Tour step 4")
    check_step4(page)
    page.locator("#tour-5").click()
    expect(page.locator("#tour-5-out")).to_contain_text("top-1")
    check_step5(page)


def heal_the_cut(page, timings: dict) -> None:
    """The Tour's step 6: its estimate against its time, its sentences against its table and menus."""
    open_tab(page, "Tour")
    job = Job(page)
    page.locator("#tour-6").click()
    expect(page.locator("#tour-6-out")).to_contain_text("Estimated time")
    estimate = parse_duration(text(page, "tour-6-out").split("about", 1)[1])
    expect(page.locator("#tour-6-out")).to_contain_text("Measured on the same", timeout=300_000)
    timings["tour step 6"] = job.finish()
    job.check_progress("Tour step 6")
    check_estimate("Tour step 6", estimate, job.seconds)
    check_step6(page)
    expect(status_line(page)).to_contain_text("Variants 4 of 4")


# -- the sweep, Measure, Prune twice, Quantize -------------------------------------------------------
def sweep_with_defaults(page, timings: dict) -> None:
    """The sweep's defaults (both Tour criteria and the random baseline × 0.2, 0.3, 0.4): its estimate
    against its time, its progress monotone."""
    open_tab(page, "Prune")
    accordion = page.locator("#sweep-accordion button").first
    if not page.locator("#sweep-ratios").is_visible():
        accordion.click()
    expect(page.locator("#sweep-estimate")).to_contain_text("for 9 rows")
    estimate = parse_duration(text(page, "sweep-estimate"))
    job = Job(page, rows_of="sweep-table")
    page.locator("#sweep-button").click()
    expect(page.locator("#sweep-note")).to_contain_text("9 of 9 rows measured")
    timings["sweep"] = job.finish()
    shares = job.check_progress("sweep")
    assert len(set(shares)) >= 3, shares  # the line moved while the rows came in
    check_estimate("sweep", estimate, job.seconds)


def measure_with_defaults(page, timings: dict) -> None:
    """Measure with its defaults (the original and the two variants held, 5 s per model): a row per model,
    each within the time per model shown before Start (the budget, or what the fewest repeats need on this
    machine when that is longer), the whole within 2× of the estimate shown."""
    open_tab(page, "Quantize & measure")
    expect(page.locator("#bench-estimate")).to_contain_text("models ×")
    shown = text(page, "bench-estimate")
    models, each = re.search(r"About (\d+) models × (.+?), with the perplexity ≈", shown).groups()
    models, each = int(models), parse_duration(each)
    estimate = parse_duration(shown.split("≈", 1)[1])
    job = Job(page, rows_of="bench-table")
    page.locator("#bench-button").click()
    note = page.locator("#bench-note")
    expect(note).to_contain_text(f"{models} of {models} models measured")
    expect(note).not_to_contain_text("Measuring")
    timings["measure"] = job.finish()
    job.check_progress("Measure")
    counts = [(at, n) for at, _, n in job.rows]
    assert [n for _, n in counts if n] == list(range(1, models + 1)), f"rows did not appear one by one: {counts}"
    appeared = [job.page_start] + [at for at, n in counts if n]
    gaps = [b - a for a, b in zip(appeared, appeared[1:])]
    print(f"Measure: {models} models, {each:.0f} s each, rows after {[round(g, 1) for g in gaps]} s")
    assert max(gaps) <= 1.5 * each + SLACK_S + 5, (gaps, each)  # the first gap holds the warm-up
    assert appeared[-1] - job.page_start <= models * each * 1.5 + SLACK_S + 5, (gaps, each)
    check_estimate("Measure", estimate, job.seconds)


def prune_twice_with_defaults(page) -> list[str]:
    """Prune with every default twice (name left empty): two variants, the second named '-2'."""
    open_tab(page, "Prune")
    page.locator("#compensate input").uncheck()  # the plain cut: quicker than the default refit, same naming
    page.get_by_label("Variant name").fill("")
    status = page.locator("#prune-status")
    page.locator("#prune-button").click()
    expect(status).to_contain_text(re.compile(r"Pruned \S+: .*Quality at a glance", re.S))
    first = re.search(r"Pruned (\S+):", text(page, "prune-status")).group(1)
    page.locator("#prune-button").click()
    expect(status).to_contain_text(f"Pruned {first}-2:")
    expect(status).to_contain_text("Quality at a glance")
    made = [first, f"{first}-2"]
    held = [r["name"] for r in table(page, "variants-table")]
    assert made[0] in held and made[1] in held, held
    expect(status_line(page)).to_contain_text(f"{first}, {first}-2")
    assert held_in_status(page) == held, (held_in_status(page), held)
    return made


def quantize_keeps_its_source(page) -> None:
    """With four variants held, quantize the oldest one (the one a full session drops first): it stays."""
    held = [r["name"] for r in table(page, "variants-table")]
    assert len(held) == 4, held
    source = held[0]
    open_tab(page, "Quantize & measure")
    box = page.get_by_label("Quantize this model")
    box.click()
    page.get_by_role("option", name=source, exact=True).click()
    page.locator("#quantize-button").click()
    expect(page.locator("#quantize-status")).to_contain_text(f"Made {source}+")
    said = text(page, "quantize-status")
    made = re.search(r"Made (\S+);", said).group(1)
    dropped = re.search(r"'(.+?)' was dropped to make room", said)
    assert dropped and dropped.group(1) != source, said
    expect(status_line(page)).to_contain_text(made)
    now = held_in_status(page)
    assert source in now and made in now and dropped.group(1) not in now and len(now) == 4, now


def test_the_dashboard_keeps_its_word_beside_a_cpu_burner(burner, request):
    page, timings = request.getfixturevalue("browser_page"), {}  # the module's page, started beside the burner
    began = time.monotonic()
    tour_steps_1_to_5(page, timings)
    sweep_with_defaults(page, timings)
    measure_with_defaults(page, timings)  # the original and the Tour's two cuts
    heal_the_cut(page, timings)
    started = time.monotonic()
    prune_twice_with_defaults(page)
    timings["prune twice"] = time.monotonic() - started
    started = time.monotonic()
    quantize_keeps_its_source(page)
    timings["quantize"] = time.monotonic() - started
    timings["whole walk"] = time.monotonic() - began
    print({k: round(v, 1) for k, v in timings.items()})
    assert all(proc.poll() is None for proc in burner)  # the burner ran the whole time
