"""The live dashboard's views of issue 17, as a person sees them in Chromium (Playwright), against real
coordinators, workers and ``fedfleet serve``: every width from a phone to a wide screen, a run blocked
waiting for workers, a worker killed mid-run, round time, bytes and time left, each worker's learning
(heat maps, label mix), the confusion matrix, the accuracy axis, and the PNG and CSV exports.

The fixtures (``browser``, ``page``, ``screenshot``, ``served_run``) are tests/test_web_browser.py's.
"""

from __future__ import annotations

import csv
import io
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from conftest import Coordinator, Fleet, Worker
from fedfleet.tasks.songs import ERAS
from test_web import TIMEOUT, fedfleet, start_serve
from test_web_browser import WAIT_MS, browser, page, screenshot, served_run  # noqa: F401 (fixtures)

WIDTHS = (360, 390, 768, 1280, 1920)
LIVE_ROUNDS = 5000  # never reached: the run is live for the whole module and stopped at its end


@pytest.fixture(scope="module")
def live_run(module_fleet: Fleet) -> Iterator[Coordinator]:
    """A live run on a skewed partition (each worker's labels mostly one or two eras), 4 workers, with rounds
    done: the heat map shows the workers' spread."""
    coord = module_fleet.coordinator("--workers", "4", "--rounds", str(LIVE_ROUNDS), "--partition", "dirichlet:0.3",
                                     "--local-epochs", "2", "--seed", "3")
    module_fleet.worker(coord.url, clients=4)
    end = time.monotonic() + WAIT_MS / 1000
    while httpx.get(f"{coord.url}/v1/status", timeout=TIMEOUT).json()["round"] < 8:
        assert time.monotonic() < end, "the live run did not reach round 8"
        time.sleep(0.2)
    yield coord


def open_dashboard(page: Any, url: str, rounds: int = 1) -> None:  # noqa: F811 (the fixture's name)
    page.goto(url + "/")
    page.wait_for_function(f"rounds.length >= {rounds} && workerHistory !== null "
                           f"&& workerHistory.rounds.length >= {rounds}")


def test_the_dashboard_fits_every_width(browser: Any, live_run: Coordinator,  # noqa: F811
                                        served_run: tuple[str, Path], tmp_path: Path) -> None:  # noqa: F811
    for url, kind in ((live_run.url, "live"), (served_run[0], "finished")):
        for width in WIDTHS:
            context = browser.new_context(viewport={"width": width, "height": 900})
            try:
                pg = context.new_page()
                pg.set_default_timeout(WAIT_MS)
                open_dashboard(pg, url, 3)
                pg.wait_for_selector("#workers tbody tr[data-worker]")
                pg.wait_for_selector("#label-mix .mix-row")
                wide = pg.evaluate("document.documentElement.scrollWidth")
                assert wide <= width, f"the {kind} run's dashboard is {wide} px wide at {width} px"
                # Nothing of the header, cards or panels sticks out of the page: the tables scroll in their panel.
                out = pg.evaluate("""[...document.querySelectorAll('header, .card, .panel, canvas')]
                    .filter((e) => e.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5)
                    .map((e) => e.id || e.className)""")
                assert out == [], (kind, width, out)
                # No card's number or line is cut short with an ellipsis: each fits, or wraps.
                cut = pg.evaluate("""[...document.querySelectorAll('.card .value, .card .sub')]
                    .filter((e) => e.scrollWidth > e.clientWidth).map((e) => e.id + ': ' + e.textContent)""")
                assert cut == [], (kind, width, cut)
                if kind == "live" and width in (390, 1280):
                    # The wide picture down to the confusion matrix; the phone's, its first screens.
                    name, until = ("dashboard.png", "#confusion-panel") if width == 1280 else \
                        ("dashboard-phone.png", "#chart-loss")
                    pg.mouse.move(0, 0)
                    shot = screenshot(pg, tmp_path, name, until)
                    assert shot.stat().st_size > 10_000
            finally:
                context.close()


