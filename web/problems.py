"""RFC 9457 problem details: every error answer of the HTTP API.

`ANSWERS` is the one place an exception type becomes an HTTP status and
title; the errors themselves know nothing of HTTP (pipeline/core/errors.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis
from flask import Response

from pipeline.archive import ArchiveUnavailable
from pipeline.core.errors import (
    DataOutOfBounds,
    Forbidden,
    IdempotencyConflict,
    InvalidInput,
    InvalidRequest,
    InvalidRuleSet,
    KafkaUnavailable,
    Malformed,
    RedisUnavailable,
    Refused,
    TooLarge,
    TooLargeForKafka,
    Unencodable,
    UnsupportedMedia,
)
from pipeline.dlq import NoDeadLetter, NotReplayable
from pipeline.ingest import ClaimUnavailable
from web.auth import AuthError
from web.authorize import AuthorizeUnavailable

TITLES = {
    400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
    405: "Method not allowed", 409: "Conflict", 413: "Payload too large", 415: "Unsupported media type",
    422: "Invalid message", 429: "Too many requests", 500: "Internal error", 503: "Service unavailable",
}
# The text of a Kafka or Redis error names internal hosts and ports: it is
# logged, and clients get this (docs/protocol.md: WebSocket close codes and errors).
NOT_ACCEPTED = "Kafka or Redis is unavailable; nothing was accepted, retry later"
_RETRY_SOON = (("Retry-After", "5"),)


@dataclass(frozen=True)
class HttpAnswer:
    """How the API answers an exception: status and title; `slug` names the problem type when
    the title does not; `detail` replaces the exception's text; `headers` go with the answer."""

    status: int
    title: str
    slug: str | None = None
    detail: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


_KAFKA_DOWN = HttpAnswer(503, TITLES[503], "kafka-unavailable", NOT_ACCEPTED, _RETRY_SOON)
_REDIS_DOWN = HttpAnswer(503, TITLES[503], "redis-unavailable", "Redis is unreachable; retry later", _RETRY_SOON)

# Each exception type the API answers, by its most specific entry (as `except` clauses would).
ANSWERS: dict[type[Exception], HttpAnswer] = {
    InvalidInput: HttpAnswer(422, "Invalid message"),
    InvalidRequest: HttpAnswer(400, "Bad request"),
    InvalidRuleSet: HttpAnswer(422, "Invalid rule set"),
    DataOutOfBounds: HttpAnswer(400, "Data out of bounds"),
    Unencodable: HttpAnswer(400, "Unencodable data"),
    Malformed: HttpAnswer(400, "Malformed JSON"),
    Forbidden: HttpAnswer(403, "Forbidden"),
    TooLarge: HttpAnswer(413, "Payload too large"),
    TooLargeForKafka: HttpAnswer(413, "Message too large"),
    UnsupportedMedia: HttpAnswer(415, "Unsupported media type"),
    AuthError: HttpAnswer(401, TITLES[401], "unauthorized", headers=(("WWW-Authenticate", 'Bearer realm="herald"'),)),
    NoDeadLetter: HttpAnswer(404, TITLES[404], "not-replayable"),
    NotReplayable: HttpAnswer(409, TITLES[409], "not-replayable"),
    IdempotencyConflict: HttpAnswer(409, TITLES[409], "idempotency-conflict", headers=(("Retry-After", "1"),)),
    KafkaUnavailable: _KAFKA_DOWN,
    # An idempotent publish is refused whichever of the two failed: one answer for both.
    ClaimUnavailable: _KAFKA_DOWN,
    RedisUnavailable: _REDIS_DOWN,
    redis.RedisError: _REDIS_DOWN,
    AuthorizeUnavailable: HttpAnswer(503, TITLES[503], "authorize-unavailable",
                                     "Permissions could not be checked (HERALD_AUTHORIZE_URL); retry later",
                                     _RETRY_SOON),
    ArchiveUnavailable: HttpAnswer(503, TITLES[503], "archive-unavailable",
                                   "The message archive is unreachable; retry later", _RETRY_SOON),
}


def answer_for(exc: BaseException) -> HttpAnswer | None:
    """The entry of ANSWERS for `exc`'s most specific type that has one, or None."""
    for kind in type(exc).__mro__:
        answer = ANSWERS.get(kind)
        if answer is not None:
            return answer
    return None


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


def error_problem(exc: Exception) -> Response:
    """The problem+json response for an exception ANSWERS maps."""
    answer = _answer(exc)
    return problem(answer.status, answer.detail or str(exc), slug=answer.slug, title=answer.title,
                   errors=_errors(exc), headers=dict(answer.headers))


def item_problem(exc: Exception) -> dict:
    """The problem object of one message of a batch that was not accepted: a refusal as a
    request of its own would be answered; a conflict or an outage, titled `Not accepted`."""
    if isinstance(exc, Refused):
        answer = _answer(exc)
        return problem_body(answer.status, answer.detail or str(exc), slug=answer.slug, title=answer.title,
                            errors=_errors(exc))
    answer = answer_for(exc) or _KAFKA_DOWN
    return problem_body(answer.status, answer.detail or str(exc), title="Not accepted")


def _answer(exc: Exception) -> HttpAnswer:
    answer = answer_for(exc)
    if answer is None:
        raise LookupError(f"no HTTP answer for {type(exc).__name__}") from exc
    return answer


def _errors(exc: Exception) -> list[dict[str, str]] | None:
    return exc.errors if isinstance(exc, Refused) else None
