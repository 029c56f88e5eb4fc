"""``fedfleet serve --run DIR`` loads only built-in tasks and those given with ``--allow-task``.

Issue 12, item 6: the task named in DIR/config.toml was imported and called, so a run folder from
someone else could run their code (``task = "os:system"`` with ``command`` in its task options ran
a shell command). Each test serves a copy of one real finished run whose config.toml names a task
that leaves a marker file if any of its code runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import run_fedfleet

TIMEOUT = 30.0
YESTERDAY = {"danceability": 0.332, "energy": 0.179, "key": 5, "loudness": -11.83, "mode": 1, "speechiness": 0.0326,
             "acousticness": 0.879, "instrumentalness": 0.0, "liveness": 0.0886, "valence": 0.315, "tempo": 96.529,
             "duration_ms": 125667, "time_signature": 4, "chorus_hit": 26.05427, "sections": 7}
# A task module of this test's own: importing it leaves the marker. Its task predicts like songs.
MARKER_MODULE = '''
import os
from pathlib import Path

Path(os.environ["FEDFLEET_TEST_MARKER"]).write_text("imported")

from fedfleet.tasks.songs import SongsTask


class MarkerTask(SongsTask):
    name = "marker"
'''


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "run"
    r = run_fedfleet("run", "--task", "songs", "--workers", "2", "--rounds", "2", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def run_naming(finished: Path, tmp_path: Path, task: str, options: dict[str, str] | None = None) -> Path:
    """A copy of the finished run whose config.toml names ``task`` (with ``options``)."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    config = run / "config.toml"
    text, n = re.subn(r'(?m)^task = ".*"$', f'task = "{task}"', config.read_text())
    assert n == 1
    if options:
        text = text.rstrip("\n") + "\n\n[task_options]\n" + "".join(f'{k} = "{v}"\n' for k, v in options.items())
    config.write_text(text)
    return run


@contextmanager
def serving(run: Path, tmp_path: Path, *args: str) -> Iterator[tuple[httpx.Client, list[str]]]:
    """A real ``fedfleet serve --run RUN --port 0 ARGS`` with this test's task module importable; yields a
    client and, once the process stopped, its output lines."""
    modules = tmp_path / "modules"
    modules.mkdir(exist_ok=True)
    (modules / "marker_task.py").write_text(MARKER_MODULE)
    env = {**os.environ, "PYTHONPATH": str(modules), "FEDFLEET_TEST_MARKER": str(tmp_path / "marker")}
    proc = subprocess.Popen([sys.executable, "-m", "fedfleet", "serve", "--run", str(run), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    assert proc.stdout is not None
    output: list[str] = []
    try:
        line = proc.stdout.readline()
        output.append(line)
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert match is not None, line + proc.stdout.read()
        with httpx.Client(base_url=match.group(0), timeout=TIMEOUT) as http:
            yield http, output
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=TIMEOUT)
        finally:
            proc.kill()  # a no-op once it exited
            # Read through the text wrapper, not with communicate(): that reads the pipe beneath it and
            # loses what readline() above had already buffered. The output is a few lines.
            output.extend(proc.stdout.read().splitlines())
            proc.stdout.close()


def assert_dashboard_works(http: httpx.Client, task: str) -> None:
    r = http.get("/v1/dashboard")
    assert r.status_code == 200, r.text
    dashboard = r.json()
    assert dashboard["status"]["task"] == task and dashboard["status"]["state"] == "finished"
    assert [rec["round"] for rec in dashboard["rounds"]] == [1, 2]
    assert http.get("/v1/status").json()["round"] == 2
    assert "fedfleet · dashboard" in http.get("/").text
    assert http.get("/predict").status_code == 200  # the page; it shows the API's refusal


def assert_prediction_refused(http: httpx.Client, task: str) -> None:
    for r in (http.post("/v1/predict", json={"songs": [YESTERDAY]}), http.get("/v1/predict"),
              http.get("/v1/songs", params={"q": "yesterday"})):
        assert r.status_code == 409, r.text
        detail = r.json()["detail"]
        assert f"prediction needs this run's task {task!r}, which fedfleet serve does not load unless allowed" in detail
        assert f"pass --allow-task {task} to load it" in detail


def test_a_run_naming_os_system_is_served_without_running_it(finished: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    run = run_naming(finished, tmp_path, "os:system", {"command": f"touch {marker}"})
    with serving(run, tmp_path) as (http, output):
        assert_dashboard_works(http, "os:system")
        assert_prediction_refused(http, "os:system")
    assert not marker.exists()
    assert any("prediction does not: prediction needs this run's task 'os:system'" in line for line in output), output


def test_a_task_module_named_by_the_run_is_not_even_imported(finished: Path, tmp_path: Path) -> None:
    run = run_naming(finished, tmp_path, "marker_task:MarkerTask")
    with serving(run, tmp_path) as (http, _):
        assert_dashboard_works(http, "marker_task:MarkerTask")
        assert_prediction_refused(http, "marker_task:MarkerTask")
    assert not (tmp_path / "marker").exists()


def test_allow_task_loads_it(finished: Path, tmp_path: Path) -> None:
    run = run_naming(finished, tmp_path, "marker_task:MarkerTask")
    with serving(run, tmp_path, "--allow-task", "marker_task:MarkerTask") as (http, output):
        assert_dashboard_works(http, "marker_task:MarkerTask")
        r = http.post("/v1/predict", json={"songs": [YESTERDAY]})
        assert r.status_code == 200, r.text
        assert r.json()["round"] == 2
    assert (tmp_path / "marker").read_text() == "imported"  # the check above could see an import
    assert not any("prediction does not" in line for line in output), output


def test_an_allowed_task_that_fails_to_load_says_why(finished: Path, tmp_path: Path) -> None:
    run = run_naming(finished, tmp_path, "no_such_module_here:Task")
    with serving(run, tmp_path, "--allow-task", "no_such_module_here:Task") as (http, _):
        assert_dashboard_works(http, "no_such_module_here:Task")
        r = http.get("/v1/predict")
        assert r.status_code == 409
        assert "cannot import task module 'no_such_module_here'" in r.json()["detail"]


def test_built_in_tasks_need_no_allow_task(finished: Path, tmp_path: Path) -> None:
    with serving(finished, tmp_path) as (http, output):
        r = http.post("/v1/predict", json={"songs": [YESTERDAY]})
        assert r.status_code == 200, r.text
    assert not any("prediction does not" in line for line in output), output


def test_serve_help_names_allow_task() -> None:
    r = run_fedfleet("serve", "--help", timeout=60)
    assert r.returncode == 0
    assert "--allow-task MODULE:CLASS" in r.stdout and "loading a task runs its code" in " ".join(r.stdout.split())
