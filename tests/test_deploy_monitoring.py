"""deploy/prometheus and deploy/grafana: well formed, and every metric they query is one the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
METRIC = re.compile(r"\bedge_(?:agent|coordinator)_[a-z_]+")


def exported() -> set[str]:
    """Metric names in the source, with the suffixes Prometheus clients add (counters, histograms)."""
    names: set[str] = set()
    for path in (ROOT / "edge_agent").rglob("*.py"):
        for name in METRIC.findall(path.read_text()):
            names |= {name, f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def test_alert_rules_are_well_formed_and_use_exported_metrics() -> None:
    doc = yaml.safe_load((ROOT / "deploy/prometheus/edge-alerts.yml").read_text())
    known = exported()
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    assert len(rules) >= 10
    assert len({r["alert"] for r in rules}) == len(rules)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"])
        unknown = set(METRIC.findall(rule["expr"])) - known
        assert not unknown, f"{rule['alert']}: {unknown}"
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["edge-alerts.yml"]
    jobs = {job["job_name"] for job in prometheus["scrape_configs"]}
    assert {m for r in rules for m in re.findall(r'job="([^"]+)"', r["expr"])} <= jobs


def test_grafana_dashboard_queries_exported_metrics() -> None:
    doc = json.loads((ROOT / "deploy/grafana/edge-fleet.json").read_text())
    known = exported()
    exprs = [t["expr"] for panel in doc["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10 and doc["uid"]
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])
    for expr in exprs:
        assert METRIC.findall(expr) and not set(METRIC.findall(expr)) - known, expr
