"""The dashboard and the alert rules name only metrics that pixelmill really exports (a typo
in a query shows an empty panel or an alert that never fires, silently)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

import producer.metrics
import review.metrics
import worker.metrics
from db.keeper_costs import CostFigures, RunCosts
from monitoring.exporter import RunFigures, Snapshot, snapshot_metrics
from tests.monitoring.dashboards import DASHBOARDS, dashboard_expressions

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
_NAME = re.compile(r"\bpixelmill_[a-z0-9_]+")


def exported_names() -> set[str]:
    assert worker.metrics and producer.metrics and review.metrics  # registered
    # From the families, not their samples: a labelled metric has no sample until first used.
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    names = {
        family.name + suffix
        for family in REGISTRY.collect()
        if family.name.startswith("pixelmill_")
        for suffix in suffixes.get(family.type, ("",))
    }
    now = datetime.now(UTC)
    # A run still rendering (a finished one has no projected finish): every series there is.
    # With a keeper, a prediction and review time: every cost series is there too.
    costs = RunCosts(1, 4, total=CostFigures(images=1, gpu_seconds=1.0, kept=1, ranked_keepers=1))
    costs.variants[("t", "")] = costs.total
    run = RunFigures(
        "r", now, jobs={"done": 1, "running": 1}, images=1, recent_images=1, reviewed=1,
        open_planned=2, costs=costs,
    )  # fmt: skip
    snapshot = Snapshot(now=now, runs=[run], oldest_waiting_age=0)
    names |= {s.name for f in snapshot_metrics(snapshot, timedelta(hours=1)) for s in f.samples}
    names |= {"pixelmill_exporter_database_up", "pixelmill_exporter_scrape_duration_seconds"}
    return names


def test_dashboard_queries_name_exported_metrics() -> None:
    exported = exported_names()
    for title, expr in dashboard_expressions():
        for name in _NAME.findall(expr):
            assert name in exported, f"panel {title!r}: {name} is not exported"


def test_alert_rules_name_exported_metrics() -> None:
    exported = exported_names()
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "pixelmill.rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            for name in _NAME.findall(rule["expr"]):
                assert name in exported, f"alert {rule['alert']}: {name} is not exported"


def test_dashboard_uses_the_provisioned_datasource_and_has_the_issue_panels() -> None:
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uid = provisioned["datasources"][0]["uid"]
    for path in DASHBOARDS.glob("*.json"):
        dashboard = json.loads(path.read_text())
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), path
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] == uid, panel["title"]
    titles = " | ".join(title.lower() for title, _ in dashboard_expressions())
    for wanted in ("images per minute", "backlog", "projected finish", "render time",
                   "failure", "keep rate", "gpu memory", "gpu-seconds per keeper",
                   "reviewer-seconds per keeper", "keeper recall"):  # fmt: skip
        assert wanted in titles, wanted
