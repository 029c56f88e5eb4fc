"""deploy/prometheus and the dashboards against the real thing: promtool, and a Prometheus server
(Debian package ``prometheus``) that scrapes a live run of real coordinator and worker processes.

Without promtool or prometheus these tests fail, saying how to install them (.ci/run does).
The server is started by the module's fixture on a free loopback port with a config made from
deploy/prometheus/prometheus.yml (same jobs, paths and alert rules, the live run's targets, a 1 s
scrape interval) and stopped at teardown like every other process here. The dashboards are also
read against what the live processes' /metrics really export: names, types and units.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import Fleet
from metrics_support import (
    ALERTS_YML,
    BUDGET,
    DASHBOARDS,
    PROMETHEUS_YML,
    PrometheusAPI,
    Query,
    annotation_queries,
    counter_names,
    dashboard_queries,
    free_port,
    grafana_to_promql,
    metric_names,
    panels_of,
    prometheus_server,
    raw_counters,
    require_binary,
)

COORDINATOR_JOB, WORKER_JOB = "fedfleet-coordinator", "fedfleet-worker"
SCRAPE_INTERVAL = "1s"
RATE_WINDOW = "30s"  # what $__rate_interval stands for here: many 1 s scrapes
TIMEOUT = 30.0
OPENMETRICS = {"Accept": "application/openmetrics-text; version=1.0.0"}
SCRAPE_APART = 10.0  # seconds between the two scrapes of the linger test: it then waits up to 20 s for a third


def test_promtool_checks_the_deploy_config() -> None:
    promtool = require_binary("promtool")
    r = subprocess.run([promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert {j["job_name"] for j in config["scrape_configs"]} == {COORDINATOR_JOB, WORKER_JOB}
    # The alert rules beside it are loaded, and promtool checked them as part of the config.
    assert [PROMETHEUS_YML.parent / f for f in config["rule_files"]] == [ALERTS_YML]
    assert f"Checking {ALERTS_YML}" in r.stdout and "SUCCESS: 6 rules found" in r.stdout, r.stdout


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every dashboard expression, as Grafana would send it, parses: promtool checks it as a rule."""
    promtool = require_binary("promtool")
    queries = dashboard_queries() + annotation_queries()
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"fedfleet_dashboard_query_{i}", "expr": grafana_to_promql(q.expr, RATE_WINDOW)}
        for i, q in enumerate(queries)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules, indent=1))  # JSON is YAML
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(queries)} rules found" in r.stdout, r.stdout


# --- a live run: its /metrics, and a real Prometheus scraping it ---------------------------------
@dataclass
class Exporters:
    coordinator_url: str
    coordinator: str  # the coordinator's scrape target, host:port
    worker: str  # the worker's scrape target

    def text(self, target: str, headers: dict[str, str] | None = None) -> str:
        r = httpx.get(f"http://{target}/metrics", headers=headers, timeout=TIMEOUT)
        assert r.status_code == 200, r.text[:500]
        return r.text


@dataclass
class Live(PrometheusAPI):
    exporters: Exporters


@pytest.fixture(scope="module")
def exporters(module_fleet: Fleet) -> Exporters:
    # Far more rounds than the tests need: the run is still going whenever Prometheus scrapes.
    coord = module_fleet.coordinator("--task", "songs", "--workers", "2", "--rounds", "1000000", "--linger", "0")
    metrics_port = free_port()
    module_fleet.worker(coord.url, "--metrics-port", str(metrics_port), clients=2)
    found = Exporters(coord.url, coord.url.removeprefix("http://"), f"127.0.0.1:{metrics_port}")
    # Until both have done a round's work, some series have no samples yet.
    end = time.monotonic() + BUDGET
    while True:
        try:
            done = "fedfleet_worker_train_duration_seconds_count 0.0" not in found.text(found.worker) and \
                "fedfleet_rounds_completed_total 0.0" not in found.text(found.coordinator)
        except httpx.TransportError:
            done = False
        if done:
            return found
        assert time.monotonic() < end, f"no round done after {BUDGET:g} s:\n{module_fleet.logs()}"
        time.sleep(0.25)


def scrape_config(coordinator: str, worker: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the live run's targets, a short scrape interval, and its
    alert rules (named relative to it) by their path here."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval=SCRAPE_INTERVAL, scrape_timeout=SCRAPE_INTERVAL,
                            evaluation_interval=SCRAPE_INTERVAL)
    config["rule_files"] = [str(PROMETHEUS_YML.parent / f) for f in config["rule_files"]]
    targets = {COORDINATOR_JOB: coordinator, WORKER_JOB: worker}
    for job in config["scrape_configs"]:
        for key in [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]:
            del job[key]
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    return config


