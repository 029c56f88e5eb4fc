"""Helpers shared by the metrics tests: reading /metrics, the dashboards' queries, the Prometheus binaries
and a Prometheus server of their own."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
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
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from conftest import log_tail, stop_process

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"

# --- /metrics --------------------------------------------------------------------------------------
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a text exposition as {(name, sorted labels): value}."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(url: str) -> Samples:
    r = httpx.get(url, timeout=30.0)
    assert r.status_code == 200, r.text[:500]
    assert r.headers["content-type"].startswith("text/plain"), r.headers["content-type"]
    return parse(r.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} not exported; have {sorted({n for n, _ in samples})}"
    return samples[key]


# --- what the code exports -------------------------------------------------------------------------
# The sample names a metric family of each type produces (prometheus_client drops "_total" from a
# counter family's name). From the type rather than the samples, so that a gauge with no value yet
# (accuracy before the first round) still counts as exported. No "_created": fedfleet turns those off.
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
             "summary": ("", "_sum", "_count"), "info": ("_info",), "stateset": ("",),
             "gaugehistogram": ("_bucket", "_gsum", "_gcount"), "unknown": ("",)}


def exported_names(registry: CollectorRegistry) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
        names.update(s.name for s in family.samples)
    return names


# --- the dashboards ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Query:
    dashboard: str
    panel: str
    expr: str


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))  # panels folded into a collapsed row


def dashboard_queries() -> list[Query]:
    """Every PromQL expression of every panel, and every template variable's query, of every dashboard."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in _panels(board["panels"]):
            out += [Query(path.name, panel["title"], t["expr"]) for t in panel.get("targets", []) if "expr" in t]
        for var in board.get("templating", {}).get("list", []):
            if var.get("type") == "query":
                q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
                out.append(Query(path.name, f"variable ${var['name']}", q))
    return out


def annotation_queries() -> list[Query]:
    """The PromQL of every dashboard's Prometheus annotations (Grafana's built-in one has none)."""
    return [Query(path.name, f"annotation {a['name']}", a["expr"])
            for path in DASHBOARDS for a in json.loads(path.read_text())["annotations"]["list"] if "expr" in a]


def panels_of(path: Path) -> list[dict[str, Any]]:
    return list(_panels(json.loads(path.read_text())["panels"]))


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<selector>.+?)\s*,\s*(?P<label>\w+)\s*\)\s*$")
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# A name not preceded by part of a number or a variable, and not called like a function.
_NAME = re.compile(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
             "group_right", "inf", "nan", "atan2"}


def grafana_to_promql(query: str, rate_interval: str = "5m", instance: str = ".*", run_id: str = ".*",
                      range_: str = "1h") -> str:
    """What Grafana sends Prometheus: its variables filled in, ``label_values(m, l)`` as a plain query."""
    m = _LABEL_VALUES.match(query)
    if m:
        query = f"group by ({m['label']}) ({m['selector']})"
    return (query.replace("$__rate_interval", rate_interval).replace("$__range", range_)
            .replace("$instance", instance).replace("$run_id", run_id))


def metric_names(query: str) -> set[str]:
    """The metric names a PromQL expression (or Grafana ``label_values`` query) reads."""
    expr = grafana_to_promql(query)
    expr = _STRINGS.sub('""', expr)
    expr = _MATCHERS.sub(" ", expr)
    expr = _RANGES.sub(" ", expr)
    expr = _GROUPING.sub(" ", expr)
    return {n for n in _NAME.findall(expr) if n.lower() not in _KEYWORDS}


# --- the Prometheus binaries -------------------------------------------------------------------------
def require_binary(name: str) -> str:
    """Path of ``name``; fails (not skips) the test when it is missing, saying how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: these tests need the Debian package 'prometheus' "
                    "(apt-get update && apt-get install -y prometheus), which .ci/run installs", pytrace=False)
    return path


# --- a Prometheus server of a test's own ------------------------------------------------------------
BUDGET = 90.0  # seconds to wait for Prometheus to be ready, or to have what a test looks for


def free_port() -> int:
    # The port is free when this returns; whoever asked binds it right after.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrometheusAPI:
    url: str

    def get(self, path: str, **params: str) -> Any:
        """``data`` of a successful answer of the HTTP API at ``/api/v1/PATH``."""
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30.0)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{path} {params}: {r.text[:500]}"
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("query", query=promql)["result"]
        return result

    def wait_for(self, promql: str, budget: float = BUDGET) -> list[dict[str, Any]]:
        """The query's result once it is not empty; fails after ``budget`` seconds."""
        end = time.monotonic() + budget
        while True:
            result = self.query(promql)
            if result:
                return result
            assert time.monotonic() < end, f"Prometheus had nothing for {promql!r} after {budget:g} s"
            time.sleep(0.25)

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.get("alerts")["alerts"]
        return alerts


@contextlib.contextmanager
def prometheus_server(config: dict[str, Any], directory: Path) -> Iterator[PrometheusAPI]:
    """A Prometheus (Debian's binary) with ``config`` on a free loopback port, its data in ``directory``;
    stopped on exit. promtool checks the config first (and the rule files it names)."""
    promtool, prometheus = require_binary("promtool"), require_binary("prometheus")
    config_path = directory / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    check = subprocess.run([promtool, "check", "config", str(config_path)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    log_path = directory / "prometheus.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [prometheus, f"--config.file={config_path}", f"--storage.tsdb.path={directory / 'data'}",
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
        yield PrometheusAPI(url)
    finally:
        stop_process(proc)


# --- what a dashboard query may do with a counter ----------------------------------------------------
# A counter (and a histogram's _bucket, _sum and _count, which count too) only means something as a
# rate or an increase over Grafana's own window: drawn raw it is a line that climbs and drops to 0
# at every restart.
_COUNTED = re.compile(r"\b(?:rate|increase)\(\s*(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{[^{}]*\})?\s*"
                      r"\[\$__(?:rate_interval|range)\]\s*\)")


def counter_names(text: str) -> set[str]:
    """The sample names of a /metrics text that count up: counters' and histograms' and summaries'."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type in ("histogram", "summary"):
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def raw_counters(query: str, counters: set[str]) -> list[str]:
    """The counters ``query`` reads other than as ``rate(c[$__rate_interval])`` or ``increase(c[...])``
    (``$__range`` in a stat of the whole time range); each once per such use."""
    used = [n for n in _NAME.findall(_STRINGS.sub('""', _MATCHERS.sub(" ", query))) if n in counters]
    counted = [m["name"] for m in _COUNTED.finditer(query) if m["name"] in counters]
    for name in counted:
        used.remove(name)
    return used