def test_a_run_waiting_for_workers_says_who_is_missing_and_when_it_fails(page: Any, fleet: Fleet,  # noqa: F811
                                                                         tmp_path: Path) -> None:
    coord = fleet.coordinator("--workers", "2", "--rounds", "3", "--wait-timeout", "300")
    fleet.worker(coord.url, clients=1)
    page.goto(coord.url + "/")
    # The coordinator lists who is missing at most once a second, so the list can lag the live count a moment.
    page.wait_for_function("status && status.waiting && status.waiting.live === 1 "
                           "&& status.waiting.waiting_for[0] === '1 partition with no worker yet'")
    waiting = httpx.get(f"{coord.url}/v1/status", timeout=TIMEOUT).json()["waiting"]
    assert page.is_visible("#waiting")
    assert page.text_content("#waiting-text") == ("1 of the 2 live workers needed to start the next round is here. "
                                                  "Missing:")
    missing = page.locator("#waiting-for li").all_text_contents()
    assert missing == waiting["waiting_for"] == ["1 partition with no worker yet"]
    # The countdown runs to the time the wait fails, and it counts down in the page, between events.
    countdown = page.text_content("#waiting-countdown")
    m = re.fullmatch(r"The run fails in (\d+):(\d\d) \(at .+\) unless they come\.", countdown)
    assert m, countdown
    assert 0 < 60 * int(m[1]) + int(m[2]) <= waiting["fails_at"] - time.time() + 1
    page.wait_for_function(f"document.getElementById('waiting-countdown').textContent !== {json.dumps(countdown)}")
    # Neither the badge nor the connection dot looks healthy without saying the run waits.
    assert page.text_content("#run-state") == "waiting for workers"
    assert page.get_attribute("#run-state", "class") == "badge waiting"
    assert page.text_content("#conn-text") == "live · waiting for workers"
    assert "waiting" in page.get_attribute("#conn", "class")
    # The phase is whole: it wraps in its card (no ellipsis) and is its tooltip too.
    phase = page.text_content("#phase")
    assert phase.startswith("waiting for workers") and page.get_attribute("#phase", "title") == phase
    assert page.evaluate("(e => e.scrollWidth <= e.clientWidth)(document.getElementById('phase'))")
    # No round yet: the charts draw no made-up axis (it read -50 % to 150 %).
    ticks = page.evaluate("[charts.accuracy.ticks, charts.loss.ticks, charts.time.ticks, charts.bytes.ticks]")
    assert ticks == [[]] * 4
    assert page.is_hidden("#per-worker") and page.is_hidden("#confusion-panel")
    assert page.text_content("#eta-detail") == "known after the first round"
    screenshot(page, tmp_path, "dashboard-waiting.png")

    # The second worker comes: the explanation goes and the run runs.
    fleet.worker(coord.url, clients=1)
    page.wait_for_function("rounds.length >= 1")
    assert page.is_hidden("#waiting")
    assert page.text_content("#run-state") in ("running", "finished")


def test_a_worker_killed_mid_run_shows_as_silent(page: Any, fleet: Fleet, tmp_path: Path) -> None:  # noqa: F811
    coord = fleet.coordinator("--workers", "2", "--rounds", "1000", "--round-timeout", "300", "--worker-timeout", "30")
    fleet.worker(coord.url, clients=1, name="kept")
    victim: Worker = fleet.worker(coord.url, clients=1, name="victim")
    page.goto(coord.url + "/")
    page.wait_for_function("rounds.length >= 2")
    victim.kill(signal.SIGKILL)
    row = page.locator("#workers tbody tr", has=page.locator("td", has_text=re.compile(r"^victim")))
    # Sampled in the open round, never answering: "silent" long before --worker-timeout makes it dead, and
    # never "training" once the coordinator has not heard from it for longer than a live worker stays quiet.
    row.locator(".badge.silent").wait_for()
    assert row.locator(".badge").text_content() == "silent"
    assert "probably stopped" in row.locator(".badge").get_attribute("title")
    assert re.fullmatch(r"round \d+: 1 of 2 answered(, \d needed)?; waiting on 1 silent \(probably stopped\)",
                        page.text_content("#open-round"))
    kept = page.locator("#workers tbody tr", has=page.locator("td", has_text=re.compile(r"^kept")))
    assert kept.locator(".badge").text_content() == "idle"
    screenshot(page, tmp_path, "dashboard-silent.png", "#workers")


