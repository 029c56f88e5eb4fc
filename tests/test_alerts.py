"""deploy/prometheus/alerts.yml: promtool checks the rules and runs their unit tests (alerts.test.yml),
and a real Prometheus (Debian's) fires them against a live run of real processes.

The live test runs the rules as written but with every duration (range windows and ``for``) divided
by ``SCALE``, so that fifteen minutes of a stalled run pass in thirty seconds; their expressions are
otherwise the file's own. One coordinator needs both of its two workers (--min-workers 2); one of
them is SIGKILLed. The run then waits for it (workers below what it needs, a quarter of them gone,
no round completed) and fails at --wait-timeout; each alert must fire, naming the run. The coordinator
runs with --linger 0 (it does not wait for its workers to hear the run is over) and still stays up after
the run failed, until a scrape saw it failed (it has been scraped, so it waits for the next scrape, at
most two scrape intervals): Prometheus sees the failed state and FedfleetRunFailed fires, not
FedfleetCoordinatorDown. A second run started on the same
port then has series of its own, told apart by the run id joined in.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import subprocess
import time
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import yaml

from conftest import Fleet
from metrics_support import ALERTS_YML, DEPLOY, PrometheusAPI, free_port, prometheus_server, require_binary

COORDINATOR_JOB = "fedfleet-coordinator"
ALERTS_TEST_YML = ALERTS_YML.parent / "alerts.test.yml"
SCALE = 30
FIRE_BUDGET = 150.0  # seconds for every alert of the scenario to fire: the wait alone is WAIT_TIMEOUT
WORKER_TIMEOUT = 20  # --worker-timeout: the killed worker counts as dead after it
WAIT_TIMEOUT = 45  # --wait-timeout: the run fails this long after it started waiting for the killed worker
RUN_JOIN = "fedfleet_current_round * on (job, instance) group_left (run_id) fedfleet_run_info"

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
# A range window, as in [15m] or the [15m:1s] of a subquery (whose resolution is kept).
_WINDOW = re.compile(r"\[(\d+)(ms|s|m|h|d)(?=[:\]])")


def seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", duration)
    assert m, f"not a single-unit Prometheus duration: {duration!r}"
    return int(m[1]) * _UNITS[m[2]]


def shortened(duration: str, scale: int) -> str:
    return f"{max(1, math.ceil(seconds(duration) / scale))}s"


def compressed(rules: dict[str, Any], scale: int) -> dict[str, Any]:
    """``rules`` with every range window and ``for`` divided by ``scale`` (whole seconds, at least 1)."""
    out = json.loads(json.dumps(rules))
    for group in out["groups"]:
        for rule in group["rules"]:
            rule["expr"] = _WINDOW.sub(lambda m: "[" + shortened(m[1] + m[2], scale), rule["expr"])
            if "for" in rule:
                rule["for"] = shortened(rule["for"], scale)
    return out


def test_compressed_shortens_windows_and_for_but_not_resolutions() -> None:
    rules = {"groups": [{"name": "g", "rules": [
        {"alert": "A", "expr": "max_over_time(x[15m:1s]) and increase(y[2m]) == 0 and z[1d]", "for": "13m"}]}]}
    (rule,) = compressed(rules, 30)["groups"][0]["rules"]
    assert rule == {"alert": "A", "expr": "max_over_time(x[30s:1s]) and increase(y[4s]) == 0 and z[2880s]",
                    "for": "26s"}
    assert rules["groups"][0]["rules"][0]["for"] == "13m"  # a copy


def test_promtool_checks_the_alert_rules() -> None:
    promtool = require_binary("promtool")
    r = subprocess.run([promtool, "check", "rules", str(ALERTS_YML)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    names = [rule["alert"] for g in yaml.safe_load(ALERTS_YML.read_text())["groups"] for rule in g["rules"]]
    assert f"SUCCESS: {len(names)} rules found" in r.stdout, r.stdout
    assert {"FedfleetRunFailed", "FedfleetRoundStalled", "FedfleetWorkersBelowNeeded",
            "FedfleetWorkersDropping", "FedfleetUpdatesRejected", "FedfleetCoordinatorDown"} == set(names)


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    promtool = require_binary("promtool")
    r = subprocess.run([promtool, "test", "rules", ALERTS_TEST_YML.name], capture_output=True, text=True,
                       timeout=120, cwd=ALERTS_TEST_YML.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout, r.stdout
    # Every alert is shown firing in some test, and quiet in another.
    tests = yaml.safe_load(ALERTS_TEST_YML.read_text())["tests"]
    cases = [c for t in tests for c in t["alert_rule_test"]]
    names = {rule["alert"] for g in yaml.safe_load(ALERTS_YML.read_text())["groups"] for rule in g["rules"]}
    assert {c["alertname"] for c in cases if c["exp_alerts"]} == names
    assert {c["alertname"] for c in cases if not c["exp_alerts"]} == names


def test_compose_monitoring_profile_loads_the_alerts() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    prometheus = compose["services"]["prometheus"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"] if v.startswith("./")}
    config_path = PurePosixPath(next(p for p, src in mounts.items() if src.endswith("prometheus.compose.yml")))
    assert mounts[str(config_path.parent / "alerts.yml")] == "./prometheus/alerts.yml"
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.compose.yml").read_text())
    # Rule files are read relative to the config's folder in the container: the pattern finds the mount.
    loaded = [p for p in mounts if any(fnmatch.fnmatch(p, str(config_path.parent / f)) for f in config["rule_files"])]
    assert loaded == [str(config_path.parent / "alerts.yml")]


# --- the rules fired by a live run -----------------------------------------------------------------
def firing(prom: PrometheusAPI) -> dict[str, dict[str, str]]:
    """The firing alerts, by name: their labels."""
    return {a["labels"]["alertname"]: a["labels"] for a in prom.alerts() if a["state"] == "firing"}


def wait_quiet(prom: PrometheusAPI) -> None:
    """Until no alert fires (workers still joining may fire one for a moment); fails after FIRE_BUDGET."""
    end = time.monotonic() + FIRE_BUDGET
    while (now := firing(prom)):
        assert time.monotonic() < end, f"alerts fire on a healthy run: {now}"
        time.sleep(0.5)


def wait_fired(prom: PrometheusAPI, names: set[str], fleet: Fleet) -> dict[str, dict[str, str]]:
    """Every alert of ``names`` seen firing (not necessarily at once: a failed run is no longer a
    stalled one), with its labels; fails after FIRE_BUDGET seconds."""
    seen: dict[str, dict[str, str]] = {}
    end = time.monotonic() + FIRE_BUDGET
    while not names <= set(seen):
        seen |= firing(prom)
        assert time.monotonic() < end, (f"after {FIRE_BUDGET:g} s only {sorted(seen)} of {sorted(names)} fired; "
                                        f"active: {prom.alerts()}\n{fleet.logs()}")
        time.sleep(0.5)
    return seen


def test_alerts_fire_on_a_live_run_that_loses_a_worker_and_fails(fleet: Fleet, tmp_path: Path) -> None:
    port = free_port()
    coord = fleet.coordinator(
        "--task", "songs", "--workers", "2", "--min-workers", "2", "--rounds", "1000000",
        "--worker-timeout", str(WORKER_TIMEOUT), "--wait-timeout", str(WAIT_TIMEOUT), "--round-timeout", "60",
        "--linger", "0", "--port", str(port))
    run_id = httpx.get(f"{coord.url}/v1/status", timeout=30).json()["run_id"]
    survivor = fleet.worker(coord.url)
    doomed = fleet.worker(coord.url)
    rules = tmp_path / "alerts.yml"
    rules.write_text(yaml.safe_dump(compressed(yaml.safe_load(ALERTS_YML.read_text()), SCALE)))
    target = f"127.0.0.1:{port}"
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(rules)],
              "scrape_configs": [{"job_name": COORDINATOR_JOB, "static_configs": [{"targets": [target]}]}]}
    (tmp_path / "prometheus").mkdir()
    with prometheus_server(config, tmp_path / "prometheus") as prom:
        prom.wait_for(f'increase(fedfleet_rounds_completed_total{{instance="{target}"}}[5s]) > 0')
        wait_quiet(prom)
        t0 = time.time()
        doomed.kill()  # SIGKILL: no goodbye; the run needs it back and waits
        fired = wait_fired(prom, {"FedfleetWorkersBelowNeeded", "FedfleetWorkersDropping", "FedfleetRoundStalled"},
                           fleet)
        fired |= wait_fired(prom, {"FedfleetRunFailed"}, fleet)
        for name, labels in fired.items():
            assert (labels["run_id"], labels["task"], labels["instance"]) == (run_id, "songs", target), name
        assert "FedfleetCoordinatorDown" not in fired
        # It exits once a scrape saw the end: a scrape interval (1 s) after, two at most; 30 s is a hang.
        assert coord.proc.wait(timeout=30) != 0
        assert "coordinator.linger_for_scrape" in coord.log_text()
        survivor.kill()
        summary = json.loads((coord.data_dir / "summary.json").read_text())
        assert summary["state"] == "failed" and "--wait-timeout" in summary["message"], summary
        # The run was seen over: its end time, how it ended, and no "down" alert for its exit.
        end = prom.wait_for(f'last_over_time(fedfleet_run_end_time_seconds{{run_id="{run_id}"}}[5m])')
        assert end[0]["metric"]["state"] == "failed" and t0 < float(end[0]["value"][1]) < time.time()
        assert "FedfleetCoordinatorDown" not in firing(prom)

        # A new run on the same port: the same target, a new run id, and series of its own once joined.
        second = fleet.coordinator("--task", "songs", "--workers", "2", "--rounds", "5", "--linger", "0",
                                   "--port", str(port), data_dir=tmp_path / "second")
        run_id2 = httpx.get(f"{second.url}/v1/status", timeout=30).json()["run_id"]
        assert run_id2 != run_id
        prom.wait_for(f'{RUN_JOIN}{{run_id="{run_id2}", instance="{target}"}}')
        # Up to a second ahead: the steps count from the start, and the last must reach the new run.
        data = prom.get("query_range", query=RUN_JOIN, start=str(t0 - 5), end=str(time.time() + 1), step="1")
        runs = {r["metric"]["run_id"]: r["values"] for r in data["result"]}
        assert set(runs) == {run_id, run_id2}
        assert {r["metric"]["instance"] for r in data["result"]} == {target}
        # Each run's series ends before the other's begins: no point has both.
        first_times, second_times = ({t for t, _ in runs[r]} for r in (run_id, run_id2))
        assert max(first_times) < min(second_times)
