"""The bounds on a message's data at ingest (docs/protocol.md: "Limits"), and the
reason a message the worker cannot handle is dead-lettered with: pure logic."""

from __future__ import annotations

import flask
import pytest

from pipeline.core.errors import PermanentError, Refused
from pipeline.core.messages import (
    MAX_DATA_DEPTH,
    MAX_INT,
    MIN_INT,
    Envelope,
    data_problem,
    decode,
    encode,
    parse_publish,
)
from tasks.processor import REASON_CHARS, failure_reason
from web.openapi import read_json
from web.problems import answer_for


def nested(depth: int, leaf=1, kind=dict):
    value = leaf
    for n in range(depth):
        value = {"k": value} if kind is dict or (kind is None and n % 2) else [value]
    return value


@pytest.mark.parametrize("kind", [dict, list, None])
def test_data_nested_to_the_limit_passes_and_one_level_more_does_not(kind):
    assert data_problem(nested(MAX_DATA_DEPTH, kind=kind)) is None
    assert f"deeper than {MAX_DATA_DEPTH} levels" in data_problem(nested(MAX_DATA_DEPTH + 1, kind=kind))


def test_depth_counts_containers_only_and_the_deepest_branch():
    assert data_problem("text") is None and data_problem(1) is None and data_problem(None) is None
    wide = {"a": [nested(MAX_DATA_DEPTH - 2)] * 50, "b": "x", "c": [nested(3)]}
    assert data_problem(wide) is None
    assert data_problem({"a": [1, 2], "b": [nested(MAX_DATA_DEPTH - 1)]}) is not None


def test_the_depth_check_takes_no_stack_whatever_the_depth():
    assert "deeper than" in data_problem(nested(200_000, kind=list))


@pytest.mark.parametrize("value", [MIN_INT, MAX_INT, 0, -1, True, 1e300, -1e300])
def test_numbers_the_encoder_takes_natively_pass(value):
    assert data_problem({"v": [value]}) is None and data_problem(value) is None


@pytest.mark.parametrize("value", [MIN_INT - 1, MAX_INT + 1, 10 ** 400, -(10 ** 400)])
def test_integers_past_64_bits_are_refused_wherever_they_are(value):
    for data in (value, [value], {"a": {"b": [1, value]}}):
        assert "-2**63..2**64-1" in data_problem(data)


@pytest.mark.parametrize("data", [nested(MAX_DATA_DEPTH + 1), nested(700), {"amount": 10 ** 400}])
def test_parse_publish_refuses_data_out_of_bounds_with_a_400_naming_the_limit(data):
    with pytest.raises(Refused) as info:
        parse_publish({"channel": "pay:x", "data": data}, sender="x", max_bytes=1 << 20)
    error = info.value
    answer = answer_for(error)
    assert answer.status == 400 and answer.title == "Data out of bounds"
    assert error.errors[0]["field"] == "data"
    assert str(MAX_DATA_DEPTH) in error.detail or "2**64-1" in error.detail


def test_parse_publish_accepts_data_at_the_bounds():
    data = {"deep": nested(MAX_DATA_DEPTH - 1), "max": MAX_INT, "min": MIN_INT}
    assert parse_publish({"channel": "pay:x", "data": data}, sender="x").data == data


@pytest.mark.parametrize("data", [nested(MAX_DATA_DEPTH + 1), [MAX_INT + 1]])
def test_a_record_written_past_ingest_is_held_to_the_same_bounds(data):
    record = encode(Envelope(id="m-1", channel="c", type="message", data=data, sender="x", ts=1))
    with pytest.raises(PermanentError, match="the limit"):
        decode(record)
    fine = Envelope(id="m-2", channel="c", type="message", data=nested(MAX_DATA_DEPTH, leaf=MAX_INT), sender="x", ts=1)
    assert decode(encode(fine)) == fine


@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_a_body_too_deep_to_parse_is_a_400_naming_the_limit(depth):
    app = flask.Flask(__name__)
    body = '{"channel":"c","data":' + "[" * depth + "]" * depth + "}"
    with app.test_request_context(data=body, content_type="application/json"), pytest.raises(Refused) as info:
        read_json(1 << 20)
    assert answer_for(info.value).status == 400 and str(MAX_DATA_DEPTH) in info.value.detail


def test_a_failure_reason_names_the_type_and_is_bounded():
    assert failure_reason(ValueError("bad amount")) == "ValueError: bad amount"
    assert failure_reason(RecursionError()) == "RecursionError"
    long = failure_reason(OverflowError("x" * 10_000))
    assert len(long) == REASON_CHARS and long.startswith("OverflowError: xxx")

    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no")

    assert failure_reason(Unprintable()) == "Unprintable: (no message)"
