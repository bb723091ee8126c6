"""The Flask app factory: HTTP API, WebSocket hub, demo page, health and metrics."""

from __future__ import annotations

import logging
import re
import secrets
import time

from flask import Flask, g, request, send_from_directory
from flask_cors import CORS
from flask_swagger_ui import get_swaggerui_blueprint
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from pipeline.core.messages import new_id
from pipeline.core.metrics import HTTP_LATENCY, HTTP_REQUESTS
from pipeline.core.settings import current, loopback
from web.openapi import MessageIdConverter
from web.problems import problem
from web.services import Services

log = logging.getLogger("herald.web")
access_log = logging.getLogger("herald.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Metric labels come from fixed sets, never from what a client sends: gunicorn
# passes any upper-case method name, and each new label value is a new series
# kept for the life of the process.
METRIC_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"


def create_app(settings=None) -> Flask:
    """Build the web app; services connect lazily, after any fork (see `gunicorn.conf.py`)."""
    settings = settings or current()
    app = Flask(__name__)
    # The largest body any endpoint takes (a batch); werkzeug refuses more unread.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_batch_bytes
    if settings.trusted_proxies:
        # Only the X-Forwarded-For entries our own proxies appended are true;
        # any client writes the rest (docs/operations.md: "Running on a Heroku-like host").
        # Every address Herald uses is request.remote_addr, set here. Wrapping
        # wsgi_app is Flask's documented way in (mypy sees a method replaced).
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies)
    # Browser pages on HERALD_CORS_ORIGINS may call the HTTP API (none by
    # default). Tokens travel in the Authorization header, never in cookies,
    # so no credentials are allowed, and a wildcard origin is refused by the settings.
    CORS(app, resources={r"/api/*": {"origins": list(settings.cors_origins)},
                         r"/sse": {"origins": list(settings.cors_origins)}}, supports_credentials=False,
         allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"],
         expose_headers=["X-Request-ID", "Retry-After", "Location", "X-RateLimit-Limit", "X-RateLimit-Remaining",
                         "X-RateLimit-Reset"], max_age=600)
    app.url_map.converters["message_id"] = MessageIdConverter
    services = Services(settings)
    app.extensions["herald"] = services

    from web import api, channels, cli, hub, ops, ratelimit, serverapi, webhooks

    app.register_blueprint(api.blueprint)
    app.register_blueprint(webhooks.blueprint)
    app.register_blueprint(channels.blueprint)
    app.register_blueprint(serverapi.blueprint)
    app.register_blueprint(get_swaggerui_blueprint("/docs", "/api/v1/openapi.json", config={"app_name": "Herald"}))
    hub.init_app(app, services)
    cli.init_app(app)
    _install_request_ids(app)
    # After the request ids: a 429's access line carries its id and time.
    ratelimit.init_app(app, services)
    _install_errors(app)

    @app.get("/")
    def index():
        return send_from_directory(app.static_folder, "index.html")

    if settings.dev:
        _install_dev_token(app, settings)

    from web.metrics import ClusterCollector

    # Read at scrape time by /metrics (web/ops.py): the cluster's gauges.
    app.extensions["herald-cluster"] = ClusterCollector(services)
    app.register_blueprint(ops.blueprint)

    return app


_DEV_USER = re.compile(r"[A-Za-z0-9_-]{1,32}")


def _install_dev_token(app: Flask, settings) -> None:
    """GET /dev/token: a token for anyone who asks, so the demo page comes up joined
    (HERALD_DEV, which `flask dev` sets; without it the route does not exist)."""
    from web.auth import mint

    log.warning("HERALD_DEV is on: GET /dev/token gives a token to anyone on this machine who asks; "
                "never set it in production")

    @app.get("/dev/token")
    def dev_token():
        if not from_this_machine(request):
            # Even when a --bind opened the port to the network.
            return problem(403, "GET /dev/token answers only requests from this machine", slug="forbidden")
        user = request.args.get("user") or f"guest-{secrets.token_hex(2)}"
        if not _DEV_USER.fullmatch(user):
            return problem(400, "user must be 1 to 32 letters, digits, _ or -", slug="bad-user")
        if settings.auth:
            body = {"token": mint(settings, user, ttl=24 * 3600), "user": user}
        else:
            body = {"token": "", "user": "anonymous"}  # HERALD_AUTH=off: every connection is let in
        return body, 200, {"Cache-Control": "no-store"}


def from_this_machine(req) -> bool:
    """True for a request from a loopback peer that no proxy relayed (it carries no
    X-Forwarded-For or Forwarded header: a local proxy may relay anyone)."""
    if "X-Forwarded-For" in req.headers or "Forwarded" in req.headers:
        return False
    return loopback(req.remote_addr or "")


def _install_request_ids(app: Flask) -> None:
    @app.before_request
    def assign_request_id():
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _REQUEST_ID.fullmatch(incoming) else new_id()
        g.started = time.perf_counter()

    @app.after_request
    def log_request(response):
        request_id = g.get("request_id") or new_id()
        response.headers["X-Request-ID"] = request_id
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        method, route = metric_labels()
        HTTP_REQUESTS.labels(method, route, str(response.status_code)).inc()
        HTTP_LATENCY.labels(method, route).observe(elapsed)
        access_log.info("request", extra={
            "request_id": request_id, "method": request.method, "path": request.path,
            "status": response.status_code, "ms": round(elapsed * 1000, 2),
            "remote": request.remote_addr, "message_id": g.get("message_id"), **g.get("log_fields", {}),
        })
        return response


def metric_labels() -> tuple[str, str]:
    """The request's (method, route template) for metrics: `OTHER` for an unknown method,
    a fixed value for a path no route matched."""
    method = request.method if request.method in METRIC_METHODS else "OTHER"
    route = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
    return method, route


def _install_errors(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if exc.code == 413:
            return problem(413, "The request body is larger than HERALD_MAX_MESSAGE_BYTES allows",
                           slug="too-large")
        # werkzeug's own headers stay: `Allow` on a 405 (RFC 9110) and the like.
        headers = {name: value for name, value in exc.get_headers() if name.lower() != "content-type"}
        return problem(exc.code or 500, exc.description or exc.name, headers=headers)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error", extra={"request_id": g.get("request_id")})
        return problem(500, "An unexpected error occurred; it has been logged", slug="internal")