def test_round_time_bytes_and_time_left(page: Any, live_run: Coordinator) -> None:  # noqa: F811
    open_dashboard(page, live_run.url, 3)
    shown = page.evaluate("""({n: rounds.length, round: Number(document.getElementById('round').textContent),
        bytes: Number(document.getElementById('bytes-total').dataset.bytes),
        eta: Number(document.getElementById('eta').dataset.seconds),
        last: document.getElementById('round-time').textContent})""")
    records = httpx.get(f"{live_run.url}/v1/dashboard", timeout=TIMEOUT).json()["rounds"][:shown["n"]]
    assert shown["round"] == shown["n"] == records[-1]["round"]
    assert shown["bytes"] == sum(r["bytes_in"] + r["bytes_out"] for r in records) > 0
    recent = [r["seconds"] for r in records[-10:]]
    assert shown["eta"] == pytest.approx(sum(recent) / len(recent) * (LIVE_ROUNDS - shown["round"]))
    assert re.fullmatch(r"\d+ ms|\d+\.\d s", shown["last"])
    assert page.text_content("#eta").startswith("≈ ")
    # The charts of time and bytes hold the same rounds, on axes that start at zero or above.
    assert page.evaluate("charts.time.rows.length") >= shown["n"]
    assert page.evaluate("Math.min(...charts.time.ticks) >= 0 && Math.min(...charts.bytes.ticks) >= 0")


def test_each_workers_learning_heat_map_and_label_mix(page: Any, live_run: Coordinator) -> None:  # noqa: F811
    open_dashboard(page, live_run.url, 5)
    # Read together: the page fetches a newer history as rounds complete.
    history, heat = page.evaluate("[workerHistory, heat.score.rows.map(r => ({label: r.label, values: r.values}))]")
    api = httpx.get(f"{live_run.url}/v1/dashboard/workers", params={"offset": 0, "limit": 100},
                    timeout=TIMEOUT).json()
    assert history["total"] == api["total"] == 4
    # The page drew what the endpoint serves (the endpoint has since gained rounds, not changed old ones).
    n = len(history["rounds"])
    assert api["rounds"][:n] == history["rounds"]
    assert [r["label"] for r in heat] == [w["partition"] for w in api["workers"]]
    for row, w in zip(heat, api["workers"], strict=True):
        assert row["values"] == w["val_accuracy"][:n]
    # Skewed partitions: the workers' own scores differ, which is what the map is for.
    last = [w["val_accuracy"][n - 1] for w in api["workers"] if w["val_accuracy"][n - 1] is not None]
    assert max(last) - min(last) > 0.05, last

    # Pointing at a cell reads it out.
    i, j = next((i, j) for i, w in enumerate(api["workers"]) for j in range(n - 1, -1, -1)
                if w["val_accuracy"][j] is not None)
    page.locator("#heat-score").scroll_into_view_if_needed()
    box = page.locator("#heat-score").bounding_box()
    cell = page.evaluate(f"heat.score.cellCentre({i}, {j})")
    page.mouse.move(box["x"] + cell["x"], box["y"] + cell["y"])
    w = api["workers"][i]
    assert page.text_content("#heat-score-readout") == (
        f"{w['partition']} ({w['name']}) · round {history['rounds'][j]}: validation accuracy "
        f"{100 * w['val_accuracy'][j]:.2f}%")
    assert page.evaluate("heat.loss.rows.length") == 4 and page.is_visible("#heat-loss")

    # Each worker's label mix: the task's class names, and its counts as the widths of its bar.
    assert page.locator("#label-legend span").all_text_contents() == api["classes"] == list(ERAS)
    rows = page.locator("#label-mix .mix-row")
    assert rows.count() == 4
    for k, w in enumerate(api["workers"]):
        counts = w["label_counts"]
        assert rows.nth(k).locator(".who").text_content() == w["partition"]
        assert rows.nth(k).locator(".n").text_content() == f"{w['examples']:,}"
        titles = rows.nth(k).locator(".stack i").evaluate_all("(xs) => xs.map((x) => x.title)")
        want = [f"{api['classes'][c]}: {n_c} ({100 * n_c / sum(counts):.1f}%)" for c, n_c in enumerate(counts) if n_c]
        assert titles == want
    # The spread of the workers' validation scores is a band on the accuracy chart.
    band = page.evaluate("charts.accuracy.rows.filter(r => r.fed_accuracy_min != null)"
                         ".map(r => [r.fed_accuracy_min, r.fed_accuracy_max])")
    assert band and all(lo <= hi for lo, hi in band) and any(hi - lo > 0.05 for lo, hi in band)


