"""Prometheus metrics of every Herald process, and how each process serves them.

Metrics are module-level objects, defined here by the process that counts
them; a few live beside their one user (the rules repository, the archive
cache, the hub's router, the processor). A process exposes every metric of
the modules it imported, those of another process's work at zero. Processes that fork children (the
web's gunicorn workers, the Celery worker's pool) run prometheus-client's
multiprocess mode: `PROMETHEUS_MULTIPROC_DIR` is set before anything imports
prometheus_client, and a scrape merges every child's files
(`scrape_registry`). The bridge, one process, serves its own registry.
"""

from __future__ import annotations

import hmac
import os
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from pipeline.core.errors import StartupError
from pipeline.core.settings import MULTIPROC_ENV, loopback

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

    from pipeline.core.settings import Settings

# Produce and delivery times span a local broker's milliseconds to a retry's minute.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

# -- web --------------------------------------------------------------------
PUBLISHES = Counter("herald_publishes_total", "Messages offered for publishing, by result "
                    "(accepted, duplicate: an idempotent retry answered from the first, refused, "
                    "sent: ephemeral)", ["result"])
PRODUCE_LATENCY = Histogram("herald_produce_seconds", "Time from producing a record until Kafka acknowledged it",
                            buckets=LATENCY_BUCKETS)
WS_CONNECTIONS = Gauge("herald_ws_connections", "Open WebSocket connections", multiprocess_mode="livesum")
FRAMES_SENT = Counter("herald_ws_frames_sent_total", "Message frames handed to WebSocket clients")
SLOW_CLOSES = Counter("herald_ws_slow_consumer_closes_total",
                      "WebSockets closed with 4008 because their send queue overflowed")
HTTP_REQUESTS = Counter("herald_http_requests_total", "HTTP requests", ["method", "route", "status"])
HTTP_LATENCY = Histogram("herald_http_request_duration_seconds", "HTTP request duration, by route template",
                         ["method", "route"])
PROBES = Counter("herald_probes_total", "Probes of the services made for /readyz (ready) and the cluster gauges "
                 "of /metrics (cluster); calls in between answer from the last one", ["probe"])

# -- bridge -----------------------------------------------------------------
RECORDS_CONSUMED = Counter("herald_bridge_records_consumed_total", "Kafka records the bridge consumed")
DISPATCH_BATCHES = Counter("herald_bridge_dispatch_batches_total", "Batches the bridge sent to Celery as tasks")
OFFSET_GAPS = Counter("herald_bridge_skipped_offsets_total",
                      "Offsets the consumer passed over within a partition it owned (records the broker never gave)")
REDISPATCHED = Counter("herald_bridge_redispatched_total",
                       "Messages the bridge sent again, by why: no worker took them (untaken), or none "
                       "finished them within twice the visibility timeout (unfinished)", ["reason"])
BRIDGE_LAG = Gauge("herald_bridge_consumer_lag", "Records behind the partition's high watermark, "
                   "as this bridge's consumer sees it", ["partition"], multiprocess_mode="max")

# -- worker -----------------------------------------------------------------
DELIVERED = Counter("herald_worker_messages_total", "Messages a worker handled, by outcome "
                    "(delivered, duplicate, skipped, dead)", ["outcome"])
RETRIES = Counter("herald_worker_retries_total", "Tasks retried after a transient failure")
DEAD_LETTERS = Counter("herald_dead_letters_total", "Messages dead-lettered (by the worker, or by the bridge "
                       "for a record it could not decode)")
DELIVERY_LATENCY = Histogram("herald_delivery_latency_seconds",
                             "Time from the Kafka record's timestamp until the message was delivered",
                             buckets=LATENCY_BUCKETS)


def multiprocess() -> bool:
    """True when this process writes its metrics to PROMETHEUS_MULTIPROC_DIR."""
    return bool(os.environ.get(MULTIPROC_ENV))


