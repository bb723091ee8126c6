"""RFC 9457 problem details: every error answer of the HTTP API."""

from __future__ import annotations

import json

from flask import Response

from pipeline.core.errors import ValidationError

TITLES = {
    400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
    405: "Method not allowed", 409: "Conflict", 413: "Payload too large", 415: "Unsupported media type",
    422: "Invalid message", 429: "Too many requests", 500: "Internal error", 503: "Service unavailable",
}


def problem_body(status: int, detail: str, *, slug: str | None = None, title: str | None = None,
                 errors=None) -> dict:
    """The problem object: `type`, `title`, `status`, `detail` and optional `errors`."""
    title = title or TITLES.get(status, "Error")
    body = {
        "type": f"/problems/{slug or title.lower().replace(' ', '-')}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = errors
    return body


def problem(status: int, detail: str, *, slug: str | None = None, title: str | None = None,
            errors=None, headers=None) -> Response:
    """A problem+json response (RFC 9457)."""
    body = problem_body(status, detail, slug=slug, title=title, errors=errors)
    response = Response(json.dumps(body), status=status, mimetype="application/problem+json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def from_validation(exc: ValidationError) -> Response:
    """The problem for a message that failed validation."""
    return problem(exc.status, exc.detail, title=exc.title, errors=exc.errors)