def test_each_workers_history_is_fetched_by_its_new_rounds_only(page: Any, live_run: Coordinator) -> None:  # noqa: F811
    """The page asks v1/dashboard/workers for the rounds after those it holds (rounds_from), gets only
    those, and appends them: the heat map still shows every round, each worker's values in line."""
    answers: list[Any] = []
    page.on("response", lambda r: answers.append(r) if "/v1/dashboard/workers?" in r.url else None)
    open_dashboard(page, live_run.url, 5)
    held = page.evaluate("workerHistory.rounds.length")
    # Rounds keep completing in the live run: wait until the page appended some to what it held.
    page.wait_for_function(f"workerHistory.rounds.length > {held}")
    history, columns, heat = page.evaluate(
        "[workerHistory, heat.score.columns, heat.score.rows.map(r => r.values)]")
    fetched = [(parse_qs(urlsplit(r.url).query), r.json()) for r in list(answers)]
    assert fetched[0][0]["rounds_from"] == ["0"] and fetched[0][1]["rounds_from"] == 0
    later = [(q, body) for q, body in fetched[1:] if int(q["rounds_from"][0]) > 0]
    assert later, [q for q, _ in fetched]
    api = httpx.get(f"{live_run.url}/v1/dashboard/workers", timeout=TIMEOUT).json()
    for query, body in later:
        start = int(query["rounds_from"][0])
        # Only the new rounds, and every worker's series as long as they are.
        assert body["rounds_from"] == start and body["rounds"] == api["rounds"][start:start + len(body["rounds"])]
        for w in body["workers"]:
            assert len(w["val_accuracy"]) == len(w["train_loss"]) == len(body["rounds"]), w
    # What the page holds and draws is every round from the first, each worker's values as the server has them.
    n = len(history["rounds"])
    assert history["rounds"] == api["rounds"][:n] and columns == api["rounds"][:n]
    assert heat == [w["val_accuracy"][:n] for w in api["workers"]]
    # The endpoint on its own: rounds_from slices rounds and series alike; a negative one is refused.
    tail = httpx.get(f"{live_run.url}/v1/dashboard/workers", params={"rounds_from": 3}, timeout=TIMEOUT).json()
    assert tail["rounds_from"] == 3 and tail["rounds"][0] == api["rounds"][3]
    for w, whole in zip(tail["workers"], api["workers"], strict=True):  # (asked later: it may have more)
        assert len(w["val_accuracy"]) == len(tail["rounds"])
        assert w["val_accuracy"][:len(whole["val_accuracy"]) - 3] == whole["val_accuracy"][3:]
        assert w["label_counts"] == whole["label_counts"] and w["examples"] == whole["examples"]
    bad = httpx.get(f"{live_run.url}/v1/dashboard/workers", params={"rounds_from": -1}, timeout=TIMEOUT)
    assert bad.status_code == 422 and "rounds_from" in bad.text


