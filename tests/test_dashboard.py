"""deploy/grafana/oomguard-dashboard.json and docs/containers.md against the metrics the
daemon renders (host suite, offline, no root, well under a second).

The truth is `Metrics.render()` (src/oomguard/obs/metrics.py) with every family fed
through the calls the engine makes: its `# TYPE` lines give each metric's name and type,
its samples give the labels. The dashboard may use only those names (a histogram's
`_bucket`/`_sum`/`_count` series included) and group or name series only by their labels
or a scrape target's; the docs' metric table must list exactly those metrics, with their
type and labels.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from oomguard.containers import ContainerIdentity
from oomguard.obs.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "oomguard-dashboard.json"
CONTAINERS_DOC = REPO / "docs" / "containers.md"
TABLE_HEADING = "## Metrics for dashboards"

# Labels a series gets from the scrape, not from oomguard: Prometheus's own, and the
# `node` the ServiceMonitor's relabeling adds (deploy/kubernetes/servicemonitor.yaml).
TARGET_LABELS = frozenset({"instance", "job", "node"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_TYPE_LINE = re.compile(r"# TYPE (\S+) (\S+)$")
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? \S+$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="(?:[^"\\]|\\.)*"')
_METRIC_NAME = re.compile(r"\boomguard_[a-zA-Z0-9_:]*")


def rendered() -> dict[str, tuple[str, frozenset[str]]]:
    """{metric: (type, labels)} from what the daemon serves, every family with a sample."""
    m = Metrics()
    m.set_health(3, 0.002, 1700000000.0)
    m.name_cgroup("/kubepods/burstable/pod1/c1", ContainerIdentity(
        runtime="containerd", id="c1", pod_uid="1", qos="burstable", namespace="shop",
        pod="web-7d9f", container="app", named=True))
    m.set_cgroup("/kubepods/burstable/pod1/c1", 1 << 20, 64 << 20)
    m.action("kill", "killed")
    m.victim("/kubepods/burstable/pod1/c1")
    m.incident_closed("/kubepods/burstable/pod1/c1", "resolved", 0.003)
    families: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    for line in m.render().splitlines():
        if (typed := _TYPE_LINE.match(line)) is not None:
            families[typed[1]] = typed[2]
            labels[typed[1]] = set()
        elif line and not line.startswith("#"):
            sample = _SAMPLE.match(line)
            assert sample is not None, line
            name = sample[1]
            family = next((f for f in families if name == f or (
                families[f] == "histogram" and name in (f + s for s in HISTOGRAM_SUFFIXES))),
                None)
            assert family is not None, f"a sample of no family: {line}"
            found = set(_LABEL.findall(sample[2] or ""))
            if families[family] == "histogram":
                found.discard("le")
            labels[family] |= found
    return {name: (kind, frozenset(labels[name])) for name, kind in families.items()}


def series_names(metrics: dict[str, tuple[str, frozenset[str]]]) -> dict[str, str]:
    """{series name a query may use: its family}."""
    out = {}
    for name, (kind, _labels) in metrics.items():
        out[name] = name
        if kind == "histogram":
            out.update({name + s: name for s in HISTOGRAM_SUFFIXES})
    return out


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(where, expression, legend) for every query: each panel's targets (rows' nested
    panels too) and the query variables."""
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                yield (f"panel {panel.get('title')!r} {target.get('refId')}",
                       target.get("expr", ""), target.get("legendFormat", ""))
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard["panels"])
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            yield (f"variable {var['name']!r}",
                   query["query"] if isinstance(query, dict) else query, "")


def _labels_in(expr: str) -> set[str]:
    """Label names an expression groups, joins or matches by."""
    found: set[str] = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)",
                             expr):
        found |= {x.strip() for x in clause.split(",") if x.strip()}
    for selector in re.findall(r"\{([^{}]*)\}", expr):
        found |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", selector))
    found |= set(re.findall(r"label_values\(\s*[a-zA-Z0-9_:]+\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)",
                            expr))
    return found


