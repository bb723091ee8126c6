"""The two tables that turn Herald's errors into answers: HTTP problems (web/problems.py)
and WebSocket error codes (web/hub/protocol.py). The errors carry neither."""

from __future__ import annotations

from typing import get_args

import pytest
import redis

from pipeline.archive import ArchiveUnavailable
from pipeline.core import errors
from pipeline.dlq import NoDeadLetter, NotReplayable
from pipeline.ingest import ClaimUnavailable, IdTooLong
from web.auth import AuthError
from web.hub import frames
from web.hub.errors import ERROR_CODES, BadChannel, BadFrame, TooManySubscriptions, Unavailable, error_code
from web.problems import NOT_ACCEPTED, answer_for


def test_the_error_codes_are_exactly_the_frames_closed_set():
    assert set(ERROR_CODES.values()) == set(get_args(frames.ErrorCode))


@pytest.mark.parametrize(("exc", "code"), [
    (Unavailable("retry"), "unavailable"),
    (BadFrame("x"), "bad_frame"),
    (BadChannel("x"), "bad_channel"),
    (errors.InvalidInput("x"), "invalid_message"),
    (IdTooLong(), "invalid_message"),
    (errors.DataOutOfBounds("x"), "data_out_of_bounds"),
    (errors.Unencodable("x"), "unencodable_data"),
    (errors.Forbidden("x"), "forbidden"),
    (TooManySubscriptions("x"), "too_many_subscriptions"),
    (errors.TooLarge("x"), "payload_too_large"),
    (errors.TooLargeForKafka("x"), "message_too_large"),
])
def test_each_refusal_has_its_websocket_code(exc, code):
    assert error_code(exc) == code


@pytest.mark.parametrize(("exc", "status", "title", "slug"), [
    (errors.InvalidInput("x"), 422, "Invalid message", None),
    (IdTooLong(), 422, "Invalid message", None),
    (errors.InvalidRequest("x"), 400, "Bad request", None),
    (errors.InvalidRuleSet("x"), 422, "Invalid rule set", None),
    (errors.DataOutOfBounds("x"), 400, "Data out of bounds", None),
    (errors.Unencodable("x"), 400, "Unencodable data", None),
    (errors.Malformed("x"), 400, "Malformed JSON", None),
    (errors.Forbidden("x"), 403, "Forbidden", None),
    (errors.TooLarge("x"), 413, "Payload too large", None),
    (errors.TooLargeForKafka("x"), 413, "Message too large", None),
    (errors.UnsupportedMedia("x"), 415, "Unsupported media type", None),
    (AuthError("x"), 401, "Unauthorized", "unauthorized"),
    (NoDeadLetter("x"), 404, "Not found", "not-replayable"),
    (NotReplayable("x"), 409, "Conflict", "not-replayable"),
    (errors.IdempotencyConflict("x"), 409, "Conflict", "idempotency-conflict"),
    (errors.KafkaUnavailable("x"), 503, "Service unavailable", "kafka-unavailable"),
    (ClaimUnavailable("x"), 503, "Service unavailable", "kafka-unavailable"),
    (errors.RedisUnavailable("x"), 503, "Service unavailable", "redis-unavailable"),
    (redis.ConnectionError("x"), 503, "Service unavailable", "redis-unavailable"),
    (ArchiveUnavailable("x"), 503, "Service unavailable", "archive-unavailable"),
])
def test_each_error_has_its_http_answer(exc, status, title, slug):
    answer = answer_for(exc)
    assert (answer.status, answer.title, answer.slug) == (status, title, slug)


def test_an_outage_answer_never_carries_the_errors_text():
    for exc in (errors.KafkaUnavailable("kafka:9092"), ClaimUnavailable("redis:6379")):
        assert answer_for(exc).detail == NOT_ACCEPTED


def test_errors_carry_no_transport():
    for exc in (errors.Forbidden("x"), errors.TooLarge("x"), errors.InvalidInput("x", [])):
        assert not hasattr(exc, "status") and not hasattr(exc, "title")


def test_the_protocol_document_lists_every_websocket_error_code():
    from pathlib import Path

    document = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    listed = {line.split("`")[1] for line in document.splitlines() if line.startswith("| `")}
    assert set(get_args(frames.ErrorCode)) <= listed
