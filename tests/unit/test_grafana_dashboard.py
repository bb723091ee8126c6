"""docs/grafana-herald.json queries only metrics Herald exposes."""

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

import pipeline.core.metrics  # noqa: F401  (registers the metrics)
import tasks.processor  # noqa: F401
from web import metrics as cluster

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-herald.json"


def test_every_metric_the_dashboard_queries_exists():
    exprs = [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for target in panel["targets"]]
    queried = {name for expr in exprs for name in re.findall(r"\bherald_\w+", expr)}
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    exposed = {family.name + suffix for family in REGISTRY.collect() for suffix in suffixes.get(family.type, ())}
    exposed |= set(re.findall(r'"(herald_\w+)"', Path(cluster.__file__).read_text()))
    assert queried and queried <= exposed, queried - exposed
