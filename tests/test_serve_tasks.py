"""``fedfleet serve --run DIR`` loads only built-in tasks and those given with ``--allow-task``; serve's access
options (admin token, TLS, Host check) are the coordinator's.

Issue 12, item 6: the task named in DIR/config.toml was imported and called, so a run folder from
someone else could run their code (``task = "os:system"`` with ``command`` in its task options ran
a shell command). Each test serves a copy of one real finished run whose config.toml names a task
that leaves a marker file if any of its code runs.
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import run_fedfleet
from test_serve_runs import start_serve, stop

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


# --- the coordinator's access options (issue 17, item 13) -----------------------------------------
# `fedfleet serve` takes --admin-token-file (or FEDFLEET_ADMIN_TOKEN), --tls-cert/--tls-key and
# --allowed-hosts, through the coordinator's own middleware and TLS protocol.
ADMIN = "serve-admin-" + "k" * 30


@pytest.fixture(scope="module")
def runs_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding one quick finished run, ``a`` (fedfleet simulate: a few seconds)."""
    root = tmp_path_factory.mktemp("serve-access") / "runs"
    r = run_fedfleet("simulate", "--task", "songs", "--workers", "2", "--rounds", "2", "--out", str(root / "a"),
                     "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    return root


def test_an_admin_token_closes_everything_but_health_and_signs_in_by_cookie(runs_folder: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN + "\n")
    proc, url = start_serve(str(runs_folder), "--admin-token-file", str(token_file))
    try:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
            assert http.get("/v1/health").status_code == 200
            assert http.get("/v1/session").json() == {"auth": True, "signed_in": False}
            for path in ("/v1/runs", "/runs/a/v1/status", "/runs/a/v1/dashboard", "/compare"):
                r = http.get(path)
                assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), (path, r.text)
            assert http.get("/v1/runs", headers={"Authorization": "Bearer wrong-" + "x" * 20}).status_code == 401
            page = http.get("/", headers={"Accept": "text/html"})
            assert page.status_code == 401 and "<form" in page.text
            bearer = {"Authorization": f"Bearer {ADMIN}"}
            assert [r["name"] for r in http.get("/v1/runs", headers=bearer).json()["runs"]] == ["a"]
            assert http.get("/runs/a/v1/status", headers=bearer).json()["round"] == 2
            signed = http.post("/login", data={"token": ADMIN})
            assert signed.status_code == 303
        with httpx.Client(base_url=url, cookies=signed.cookies, timeout=TIMEOUT) as browser:
            assert "fedfleet · runs" in browser.get("/").text
            assert browser.get("/runs/a/v1/dashboard").json()["status"]["round"] == 2
            assert browser.get("/v1/session").json() == {"auth": True, "signed_in": True}
    finally:
        stop(proc)


def test_a_single_run_takes_the_token_from_the_environment(runs_folder: Path) -> None:
    proc, url = start_serve("--run", str(runs_folder / "a"), env={"FEDFLEET_ADMIN_TOKEN": ADMIN})
    try:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
            assert http.get("/v1/dashboard").status_code == 401
            r = http.get("/v1/dashboard", headers={"Authorization": f"Bearer {ADMIN}"})
            assert r.status_code == 200 and r.json()["status"]["round"] == 2
    finally:
        stop(proc)


def test_serve_speaks_https_with_a_certificate_from_fedfleet_certs(runs_folder: Path, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    assert run_fedfleet("certs", "--out", str(certs), timeout=60).returncode == 0
    proc, url = start_serve(str(runs_folder), "--tls-cert", str(certs / "server.pem"), "--tls-key",
                            str(certs / "server-key.pem"))
    try:
        assert url.startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        r = httpx.get(f"{url}/v1/runs", verify=trusted, timeout=TIMEOUT)
        assert r.status_code == 200 and [run["name"] for run in r.json()["runs"]] == ["a"]
        assert httpx.get(f"{url}/runs/a/v1/status", verify=trusted, timeout=TIMEOUT).json()["round"] == 2
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/v1/runs", timeout=TIMEOUT)  # the system's CAs do not know ours
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https://", "http://") + "/v1/runs", timeout=TIMEOUT)  # no plain http on it
    finally:
        stop(proc)


def test_a_host_that_is_not_the_servers_is_refused(runs_folder: Path) -> None:
    proc, url = start_serve(str(runs_folder), "--allowed-hosts", "runs.example,*.lab.example")
    try:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
            r = http.get("/v1/runs", headers={"Host": "evil.example"})
            assert r.status_code == 421 and "'evil.example' is not a name of this" in r.json()["detail"]
            assert http.get("/runs/a/", headers={"Host": "evil.example:8080"}).status_code == 421
            for host in ("runs.example", "gpu1.lab.example:443", "localhost", "127.0.0.1"):
                assert http.get("/v1/runs", headers={"Host": host}).status_code == 200, host
    finally:
        stop(proc)


def test_beyond_loopback_without_an_admin_token_serve_refuses_to_start(runs_folder: Path, tmp_path: Path) -> None:
    r = run_fedfleet("serve", str(runs_folder), "--host", "0.0.0.0", "--port", "0", timeout=60)
    assert r.returncode == 2
    assert "refusing to serve on 0.0.0.0 without an admin token" in r.stderr and "--insecure" in r.stderr
    bad = tmp_path / "short.token"
    bad.write_text("short\n")
    r = run_fedfleet("serve", str(runs_folder), "--admin-token-file", str(bad), "--port", "0", timeout=60)
    assert r.returncode == 2 and "admin token must be at least 16 characters" in r.stderr, r.stderr
    r = run_fedfleet("serve", str(runs_folder), "--tls-cert", str(bad), "--port", "0", timeout=60)
    assert r.returncode == 2 and "--tls-cert and --tls-key go together" in r.stderr, r.stderr
