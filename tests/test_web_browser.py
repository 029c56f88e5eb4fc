"""The dashboard and the predict page as a person uses them: Playwright drives Debian's headless Chromium.

Chromium comes from Debian (``apt-get install -y chromium``, done by .ci/run) and Playwright from PyPI
(the dev extras); ``playwright install`` is never run, since it downloads a browser and this project's
machines reach no host but the package registries. Chromium is started with its background
networking off for the same reason: otherwise it keeps trying to reach Google's hosts.

Each test saves a screenshot of its page in its tmp dir (a test artefact). With
FEDFLEET_UPDATE_SCREENSHOTS=1 it also copies it to docs/screenshots/, where the README's pictures come
from; a plain test run never writes into the source tree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Coordinator
from test_predict_tabular import write_sites
from test_web import TIMEOUT, fedfleet, start_serve

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
WAIT_MS = 90_000  # longest wait for the page to show something; a hang fails instead of stalling the suite


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need the Python package 'playwright' (in the dev extras: "
                    "pip install -e '.[dev]'); do not run 'playwright install', Debian's chromium is used",
                    pytrace=False)
    if not CHROMIUM.is_file():
        pytest.fail(f"the browser tests need Debian's Chromium at {CHROMIUM}: "
                    "apt-get update && apt-get install -y chromium", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page; it fails the test if the page logged an error (a 422 the page shows is no error)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    pg.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    pg.set_default_timeout(WAIT_MS)
    try:
        yield pg
        # Checked before closing: closing cuts the dashboard's event stream, which Chromium logs.
        # It logs every 4xx answer too; a 422 is the server explaining bad input, which the page shows.
        assert [e for e in errors if "status of 422" not in e] == [], errors
    finally:
        context.close()


def screenshot(page: Any, tmp_path: Path, name: str, until: str | None = None) -> Path:
    """The whole page, or with ``until`` (a selector) the page from its top to that element's bottom: a long
    page's picture stays small."""
    path = tmp_path / name
    if until is None:
        page.screenshot(path=str(path), full_page=True)
    else:
        bottom = page.locator(until).evaluate("(e) => e.getBoundingClientRect().bottom + window.scrollY")
        width = page.evaluate("document.documentElement.clientWidth")
        page.screenshot(path=str(path), full_page=True, clip={"x": 0, "y": 0, "width": width, "height": bottom + 14})
    if os.environ.get("FEDFLEET_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOTS / name)
    return path


def shown_round(page: Any) -> int:
    return int(page.text_content("#round"))


def test_dashboard_shows_rounds_advancing_during_a_live_run(page: Any, coordinator: Any, worker: Any,
                                                            tmp_path: Path) -> None:
    # Many rounds of several local epochs: the run is still going when the page has looked twice.
    coord: Coordinator = coordinator("--workers", "2", "--rounds", "200", "--local-epochs", "3")
    worker(coord.url, clients=2)
    api_requests: list[str] = []
    page.on("request", lambda req: api_requests.append(req.url) if "/v1/" in req.url else None)

    page.goto(coord.url + "/")
    page.wait_for_function("Number(document.getElementById('round').textContent) >= 1")
    first = shown_round(page)
    page.wait_for_function(f"Number(document.getElementById('round').textContent) > {first}")
    second = shown_round(page)
    assert second > first >= 1
    # A few more rounds, so that the charts in the screenshot have lines to show.
    page.wait_for_function("Number(document.getElementById('round').textContent) >= 8")

    assert page.text_content("#rounds") == "200"
    assert page.text_content("#run-state") == "running"
    assert page.text_content("#conn-text") == "live"
    # The charts hold every round shown so far, and the round on the page is the coordinator's.
    assert page.evaluate("rounds.map(r => r.round)") == list(range(1, page.evaluate("rounds.length") + 1))
    status = httpx.get(f"{coord.url}/v1/status", timeout=TIMEOUT).json()
    assert status["state"] == "running" and status["round"] >= shown_round(page) >= 8
    rows = page.locator("#workers tbody tr")
    assert rows.count() == 2
    for i, part in enumerate(["part-000-of-002", "part-001-of-002"]):
        cells = [c.strip() for c in rows.nth(i).locator("td").all_text_contents()]
        assert cells[2] == part and cells[3] in ("training", "idle")
        assert int(cells[5]) >= 1  # rounds served
        assert re.fullmatch(r"\d+ ms|\d+\.\d s", cells[6]), cells  # last train time, from its update
    config = dict(zip(page.locator("#config .k").all_text_contents(), page.locator("#config .v").all_text_contents(),
                      strict=True))
    assert config["rounds"] == "200" and config["workers"] == "2" and config["local_epochs"] == "3"
    # A run without differential privacy shows nothing about it.
    assert page.is_hidden("#dp-card") and page.is_hidden("#dp-chart")
    # Pushed, not polled: every change came down the one event stream the page opened. Besides it, the page
    # asks only for each worker's history (when the rounds changed, at most once a second, only the rounds it
    # does not hold yet: the heat maps and label mix) and, once each, who is signed in and where it links to.
    assert api_requests.count(f"{coord.url}/v1/events") == 1
    history = f"{coord.url}/v1/dashboard/workers?offset=0&limit=100&rounds_from="
    histories = [u for u in api_requests if u.startswith(history)]
    once = {f"{coord.url}/v1/events", f"{coord.url}/v1/session", f"{coord.url}/v1/links"}
    assert set(api_requests) - set(histories) <= once
    assert all(api_requests.count(u) == 1 for u in once)
    assert 1 <= len(histories) <= page.evaluate("rounds.length")

    shot = screenshot(page, tmp_path, "dashboard-iid.png")
    assert shot.stat().st_size > 10_000


def test_dashboard_shows_the_epsilon_a_dp_run_spent(page: Any, tmp_path: Path) -> None:
    pytest.importorskip("dp_accounting")
    run_dir = tmp_path / "run"
    r = fedfleet("run", "--workers", "2", "--rounds", "3", "--dp", "central", "--dp-clip", "0.5",
                 "--dp-noise-multiplier", "1.0", "--dp-max-epsilon", "50", "--out", str(run_dir), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    dp = json.loads((run_dir / "summary.json").read_text())["dp"]
    spent = [json.loads(line)["dp_epsilon"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    proc, url = start_serve(run_dir)
    try:
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('run-state').textContent === 'finished'")
        assert page.is_visible("#dp-card") and page.is_visible("#chart-epsilon")
        assert page.text_content("#dp-epsilon") == f"ε {dp['epsilon']:.3g} of 50"
        assert page.text_content("#dp-detail") == "δ 1e-5 · σ 1 · clip 0.5"
        # The chart draws the epsilon each round recorded.
        assert page.evaluate("charts.epsilon.rows.map(r => r.dp_epsilon)") == spent and spent[-1] == dp["epsilon"]
        # Under differential privacy the workers send no label counts (they would get around the noise): the
        # label mix says why it is empty.
        page.wait_for_function("workerHistory !== null")
        assert "differential privacy" in page.text_content("#label-mix .empty")
        assert page.locator("#label-mix .mix-row").count() == 0
        screenshot(page, tmp_path, "dashboard-dp.png")
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def served_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A finished run (3 rounds) and the URL of `fedfleet serve` serving it."""
    run_dir = tmp_path_factory.mktemp("browser") / "run"
    r = fedfleet("run", "--workers", "2", "--rounds", "3", "--out", str(run_dir), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    proc, url = start_serve(run_dir)
    try:
        yield url, run_dir
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)


def pick_song(page: Any, url: str, query: str, title: str, artist: str) -> None:
    page.goto(url + "/predict")
    search = page.locator("#song-search")
    search.wait_for(state="visible")  # shown once the page knows the run's task offers a song search
    search.press_sequentially(query, delay=30)  # typed, as a person would
    match = page.locator("#song-results li", has_text=artist).filter(has_text=title).first
    match.click()
    page.wait_for_function("document.querySelectorAll('#probabilities .prob').length === 3")
    assert page.is_visible("#search-panel")  # the songs task offers its search


@pytest.fixture(scope="module")
def served_tabular(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A finished tabular run (two sites split from one file, 2 rounds) and the URL of `fedfleet serve` serving it."""
    folder = tmp_path_factory.mktemp("tabular")
    a, _, test = write_sites(folder / "data")
    run_dir = folder / "run"
    r = fedfleet("run", "--task", "tabular", "--task-option", "label=churned", "--workers", "2", "--rounds", "2",
                 "--lr", "0.1", "--data-split", str(a), "--test-data", str(test), "--out", str(run_dir), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    proc, url = start_serve(run_dir)
    try:
        yield url, run_dir
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)


@pytest.mark.parametrize("width", [360, 390])
def test_no_page_is_wider_than_a_phone(browser: Any, served_run: tuple[str, Path], served_tabular: tuple[str, Path],
                                       width: int) -> None:
    context = browser.new_context(viewport={"width": width, "height": 800})
    try:
        pg = context.new_page()
        pg.goto(served_run[0] + "/")
        pg.wait_for_selector("#workers tbody tr")
        assert pg.evaluate("document.documentElement.scrollWidth") <= width  # the table scrolls in its panel
        for url in (served_run[0], served_tabular[0]):
            pg.goto(url + "/predict")
            pg.wait_for_selector("#fields .field")
            pg.click("#predict-button")  # the answer, or the message, is on the page too
            pg.wait_for_selector("#error:not(:empty), #probabilities .prob")
            assert pg.evaluate("document.documentElement.scrollWidth") <= width, url
    finally:
        context.close()
