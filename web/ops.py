"""Operations endpoints outside /api/v1: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline.core.metrics import scrape_allowed, scrape_registry
from web.api import contract
from web.openapi import Answer
from web.problems import problem
from web.schemas import Health, Ready

blueprint = Blueprint("ops", __name__)


@contract.operation(blueprint, "GET", "/healthz", summary="Liveness", auth="none",
                    answers={200: Answer("The process lives", Health)}, tags=("operations",), limited=False)
def healthz():
    return {"status": "ok"}


@contract.operation(blueprint, "GET", "/readyz", summary="Readiness: Kafka and Redis answer", auth="none",
                    description="Answered from a probe at most HERALD_PROBE_TTL seconds old.",
                    answers={200: Answer("Ready", Ready),
                             503: Answer("Not ready; `detail` names what is unreachable", headers=("Retry-After",))},
                    tags=("operations",), limited=False)
def readyz():
    down = current_app.extensions["herald"].readiness.get()
    if down:
        return problem(503, f"not ready: {', '.join(down)} unreachable", slug="not-ready",
                       headers={"Retry-After": "5"})
    return {"status": "ready"}


@contract.operation(blueprint, "GET", "/metrics", summary="Prometheus metrics of every process", auth="none",
                    description="Every gunicorn worker's metrics, and the cluster's gauges from a probe at "
                                "most HERALD_PROBE_TTL seconds old. HERALD_METRICS_TOKEN is required as a bearer "
                                "token; without one set, only development (HERALD_DEV) or HERALD_METRICS_PUBLIC=1 "
                                "answers.",
                    answers={200: Answer("Prometheus text format", schema={"type": "string"}, media="text/plain"),
                             401: Answer("The bearer token HERALD_METRICS_TOKEN was not given, or none is set",
                                         headers=("WWW-Authenticate",))},
                    tags=("operations",), limited=False)
def metrics():
    settings = current_app.extensions["herald"].settings
    if not scrape_allowed(request.headers.get("Authorization"), settings):
        return problem(401, "A bearer token is required (HERALD_METRICS_TOKEN)", slug="unauthorized",
                       headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
    return Response(generate_latest(scrape_registry(current_app.extensions["herald-cluster"])),
                    mimetype=CONTENT_TYPE_LATEST)