def check_dashboard(dashboard: dict[str, Any],
                    metrics: dict[str, tuple[str, frozenset[str]]]) -> list[str]:
    """What in `dashboard` names a metric or label the daemon does not export."""
    known = series_names(metrics)
    problems = []
    seen = 0
    for where, expr, legend in expressions(dashboard):
        seen += 1
        used = set(_METRIC_NAME.findall(expr))
        if not used:
            problems.append(f"{where}: no oomguard metric in {expr!r}")
        unknown = sorted(n for n in used if n not in known)
        if unknown:
            problems.append(f"{where}: not exported: {unknown}")
        allowed = set(TARGET_LABELS) | {"le"}
        for name in used & known.keys():
            allowed |= metrics[known[name]][1]
        wrong = sorted((_labels_in(expr) | set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend)))
                       - allowed)
        if wrong:
            problems.append(f"{where}: labels none of its metrics has: {wrong}")
    if seen == 0:
        problems.append("no query at all")
    return problems


def doc_table(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """The metric table under TABLE_HEADING: {metric: (type, labels)}."""
    start = text.index(TABLE_HEADING)
    end = text.find("\n## ", start + len(TABLE_HEADING))
    rows: dict[str, tuple[str, frozenset[str]]] = {}
    for line in text[start:end if end >= 0 else None].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 4:
            continue
        name = re.fullmatch(r"`(oomguard_\w+)`", cells[0])
        if name is None:
            continue
        assert name[1] not in rows, f"{name[1]} listed twice"
        rows[name[1]] = (cells[1], frozenset(re.findall(r"`(\w+)`", cells[2])))
    return rows


# -- the tests ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def metrics() -> dict[str, tuple[str, frozenset[str]]]:
    out = rendered()
    # The renderer itself, seen from here: a few names the engine's callers rely on.
    assert out["oomguard_resolution_seconds"][0] == "histogram"
    assert out["oomguard_container_victims_total"][1] == {"namespace", "pod", "container"}
    return out


def test_dashboard_loads_as_grafana_10() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "oomguard" and dashboard["title"]
    assert dashboard["schemaVersion"] >= 36  # Grafana 9.1+; 10.x writes 38/39
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids repeat"
    for p in panels:
        assert p["type"] in {"timeseries", "stat", "table", "row"}, p["type"]
        assert {"h", "w", "x", "y"} <= p["gridPos"].keys() and p["gridPos"]["x"] + p["gridPos"][
            "w"] <= 24, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"], p["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for wanted in ("outcome", "container", "quantile", "watched", "lag", "limit"):
        assert wanted in titles, f"no panel about {wanted}"


def test_dashboard_uses_only_exported_metrics_and_labels(
        metrics: dict[str, tuple[str, frozenset[str]]]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert check_dashboard(dashboard, metrics) == []


def test_dashboard_check_catches_a_wrong_name_or_label(
        metrics: dict[str, tuple[str, frozenset[str]]]) -> None:
    """The check above, shown to fail: a misspelt metric, a label no metric has."""
    dashboard = json.loads(DASHBOARD.read_text())
    target = dashboard["panels"][0]["targets"][0]
    target["expr"] = target["expr"].replace("oomguard_up", "oomguard_upp")
    assert any("not exported: ['oomguard_upp']" in p for p in check_dashboard(dashboard, metrics))
    dashboard = json.loads(DASHBOARD.read_text())
    dashboard["panels"][-1]["targets"][0]["legendFormat"] = "{{pod_name}}"
    assert any("['pod_name']" in p for p in check_dashboard(dashboard, metrics))


def test_doc_table_lists_exactly_the_exported_metrics(
        metrics: dict[str, tuple[str, frozenset[str]]]) -> None:
    table = doc_table(CONTAINERS_DOC.read_text())
    assert sorted(table) == sorted(metrics), (
        f"missing from the docs: {sorted(metrics.keys() - table.keys())}; "
        f"not exported: {sorted(table.keys() - metrics.keys())}")
    for name, (kind, labels) in metrics.items():
        assert table[name] == (kind, labels), f"{name}: docs say {table[name]}"


def test_doc_table_check_catches_a_missing_row() -> None:
    text = CONTAINERS_DOC.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `oomguard_loop_lag"))
    assert "oomguard_loop_lag_seconds" not in doc_table(text.replace(row + "\n", ""))