def test_no_link_to_a_run_list_on_a_coordinators_or_a_single_runs_pages(page: Any, live_run: Coordinator,  # noqa: F811
                                                                        served_run: tuple[str, Path]) -> None:  # noqa: F811
    """Only `fedfleet serve RUNS/` serves runs from a list: a coordinator's own pages and a single run served
    say there is none (v1/links), and the pages show no "All runs" link."""
    for url in (live_run.url, served_run[0]):
        assert httpx.get(f"{url}/v1/links", timeout=TIMEOUT).json() == {"run_list": None}
        for path in ("/", "/predict"):
            page.goto(url + path)
            page.wait_for_function("runListShown !== null")
            page.evaluate("runListShown")  # the page has heard v1/links and acted on it
            assert page.locator("nav a").all_text_contents() == ["Dashboard", "Predict"], (url, path)
            assert page.locator("#run-list-link").count() == 0


def test_the_confusion_matrix_of_the_last_round(page: Any, live_run: Coordinator) -> None:  # noqa: F811
    open_dashboard(page, live_run.url, 2)
    page.wait_for_selector("#confusion tbody tr")
    # Read at one moment: the live run replaces the table as rounds complete.
    caption, head, body = page.evaluate("""[document.getElementById('confusion-round').textContent,
        [...document.querySelectorAll('#confusion thead th')].map((c) => c.textContent),
        [...document.querySelectorAll('#confusion tbody tr')].map((r) => [...r.children].map((c) => c.textContent))]""")
    m = re.match(r"round (\d+),", caption)
    assert m, caption
    shown_round = int(m[1])
    record = httpx.get(f"{live_run.url}/v1/dashboard", timeout=TIMEOUT).json()["rounds"][shown_round - 1]
    cm = record["confusion"]
    assert record["round"] == shown_round and cm["classes"] == list(ERAS)
    assert head == ["true \\ predicted", *cm["classes"], "recall"]
    assert body == [[cm["classes"][i], *map(str, counts), f"{100 * counts[i] / sum(counts):.1f}%"]
                    for i, counts in enumerate(cm["counts"])]


def test_a_run_without_a_confusion_matrix_hides_it(page: Any, served_run: tuple[str, Path]) -> None:  # noqa: F811
    url, run_dir = served_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    open_dashboard(page, url, len(records))
    assert records[-1].get("confusion") is not None  # the songs task classifies: the matrix is there...
    assert page.is_visible("#confusion-panel")
    page.evaluate("rounds[rounds.length - 1] = {...rounds[rounds.length - 1], confusion: null}; renderConfusion()")
    assert page.is_hidden("#confusion-panel")  # ... and a record without one hides it


def test_the_accuracy_axis_auto_or_0_to_100_remembered(page: Any, served_run: tuple[str, Path]) -> None:  # noqa: F811
    url, _ = served_run
    open_dashboard(page, url, 3)
    auto = page.evaluate("charts.accuracy.ticks")
    assert auto[0] >= 0 and auto[-1] <= 1 and (auto[0], auto[-1]) != (0, 1)  # fitted to the values
    assert page.get_attribute("#scale-auto", "aria-pressed") == "true"
    page.click("#scale-full")
    assert page.evaluate("[charts.accuracy.ticks[0], charts.accuracy.ticks.at(-1)]") == [0, 1]
    page.reload()
    page.wait_for_function("rounds.length >= 3")
    assert page.get_attribute("#scale-full", "aria-pressed") == "true"
    assert page.evaluate("[charts.accuracy.ticks[0], charts.accuracy.ticks.at(-1)]") == [0, 1]
    page.click("#scale-auto")
    assert page.evaluate("charts.accuracy.ticks") == auto
    assert page.evaluate("localStorage.getItem('fedfleet.accuracyAxis')") == "auto"
    # The change in the last round is never cut at 1280 px: the card's line wraps rather than ending in "…".
    change = page.locator("#accuracy-change")
    assert re.fullmatch(r"[+−]\d+\.\d\d points in the last round", change.text_content())
    assert change.evaluate("(e) => e.scrollWidth <= e.clientWidth && getComputedStyle(e).textOverflow !== 'ellipsis'")