@pytest.fixture(scope="module")
def live(exporters: Exporters, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    config = scrape_config(exporters.coordinator, exporters.worker)
    with prometheus_server(config, tmp_path_factory.mktemp("prometheus")) as api:
        yield Live(api.url, exporters)


def run_id_of(live: Live) -> str:
    run_id: str = httpx.get(f"{live.exporters.coordinator_url}/v1/status", timeout=TIMEOUT).json()["run_id"]
    return run_id


def test_prometheus_scrapes_the_coordinator_and_a_worker(live: Live) -> None:
    up = live.wait_for(f'up{{job="{COORDINATOR_JOB}"}} == 1')
    assert up[0]["metric"]["instance"] == live.exporters.coordinator
    up = live.wait_for(f'up{{job="{WORKER_JOB}"}} == 1')
    assert up[0]["metric"]["instance"] == live.exporters.worker
    rounds = live.wait_for(f'fedfleet_rounds_completed_total{{job="{COORDINATOR_JOB}"}} > 0')
    assert float(rounds[0]["value"][1]) > 0
    accuracy = live.wait_for("fedfleet_global_accuracy_ratio")
    assert 0 < float(accuracy[0]["value"][1]) <= 1
    train = live.wait_for(f'fedfleet_worker_train_duration_seconds_count{{job="{WORKER_JOB}"}} > 0')
    assert train[0]["metric"]["instance"] == live.exporters.worker
    clients = live.wait_for("fedfleet_worker_clients")
    assert float(clients[0]["value"][1]) == 2
    memory = live.wait_for(f'process_resident_memory_bytes{{job="{WORKER_JOB}"}} > 0')
    assert float(memory[0]["value"][1]) > 10 * 1024 * 1024  # a Python process with numpy loaded


def test_run_id_is_joined_in_from_the_info_metric(live: Live) -> None:
    """The run's id is on fedfleet_run_info (and its start time), not on every series; the documented
    join puts it on any coordinator series."""
    run_id = run_id_of(live)
    joined = live.wait_for("fedfleet_current_round * on (job, instance) group_left (run_id) "
                           f'fedfleet_run_info{{run_id="{run_id}"}}')
    assert [r["metric"]["run_id"] for r in joined] == [run_id]
    assert joined[0]["metric"]["instance"] == live.exporters.coordinator
    carriers = {r["metric"]["__name__"] for r in live.query('{run_id!=""}')}
    assert carriers == {"fedfleet_run_info", "fedfleet_run_start_time_seconds", "fedfleet_worker_run_info"}
    start = live.wait_for(f'fedfleet_run_start_time_seconds{{run_id="{run_id}"}}')
    assert time.time() - 600 < float(start[0]["value"][1]) < time.time()
    # Picking another run leaves every panel of both dashboards empty, the workers' included.
    for q in dashboard_queries():
        if not q.panel.startswith("variable $"):
            assert live.query(grafana_to_promql(q.expr, RATE_WINDOW, run_id="not-this-run")) == [], q


def test_a_worker_process_names_the_run_it_joined(live: Live) -> None:
    """The worker's own info series carries the run id its workers registered with (the coordinator's):
    joined in on the target, it puts the run on any worker series, and another run id picks none."""
    run_id = run_id_of(live)
    own = [line for line in live.exporters.text(live.exporters.worker).splitlines()
           if line.startswith("fedfleet_worker_run_info{")]
    assert own == [f'fedfleet_worker_run_info{{run_id="{run_id}"}} 1.0']
    join = "fedfleet_worker_clients * on (job, instance) group_left (run_id) fedfleet_worker_run_info"
    joined = live.wait_for(f'{join}{{run_id="{run_id}"}}')
    assert [(r["metric"]["run_id"], r["metric"]["instance"]) for r in joined] == [(run_id, live.exporters.worker)]
    assert float(joined[0]["value"][1]) == 2
    assert live.query(f'{join}{{run_id="not-this-run"}}') == []


def test_no_created_series(exporters: Exporters) -> None:
    """prometheus_client's _created timestamps are off in the coordinator and the worker, in both formats."""
    for target in (exporters.coordinator, exporters.worker):
        text = exporters.text(target)
        names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
        # There are counters and histograms that would have had them.
        assert any(n.endswith("_total") for n in names) and any(n.endswith("_bucket") for n in names), target
        assert not [n for n in names if n.endswith("_created")], target
        openmetrics = exporters.text(target, OPENMETRICS)
        assert "_total" in openmetrics and "_created" not in openmetrics, target


def test_prometheus_loads_the_alert_rules_and_none_fires_on_a_healthy_run(live: Live) -> None:
    live.wait_for(f'fedfleet_rounds_completed_total{{job="{COORDINATOR_JOB}"}} > 2')
    groups = live.get("rules", type="alert")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == {r["alert"] for g in yaml.safe_load(ALERTS_YML.read_text())["groups"] for r in g["rules"]}
    end = time.monotonic() + BUDGET
    while any(r["health"] != "ok" for r in rules.values()):  # "unknown" until first evaluated
        assert time.monotonic() < end, rules
        time.sleep(0.5)
        rules = {r["name"]: r for g in live.get("rules", type="alert")["groups"] for r in g["rules"]}
    assert all(not r.get("lastError") for r in rules.values()), rules
    assert live.alerts() == []


# --- the dashboards against what the processes export --------------------------------------------
def exported(exporters: Exporters) -> tuple[set[str], set[str]]:
    """Sample names the live coordinator and worker export (with those of families without samples
    yet, read from their TYPE lines), and which of them count up."""
    names: set[str] = set()
    counters: set[str] = set()
    for target in (exporters.coordinator, exporters.worker):
        text = exporters.text(target)
        counters |= counter_names(text)
        for family in text_string_to_metric_families(text):
            names.add(family.name)
            names.update(s.name for s in family.samples)
    return names | counters, counters


def test_raw_counters_finds_a_counter_drawn_raw() -> None:
    counters = {"a_total", "b_bucket"}
    assert raw_counters('a_total{x="1"}', counters) == ["a_total"]
    assert raw_counters("rate(a_total[5m])", counters) == ["a_total"]  # a window of its own, not Grafana's
    assert raw_counters("rate(a_total[$__rate_interval]) / a_total", counters) == ["a_total"]
    assert raw_counters('sum by (le) (rate(b_bucket{x=~"$i"}[$__rate_interval])) * c', counters) == []
    assert raw_counters("sum(increase(a_total{y!=\"z\"}[$__range]))", counters) == []


def test_dashboards_read_only_what_the_processes_export_as_they_should(exporters: Exporters) -> None:
    """Every query (panels, variables, annotations) names metrics the live coordinator or worker export,
    reads counters only through rate() or increase() over Grafana's window, and (but for the variables
    themselves) picks runs by $run_id; every panel has a unit."""
    names, counters = exported(exporters)
    assert "fedfleet_rounds_completed_total" in counters and "fedfleet_worker_train_duration_seconds_sum" in counters
    queries = dashboard_queries() + annotation_queries()
    for q in queries:
        where = f"{q.dashboard} / {q.panel}: {q.expr}"
        missing = metric_names(q.expr) - names
        assert not missing, f"{where}: {sorted(missing)} not exported"
        assert not raw_counters(q.expr, counters), f"{where}: counters drawn raw"
        # The variables are what one picks from; the rest follow the pick.
        assert "$run_id" in q.expr or q.panel.startswith("variable $"), f"{where}: does not pick runs by $run_id"
    for path in DASHBOARDS:
        for panel in panels_of(path):
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{path.name} / {panel['title']}: no unit"
        board = json.loads(path.read_text())
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["run_id"]["multi"] and variables["run_id"]["includeAll"], path.name
        starts = [a for a in board["annotations"]["list"] if "fedfleet_run_start_time_seconds" in a.get("expr", "")]
        ends = [a for a in board["annotations"]["list"] if "fedfleet_run_end_time_seconds" in a.get("expr", "")]
        # The gauges hold the times themselves: Grafana is told to put the annotation there.
        assert len(starts) == len(ends) == 1 and starts[0]["useValueForTime"] and ends[0]["useValueForTime"]
        # The end gauge is there only if a scrape saw the run over; the run's span, as a region, always is.
        (span,) = [a for a in board["annotations"]["list"] if a.get("expr", "").startswith("fedfleet_run_info{")]
        assert not span["useValueForTime"], path.name


def panel_queries() -> dict[str, list[Query]]:
    panels: dict[str, list[Query]] = {}
    for q in dashboard_queries():
        panels.setdefault(f"{q.dashboard} / {q.panel}", []).append(q)
    return panels


@pytest.mark.parametrize("panel", sorted(panel_queries()))
def test_every_dashboard_panel_shows_data_from_a_live_run(live: Live, panel: str) -> None:
    """Each panel (and variable) gets data for this run (its id for $run_id): every query runs, and at
    least one returns series.

    Some queries are empty by design while all is well (rejected updates, filtered with > 0), so a
    panel passes when any of its queries has data.
    """
    run_id = run_id_of(live)
    queries = [grafana_to_promql(q.expr, RATE_WINDOW, run_id=run_id) for q in panel_queries()[panel]]
    end = time.monotonic() + BUDGET
    while True:
        results = [live.query(q) for q in queries]
        if any(results):
            break
        assert time.monotonic() < end, f"{panel}: no data from any of {queries} after {BUDGET:g} s"
        time.sleep(0.5)
    for result in results:
        assert all(r["metric"].get("run_id", run_id) == run_id for r in result), (panel, result)


def test_run_start_annotation_sits_at_the_run_start(live: Live) -> None:
    run_id = run_id_of(live)
    (start,) = [q for q in annotation_queries() if "start" in q.panel and q.dashboard == "fedfleet-run.json"]
    result = live.wait_for(grafana_to_promql(start.expr, run_id=run_id))
    assert [r["metric"]["run_id"] for r in result] == [run_id]
    started_ms = float(result[0]["value"][1])
    process_start = float(live.wait_for(f'process_start_time_seconds{{job="{COORDINATOR_JOB}"}}')[0]["value"][1])
    # Grafana reads the value as the time in ms: the coordinator's start, give or take its import time.
    assert process_start <= started_ms / 1000 < process_start + 120


# --- the end of a run is there to be scraped --------------------------------------------------------
def test_a_scraped_coordinator_stays_up_after_its_run_until_a_scrape_saw_the_end(fleet: Fleet) -> None:
    """--linger 0: the coordinator does not wait for its workers to hear the run is over. Scraped twice,
    SCRAPE_APART seconds apart (while it waits for workers), it still stays up after the run finished, for
    a scrape to see the end (at most two scrape intervals), and exits soon after one did."""
    coord = fleet.coordinator("--task", "null", "--task-option", "params=1000", "--workers", "1", "--rounds", "2",
                              "--linger", "0")
    httpx.get(f"{coord.url}/metrics", timeout=TIMEOUT).raise_for_status()
    time.sleep(SCRAPE_APART)  # not an assertion: scrapes as far apart as a scraper's interval
    before = httpx.get(f"{coord.url}/metrics", timeout=TIMEOUT).text
    assert 'fedfleet_run_state{state="waiting"} 1.0' in before
    assert "fedfleet_run_end_time_seconds{" not in before
    worker = fleet.worker(coord.url)
    assert worker.proc.wait(timeout=120) == 0, worker.log_text()  # it leaves once told the run is over
    # The run is over and no worker is left: without a scrape to wait for, the process would be gone.
    status = httpx.get(f"{coord.url}/v1/status", timeout=TIMEOUT).json()
    assert status["state"] == "finished", status
    assert coord.proc.poll() is None
    after = httpx.get(f"{coord.url}/metrics", timeout=TIMEOUT).text
    assert 'fedfleet_run_state{state="finished"} 1.0' in after
    assert f'fedfleet_run_end_time_seconds{{run_id="{status["run_id"]}",state="finished"}}' in after
    assert coord.proc.wait(timeout=TIMEOUT) == 0, coord.log_text()
    assert "coordinator.linger_for_scrape" in coord.log_text()


def test_a_coordinator_scraped_once_exits_as_soon_as_its_workers_heard(fleet: Fleet) -> None:
    """One scrape is no sign of a scraper that comes back (a person's curl): no wait for another."""
    coord = fleet.coordinator("--task", "null", "--task-option", "params=1000", "--workers", "1", "--rounds", "2",
                              "--linger", "60")
    assert httpx.get(f"{coord.url}/metrics", timeout=TIMEOUT).status_code == 200
    worker = fleet.worker(coord.url)
    assert worker.proc.wait(timeout=120) == 0, worker.log_text()
    # Well under --linger (60 s) and the scrape wait (120 s): it went as its worker heard.
    assert coord.proc.wait(timeout=TIMEOUT) == 0, coord.log_text()
    assert "coordinator.linger_for_scrape" not in coord.log_text()
