"""``fedfleet serve DIR`` on a folder of runs: the run list, each run's pages under /runs/NAME/, the compare view.

One folder of real runs (made by ``fedfleet simulate``, a few seconds each) holds runs that differ in
their options, one a level down, a folder that is no run and a run whose config.toml is damaged; a real
``fedfleet serve`` process serves it, and Chromium (fixtures of test_web_browser) reads its pages.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import run_fedfleet
from test_web_browser import browser, page, pick_song, screenshot  # noqa: F401  (fixtures, used by name)

TIMEOUT = 30.0
URL = re.compile(r"https?://127\.0\.0\.1:\d+")


def simulate(out: Path, *args: str) -> None:
    r = run_fedfleet("simulate", "--task", "songs", "--workers", "4", "--out", str(out), "--quiet", *args)
    assert r.returncode == 0, r.stdout + r.stderr


def start_serve(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """``fedfleet serve ARGS --port 0`` and the URL its first line gives (http or https)."""
    proc = subprocess.Popen([sys.executable, "-m", "fedfleet", "serve", *args, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = URL.search(line)
    if match is None:
        proc.kill()
        pytest.fail(f"fedfleet serve did not say where it listens: {line}{proc.stdout.read()}", pytrace=False)
    return proc, match.group(0)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=TIMEOUT)
    finally:
        proc.kill()  # a no-op once it exited
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/{iid, dirichlet, sweep/lr-0.2} (songs, 4 workers), runs/notes (no run), runs/broken (bad config)."""
    root = tmp_path_factory.mktemp("serve-runs") / "runs"
    simulate(root / "iid", "--rounds", "3")
    simulate(root / "dirichlet", "--rounds", "3", "--partition", "dirichlet:0.3")
    simulate(root / "sweep" / "lr-0.2", "--rounds", "4", "--lr", "0.2")
    (root / "notes" / "drafts").mkdir(parents=True)
    (root / "notes" / "drafts" / "todo.txt").write_text("not a run\n")
    shutil.copytree(root / "iid", root / "broken")
    (root / "broken" / "config.toml").write_text('task = "songs"\nrounds = "many"\n')
    return root


@pytest.fixture(scope="module")
def served(runs: Path) -> Iterator[str]:
    proc, url = start_serve(str(runs))
    try:
        yield url
    finally:
        stop(proc)


@pytest.fixture
def http(served: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served, timeout=TIMEOUT) as client:
        yield client


def by_name(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in body["runs"]}