def scrape_registry(*collectors: Collector) -> CollectorRegistry:
    """The registry a scrape reads: every process's files in multiprocess mode (plus
    `collectors`), else this process's default registry (with `collectors` added once)."""
    if multiprocess():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # prometheus-client leaves it unannotated
        for collector in collectors:
            registry.register(collector)
        return registry
    for collector in collectors:
        if collector not in _registered:
            REGISTRY.register(collector)
            _registered.add(collector)
    return REGISTRY


_registered: set[Collector] = set()


def scrape_allowed(header: str | None, settings: Settings, *, private: bool = False) -> bool:
    """May this scrape read /metrics? With HERALD_METRICS_TOKEN set, only with it as a bearer
    token; without, only on a `private` (loopback) listener, in development, or with
    HERALD_METRICS_PUBLIC (docs/operations.md: "Metrics"): lag, DLQ size and rule ids are nobody else's business."""
    if settings.metrics_token:
        return token_allowed(header, settings.metrics_token)
    return private or settings.dev or settings.metrics_public


def token_allowed(header: str | None, token: str | None) -> bool:
    """True when no token is required, or `header` is `Bearer <token>` (constant-time)."""
    if not token:
        return True
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def _v6(address: str) -> type[_Server]:
    return _Server6 if ":" in address else _Server


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *_args: Any) -> None:  # a scrape every few seconds is not worth a log line
        pass


def serve(settings: Settings, registry_factory: Callable[[], CollectorRegistry] = scrape_registry) -> WSGIServer | None:
    """Serve `/metrics` on HERALD_METRICS_BIND:HERALD_METRICS_PORT from a daemon thread (None
    when no port is set), behind HERALD_METRICS_TOKEN when set; StartupError when the port
    cannot be had."""
    if not settings.metrics_port:
        return None
    private = loopback(settings.metrics_bind)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if not scrape_allowed(environ.get("HTTP_AUTHORIZATION"), settings, private=private):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                ("WWW-Authenticate", 'Bearer realm="metrics"')])
            return [b"a bearer token is required (HERALD_METRICS_TOKEN)\n"]
        body: Iterable[bytes] = make_wsgi_app(registry_factory())(environ, start_response)
        return body

    try:
        server = make_server(settings.metrics_bind, settings.metrics_port, app, _v6(settings.metrics_bind),
                             handler_class=_QuietHandler)
    except OSError as exc:
        raise StartupError(f"cannot serve metrics on HERALD_METRICS_BIND={settings.metrics_bind} "
                           f"HERALD_METRICS_PORT={settings.metrics_port}: "
                           f"{exc.strerror or exc}") from None
    threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True).start()
    return server


# -- web: permissions from HERALD_AUTHORIZE_URL (web/authorize.py) -------------
AUTHORIZE_CALLS = Counter("herald_authorize_calls_total", "Calls to HERALD_AUTHORIZE_URL, by result "
                          "(allow, deny, failed: decided by HERALD_AUTHORIZE_ON_TIMEOUT)", ["result"])
AUTHORIZE_CACHE_HITS = Counter("herald_authorize_cache_hits_total",
                               "Decisions of HERALD_AUTHORIZE_URL answered from the process's cache")
AUTHORIZE_LATENCY = Histogram("herald_authorize_seconds", "Time a call to HERALD_AUTHORIZE_URL took",
                              buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                                       10, 30))

# -- webhooks (docs/webhooks.md) ----------------------------------------------
WEBHOOK_EVENTS_SENT = Counter("herald_webhook_events_sent_total", "Webhook events a receiver accepted (a 2xx)",
                              ["receiver"])
WEBHOOK_FAILURES = Counter("herald_webhook_failures_total", "Webhook POSTs that failed (not a 2xx, a timeout, "
                           "a refused connection)", ["receiver"])
WEBHOOK_EVENTS_DEAD = Counter("herald_webhook_events_dead_lettered_total",
                              "Webhook events moved to a receiver's dead letters", ["receiver"])
WEBHOOK_LAG = Gauge("herald_webhook_lag_seconds", "Age of the newest webhook event minus that of the last one "
                    "a receiver was sent, as the bridge sees it", ["receiver"], multiprocess_mode="max")
