"""Helpers shared by the metrics tests: reading /metrics, the dashboards' queries, the Prometheus binaries."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"

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
# (accuracy before the first round) still counts as exported.
_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("", "_sum", "_count", "_created"), "info": ("_info",), "stateset": ("",),
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


def grafana_to_promql(query: str, rate_interval: str = "5m", instance: str = ".*") -> str:
    """What Grafana sends Prometheus: its variables filled in, ``label_values(m, l)`` as a plain query."""
    m = _LABEL_VALUES.match(query)
    if m:
        query = f"group by ({m['label']}) ({m['selector']})"
    return query.replace("$__rate_interval", rate_interval).replace("$instance", instance)


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