def test_the_list_names_each_run_with_its_scores_and_the_options_that_differ(http: httpx.Client) -> None:
    body = http.get("/v1/runs").json()
    runs = by_name(body)
    assert sorted(runs) == ["broken", "dirichlet", "iid", "sweep/lr-0.2"]
    sweep = runs["sweep/lr-0.2"]
    assert (sweep["state"], sweep["task"], sweep["rounds"], sweep["rounds_planned"]) == ("finished", "songs", 4, 4)
    rounds = http.get("/v1/runs/sweep/lr-0.2").json()["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    scores = [r["score"] for r in rounds]
    assert sweep["final"] == scores[-1] and sweep["best"] == max(scores)
    assert sweep["best_round"] == scores.index(max(scores)) + 1
    assert re.fullmatch(r"[0-9a-f]{12}", sweep["run_id"]) and sweep["dashboard"] is True
    # What sets the runs apart, and nothing that does not (they share seed, workers, task...).
    assert set(body["differing"]) == {"rounds", "partition", "lr"}
    assert runs["dirichlet"]["options"]["partition"] == "dirichlet:0.3"
    # The damaged run is listed with its error; the folder with no run anywhere in it is skipped, named.
    assert runs["broken"]["state"] == "damaged" and "config.toml" in runs["broken"]["error"]
    assert body["skipped"] == [{"name": "notes", "why": "not a run: no config.toml in it or in its subfolders"}]


def test_each_run_has_its_dashboard_and_predict_page_under_its_name(http: httpx.Client) -> None:
    r = http.get("/runs/sweep/lr-0.2")
    assert r.status_code == 308 and r.headers["location"] == "/runs/sweep/lr-0.2/"  # relative URLs need the slash
    assert "fedfleet · dashboard" in http.get("/runs/sweep/lr-0.2/").text
    dashboard = http.get("/runs/sweep/lr-0.2/v1/dashboard").json()
    assert [rec["round"] for rec in dashboard["rounds"]] == [1, 2, 3, 4]
    assert dashboard["config"]["lr"] == 0.2
    assert http.get("/runs/iid/v1/status").json()["round"] == 3
    assert "fedfleet · predict" in http.get("/runs/iid/predict").text
    assert http.get("/runs/iid/static/dashboard.js").status_code == 200


def test_names_in_urls_are_only_those_of_the_list(http: httpx.Client, runs: Path) -> None:
    for path in ("/runs/notes/", "/runs/notes/drafts/todo.txt", "/runs/nope/", "/runs/%2e%2e/%2e%2e/etc/passwd",
                 "/runs/sweep/", "/runs/sweep/%2e%2e/iid/v1/status"):
        r = http.get(path)
        assert r.status_code == 404, (path, r.text)
        assert "in the folder served; the runs are listed at /" in r.json()["detail"]
    assert http.get("/v1/runs/..%2F..%2Fetc").status_code == 404
    # A damaged run has no dashboard, and says why.
    r = http.get("/runs/broken/v1/status")
    assert r.status_code == 409 and "run 'broken' has no dashboard" in r.json()["detail"]
    assert "rounds" in r.json()["detail"]
    assert http.get("/runs/broken/", headers={"Accept": "text/html"}).text.count('href="/">All runs') == 1


def test_a_run_made_after_start_is_listed_and_served_on_the_next_request(http: httpx.Client, runs: Path) -> None:
    late = runs / "late"
    shutil.copytree(runs / "iid", late)
    try:
        assert "late" in by_name(http.get("/v1/runs").json())
        assert http.get("/runs/late/v1/status").json()["round"] == 3
        shutil.copytree(runs / "iid", runs / "later")  # asked for by URL before the list is read again
        assert http.get("/runs/later/v1/status").json()["round"] == 3
    finally:
        shutil.rmtree(late)
        shutil.rmtree(runs / "later", ignore_errors=True)
    assert "late" not in by_name(http.get("/v1/runs").json())
    assert http.get("/runs/late/v1/status").status_code == 404


def test_a_run_without_a_summary_is_listed_as_running_or_incomplete(http: httpx.Client, runs: Path) -> None:
    cut = runs / "cut"
    shutil.copytree(runs / "iid", cut)
    (cut / "summary.json").unlink()  # as a run killed before it could write one
    try:
        row = by_name(http.get("/v1/runs").json())["cut"]
        assert (row["state"], row["rounds"], row["dashboard"], row["run_id"]) == ("incomplete", 3, False, None)
        r = http.get("/runs/cut/v1/status")
        assert r.status_code == 409 and "no summary.json" in r.json()["detail"]
        # A coordinator serving it writes its address there, and removes it on every way out.
        (cut / "coordinator.json").write_text('{"url": "http://127.0.0.1:1", "pid": 1}\n')
        assert by_name(http.get("/v1/runs").json())["cut"]["state"] == "running"
    finally:
        shutil.rmtree(cut)


def test_a_bad_path_is_a_cli_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-runs"
    r = run_fedfleet("serve", str(missing), "--port", "0", timeout=60)
    assert r.returncode == 2 and f"{missing} is not a folder" in r.stderr, r.stderr
    r = run_fedfleet("serve", str(tmp_path), "--run", str(tmp_path), timeout=60)
    assert r.returncode == 2 and "not both" in r.stderr, r.stderr
    r = run_fedfleet("serve", timeout=60)
    assert r.returncode == 2 and "PATH (a run, or a folder of runs) or --run RUN_DIR" in r.stderr, r.stderr


def test_the_run_list_page_picks_runs_to_compare(page: Any, served: str, runs: Path,  # noqa: F811
                                                 tmp_path: Path) -> None:
    page.goto(served + "/")
    page.wait_for_selector("#runs tbody tr td a")
    names = page.locator("#runs tbody td.run-name").all_text_contents()
    assert names == ["broken", "dirichlet", "iid", "sweep/lr-0.2"]
    assert page.text_content("#skipped summary") == "1 folder skipped: not runs"
    broken = page.locator("#runs tbody tr.damaged")
    assert "config.toml" in broken.locator("td.run-error").text_content()
    assert broken.locator("input").is_disabled()
    sweep = page.locator("#runs tbody tr", has_text="sweep/lr-0.2")
    cells = [c.strip() for c in sweep.locator("td").all_text_contents()]
    assert cells[2] == "finished" and cells[5] == "4 / 4" and cells[7] == "songs"
    assert re.fullmatch(r"\d\d\.\d%", cells[3]) and re.fullmatch(r"\d\d\.\d% \([1-4]\)", cells[4])  # final, best
    assert cells[6] == "rounds=4 · partition=iid · lr=0.2"
    assert str(runs) not in broken.text_content()  # the run's name, not the server's path
    assert page.get_attribute("#runs tbody tr:has-text('sweep/lr-0.2') a", "href") == "runs/sweep/lr-0.2/"
    shot = screenshot(page, tmp_path, "runs.png")
    assert shot.stat().st_size > 10_000

    page.check("input[data-name='iid']")
    page.check("input[data-name='sweep/lr-0.2']")
    assert page.text_content("#picked") == "2 picked"
    page.click("#compare-button")
    page.wait_for_selector("#legend tbody tr")
    assert page.url == served + "/compare?runs=iid,sweep%2Flr-0.2"
    assert page.text_content("#title") == "Compare 2 runs"
    # Each line is labelled by what differs between the two runs compared: rounds and lr, not partition.
    labels = page.locator("#legend td.label").all_text_contents()
    assert labels == ["rounds=3, lr=0.05", "rounds=4, lr=0.2"]
    assert page.evaluate("document.querySelectorAll('#charts canvas').length") == 2
    screenshot(page, tmp_path, "compare.png")


def test_the_compare_view_names_a_run_it_does_not_know(page: Any, served: str) -> None:  # noqa: F811
    page.goto(served + "/compare?runs=dirichlet,nope%2C1,iid")
    page.wait_for_selector("#legend tbody tr")
    assert page.text_content("#error") == 'No run named "nope,1" in this folder; the others are shown.'
    assert page.locator("#legend td.label").all_text_contents() == ["partition=dirichlet:0.3", "partition=iid"]


def test_a_run_dashboard_under_its_prefix_works_in_the_browser(page: Any, served: str, tmp_path: Path) -> None:  # noqa: F811
    page.goto(served + "/runs/sweep/lr-0.2/")
    page.wait_for_function("document.getElementById('round').textContent === '4'")
    assert page.text_content("#run-state") == "finished"
    # Served from the list, the run's pages link back to it, first in the nav (the server says where).
    assert httpx.get(served + "/runs/sweep/lr-0.2/v1/links", timeout=TIMEOUT).json() == {"run_list": "/"}
    back = page.wait_for_selector("nav #run-list-link")
    assert (back.text_content(), back.get_attribute("href")) == ("All runs", "/")
    assert page.locator("nav a").all_text_contents() == ["All runs", "Dashboard", "Predict"]
    for width, shot in ((1280, "run-dashboard-back.png"), (390, "run-dashboard-back-phone.png")):
        page.set_viewport_size({"width": width, "height": 800})
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        screenshot(page, tmp_path, shot, until=".title-row")
    page.set_viewport_size({"width": 1280, "height": 800})
    page.click("nav a[href='predict']")
    page.wait_for_url(served + "/runs/sweep/lr-0.2/predict")
    # The song search and the prediction go to runs/sweep/lr-0.2/v1/...: this run's task and model.
    pick_song(page, served + "/runs/sweep/lr-0.2", "yesterday beat", "Yesterday", "The Beatles")
    assert "after round 4" in page.text_content("#model-info")
    assert page.locator("nav a").all_text_contents() == ["All runs", "Dashboard", "Predict"]
    page.click("#run-list-link")
    page.wait_for_url(served + "/")
    page.wait_for_selector("#runs tbody tr td a")


@pytest.mark.parametrize("path,shot", [("/", "runs-phone.png"), ("/compare?runs=iid,dirichlet,sweep%2Flr-0.2",
                                                                   "compare-phone.png")])
def test_the_list_and_compare_pages_fit_a_phone(browser: Any, served: str, tmp_path: Path,  # noqa: F811
                                                path: str, shot: str) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844})
    try:
        pg = context.new_page()
        pg.goto(served + path)
        pg.wait_for_selector("#runs tbody tr td a, #legend tbody tr")
        for width in (390, 360):
            pg.set_viewport_size({"width": width, "height": 844})
            assert pg.evaluate("document.documentElement.scrollWidth") <= width, (path, width)
        pg.set_viewport_size({"width": 390, "height": 844})
        screenshot(pg, tmp_path, shot)
    finally:
        context.close()
