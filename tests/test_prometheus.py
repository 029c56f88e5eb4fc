"""deploy/prometheus and the dashboards against the real thing: promtool, and a Prometheus server
(Debian package ``prometheus``) that scrapes a live run of real coordinator and worker processes.

Without promtool or prometheus these tests fail, saying how to install them (.ci/run does).
The server is started by the module's fixture on a free loopback port with a config made from
deploy/prometheus/prometheus.yml (same jobs and paths, the live run's targets, a 1 s scrape
interval) and stopped at teardown like every other process here.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import Fleet, log_tail, stop_process
from metrics_support import (
    PROMETHEUS_YML,
    Query,
    dashboard_queries,
    grafana_to_promql,
    require_binary,
)

COORDINATOR_JOB, WORKER_JOB = "fedfleet-coordinator", "fedfleet-worker"
SCRAPE_INTERVAL = "1s"
RATE_WINDOW = "30s"  # what $__rate_interval stands for here: many 1 s scrapes
BUDGET = 90.0  # seconds to wait for Prometheus to have what a test looks for, before failing
TIMEOUT = 30.0


def free_port() -> int:
    # The port is free when this returns; Prometheus and the worker bind it right after.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_promtool_checks_the_deploy_config() -> None:
    promtool = require_binary("promtool")
    r = subprocess.run([promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr
    jobs = {j["job_name"] for j in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]}
    assert jobs == {COORDINATOR_JOB, WORKER_JOB}


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every dashboard expression, as Grafana would send it, parses: promtool checks it as a rule."""
    promtool = require_binary("promtool")
    queries = dashboard_queries()
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"fedfleet_dashboard_query_{i}", "expr": grafana_to_promql(q.expr, RATE_WINDOW)}
        for i, q in enumerate(queries)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules, indent=1))  # JSON is YAML
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(queries)} rules found" in r.stdout, r.stdout


# --- a live run scraped by a real Prometheus -----------------------------------------------------
@dataclass
class Live:
    prometheus: str  # Prometheus's URL
    coordinator: str  # the coordinator's scrape target, host:port
    worker: str  # the worker's scrape target

    def query(self, promql: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": promql}, timeout=TIMEOUT)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{promql}: {r.text[:500]}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, promql: str) -> list[dict[str, Any]]:
        """The query's result once it is not empty; fails after BUDGET seconds."""
        end = time.monotonic() + BUDGET
        while True:
            result = self.query(promql)
            if result:
                return result
            assert time.monotonic() < end, f"Prometheus had nothing for {promql!r} after {BUDGET:g} s"
            time.sleep(0.25)


def scrape_config(coordinator: str, worker: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the live run's targets and a short scrape interval."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval=SCRAPE_INTERVAL, scrape_timeout=SCRAPE_INTERVAL,
                            evaluation_interval=SCRAPE_INTERVAL)
    targets = {COORDINATOR_JOB: coordinator, WORKER_JOB: worker}
    for job in config["scrape_configs"]:
        for key in [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]:
            del job[key]
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    return config


@pytest.fixture(scope="module")
def live(module_fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    promtool, prometheus = require_binary("promtool"), require_binary("prometheus")
    # Far more rounds than the tests need: the run is still going whenever Prometheus scrapes.
    coord = module_fleet.coordinator("--task", "songs", "--workers", "2", "--rounds", "1000000", "--linger", "0")
    metrics_port = free_port()
    module_fleet.worker(coord.url, "--metrics-port", str(metrics_port), clients=2)
    targets = coord.url.removeprefix("http://"), f"127.0.0.1:{metrics_port}"
    tmp = tmp_path_factory.mktemp("prometheus")
    config_path = tmp / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(scrape_config(*targets)))
    check = subprocess.run([promtool, "check", "config", str(config_path)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    log_path = tmp / "prometheus.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [prometheus, f"--config.file={config_path}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + BUDGET
        while True:
            assert proc.poll() is None, f"prometheus exited with {proc.returncode}:\n{log_tail(log_path)}"
            try:
                if httpx.get(f"{url}/-/ready", timeout=5.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, f"prometheus was not ready after {BUDGET:g} s:\n{log_tail(log_path)}"
            time.sleep(0.1)
        yield Live(url, *targets)
    finally:
        stop_process(proc)


def test_prometheus_scrapes_the_coordinator_and_a_worker(live: Live) -> None:
    up = live.wait_for(f'up{{job="{COORDINATOR_JOB}"}} == 1')
    assert up[0]["metric"]["instance"] == live.coordinator
    up = live.wait_for(f'up{{job="{WORKER_JOB}"}} == 1')
    assert up[0]["metric"]["instance"] == live.worker
    rounds = live.wait_for(f'fedfleet_rounds_completed_total{{job="{COORDINATOR_JOB}"}} > 0')
    assert float(rounds[0]["value"][1]) > 0
    accuracy = live.wait_for("fedfleet_global_accuracy_ratio")
    assert 0 < float(accuracy[0]["value"][1]) <= 1
    train = live.wait_for(f'fedfleet_worker_train_duration_seconds_count{{job="{WORKER_JOB}"}} > 0')
    assert train[0]["metric"]["instance"] == live.worker
    clients = live.wait_for("fedfleet_worker_clients")
    assert float(clients[0]["value"][1]) == 2
    memory = live.wait_for(f'process_resident_memory_bytes{{job="{WORKER_JOB}"}} > 0')
    assert float(memory[0]["value"][1]) > 10 * 1024 * 1024  # a Python process with numpy loaded


def panel_queries() -> dict[str, list[Query]]:
    panels: dict[str, list[Query]] = {}
    for q in dashboard_queries():
        panels.setdefault(f"{q.dashboard} / {q.panel}", []).append(q)
    return panels


@pytest.mark.parametrize("panel", sorted(panel_queries()))
def test_every_dashboard_panel_shows_data_from_a_live_run(live: Live, panel: str) -> None:
    """Each panel (and variable) gets data: every query runs, and at least one returns series.

    Some queries are empty by design while all is well (rejected updates, filtered with > 0), so a
    panel passes when any of its queries has data.
    """
    queries = [grafana_to_promql(q.expr, RATE_WINDOW) for q in panel_queries()[panel]]
    end = time.monotonic() + BUDGET
    while True:
        results = [live.query(q) for q in queries]
        if any(results):
            break
        assert time.monotonic() < end, f"{panel}: no data from any of {queries} after {BUDGET:g} s"
        time.sleep(0.5)