def test_charts_download_as_png_and_rounds_as_csv(page: Any, served_run: tuple[str, Path],  # noqa: F811
                                                  tmp_path: Path) -> None:
    url, run_dir = served_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    run_id = json.loads((run_dir / "summary.json").read_text())["run_id"]
    open_dashboard(page, url, len(records))

    with page.expect_download() as info:
        page.click("#export-csv")
    download = info.value
    assert download.suggested_filename == f"fedfleet-{run_id}-rounds.csv"
    text = Path(download.path()).read_text()
    lines = text.splitlines()
    assert len(lines) == len(records) + 1  # a header and one line a round
    rows = list(csv.DictReader(io.StringIO(text)))
    for row, rec in zip(rows, records, strict=True):
        assert int(row["round"]) == rec["round"]
        assert float(row["accuracy"]) == rec["accuracy"] and int(row["bytes_in"]) == rec["bytes_in"]
        assert float(row["timings.open"]) == rec["timings"]["open"]
        assert float(row["worker_metrics.train_loss"]) == rec["worker_metrics"]["train_loss"]
    assert "confusion" not in rows[0]  # a matrix is no scalar: it is left out

    for canvas in ("chart-accuracy", "chart-bytes", "heat-score"):
        with page.expect_download() as info:
            page.click(f"button.png[data-canvas='{canvas}']")
        download = info.value
        assert download.suggested_filename == f"fedfleet-{run_id}-{canvas.removeprefix('chart-')}.png"
        data = Path(download.path()).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert [width, height] == page.evaluate(f"[document.getElementById('{canvas}').width, "
                                                f"document.getElementById('{canvas}').height]")


def test_without_validation_the_heat_map_colours_by_training_loss(page: Any, tmp_path: Path) -> None:  # noqa: F811
    run_dir = tmp_path / "run"
    r = fedfleet("run", "--workers", "2", "--rounds", "2", "--val-fraction", "0", "--out", str(run_dir), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    proc, url = start_serve(run_dir)
    try:
        open_dashboard(page, url, 2)
        api = httpx.get(f"{url}/v1/dashboard/workers", timeout=TIMEOUT).json()
        assert all(v is None for w in api["workers"] for v in w["val_accuracy"])  # no validation split
        assert page.text_content("#heat-title") == "Each worker's local training loss by round (no validation split)"
        assert page.evaluate("heat.score.rows.map(r => r.values)") == [w["train_loss"] for w in api["workers"]]
        assert page.evaluate("heat.score.options.higherIsBetter") is False
        # The second map would repeat the first: hidden.
        assert page.is_hidden("#heat-loss-panel")
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)


def test_the_coordinators_validation_scores_are_drawn_only_in_a_run_that_has_them(
        page: Any, served_run: tuple[str, Path], tmp_path: Path) -> None:  # noqa: F811
    label = "validation (coordinator's)"
    url, _ = served_run  # no --server-val: the series is neither in the legend nor in the read-out
    open_dashboard(page, url, 3)
    assert label not in page.evaluate("charts.accuracy.shownSeries().map(s => s.label)")
    assert label in page.evaluate("charts.accuracy.series.map(s => s.label)")

    val_dir = tmp_path / "val"
    r = fedfleet("run", "--workers", "2", "--rounds", "3", "--server-val", "2000", "--out", str(val_dir), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    records = [json.loads(line) for line in (val_dir / "metrics.jsonl").read_text().splitlines()]
    proc, val_url = start_serve(val_dir)
    try:
        open_dashboard(page, val_url, 3)
        for chart, key in (("accuracy", "val_accuracy"), ("loss", "val_loss")):
            assert label in page.evaluate(f"charts.{chart}.shownSeries().map(s => s.label)")
            drawn = page.evaluate(f"charts.{chart}.rows.map(row => charts.{chart}.series"
                                  f".find(s => s.key === '{key}').value(row))")
            assert drawn == [rec[key] for rec in records] and all(v > 0 for v in drawn)
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)
