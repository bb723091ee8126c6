"""Message validation and the record format."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.core.errors import PermanentError, Refused
from pipeline.core.messages import (
    Envelope,
    Publish,
    channel_allowed,
    decode,
    dumps,
    encode,
    namespace,
    new_id,
    parse_publish,
)
from web.problems import answer_for


def test_ids_are_unique_and_sortable_by_time():
    earlier, later = new_id(1_000), new_id(2_000)
    assert len(earlier) == 26 and earlier < later
    assert len({new_id() for _ in range(1000)}) == 1000


def test_parse_fills_defaults():
    envelope = parse_publish({"channel": "chat:lobby", "data": {"a": 1}}, sender="ann")
    assert envelope.type == "message" and envelope.sender == "ann" and envelope.data == {"a": 1}
    assert len(envelope.id) == 26 and envelope.ts > 0


def test_null_data_is_data():
    assert parse_publish({"channel": "c", "data": None}, sender="x").data is None


def test_idempotency_key_becomes_the_id():
    assert parse_publish({"channel": "c", "data": 1}, sender="x", idempotency_key="k-1").id == "k-1"


@pytest.mark.parametrize("body, field", [
    ({"channel": "c"}, "data"),
    ({"data": 1}, "channel"),
    ({"channel": "a b", "data": 1}, "channel"),
    ({"channel": "c", "data": 1, "extra": 2}, "extra"),
    ({"channel": "c", "data": 1, "type": ""}, "type"),
    ({"channel": "c", "data": 1, "id": 5}, "id"),
])
def test_each_bad_field_is_named(body, field):
    with pytest.raises(Refused) as info:
        parse_publish(body, sender="x")
    assert field in {e["field"] for e in info.value.errors}


def test_conflicting_id_and_header():
    with pytest.raises(Refused):
        parse_publish({"channel": "c", "data": 1, "id": "a"}, sender="x", idempotency_key="b")


def test_record_round_trip():
    envelope = parse_publish({"channel": "c:1", "data": ["ü", 1]}, sender="x")
    assert decode(encode(envelope)) == envelope
    assert set(envelope.to_wire()) == {"id", "channel", "type", "data", "sender", "ts"}


def test_pipeline_state_travels_with_the_message_and_stays_out_of_records():
    message = parse_publish({"channel": "c:1", "data": {"a": 1}}, sender="x")
    envelope = dataclasses.replace(message, partition=3, offset=41, prev=None, origin="n1/c7", request_id="r",
                                   skip=True)
    assert Envelope.from_wire(json.loads(json.dumps(envelope.to_wire()))) == envelope  # as Celery carries it
    assert decode(encode(envelope)) == envelope
    assert "prev" not in envelope.to_wire()  # unset fields are left out
    assert envelope.stripped() == message


def test_records_are_strict_json():
    with pytest.raises(PermanentError, match="not JSON"):
        decode(b'{"id":"a","channel":"c","type":"m","data":NaN,"sender":"s","ts":1}')


@pytest.mark.parametrize("value, reason", [
    (None, "no value"), (b"\xff", "not JSON"), (b"[1]", "not a JSON object"), (b"[" * 100_000, "not JSON"),
    (b'{"id":"a"}', "lacks"), (b'{"id":"a","channel":"bad channel","type":"m","data":1,"sender":"s","ts":1}',
                                "channel"),
])
def test_bad_records_say_why(value, reason):
    with pytest.raises(PermanentError, match=reason):
        decode(value)


def test_globs_and_namespaces():
    assert channel_allowed("chat:lobby", ["chat:*"]) and not channel_allowed("news:x", ["chat:*"])
    assert not channel_allowed("chat:lobby", [])
    assert namespace("chat:lobby:x") == "chat" and namespace("plain") == ""


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_strict_json_refuses_nan_and_infinity(constant):
    from pipeline.core.messages import loads

    with pytest.raises(ValueError, match="is not JSON"):
        loads(f'{{"data": {constant}}}')


@pytest.mark.parametrize("data", ["\ud800", {"k": ["ok", "\udfff"]}, float("nan"), float("inf")])
def test_data_that_cannot_be_encoded_is_a_400(data):
    with pytest.raises(Refused) as info:
        parse_publish({"channel": "c", "data": data}, sender="x")
    assert answer_for(info.value).status == 400 and info.value.errors == [{"field": "data",
                                                               "problem": "not encodable as UTF-8 JSON"}]


def test_with_rules_is_replace_of_rules_alone():
    # Every field set to something other than its default: a field added after
    # `rules`, or out of order, would land in the wrong place.
    envelope = Envelope(**{f.name: f"v-{f.name}" for f in dataclasses.fields(Envelope)})
    got = envelope.with_rules({"v": 3})
    assert got == dataclasses.replace(envelope, rules={"v": 3})
    assert envelope.rules == "v-rules"


@pytest.mark.parametrize("body", [{"channel": "chat:x", "data": {"t": "é" * 10}, "id": "abc"},
                                  {"channel": "c", "data": [1, 2], "type": "note"}])
def test_max_bytes_is_the_size_of_the_messages_json_to_the_byte(body):
    size = len(dumps(Publish.model_validate(body).model_dump(exclude_none=True)).encode())
    assert parse_publish(body, sender="u", max_bytes=size).channel == body["channel"]
    with pytest.raises(Refused) as refused:
        parse_publish(body, sender="u", max_bytes=size - 1)
    assert answer_for(refused.value).status == 413


@pytest.mark.parametrize("value", [
    {"a": [1, 2.5, None, "é", True], "b": {"c": "\u2028\n\"\\/"}},
    {"big": 2**70, "negative": -(2**64)},  # past orjson's 64 bits: the standard library encodes them
    [None, 0.1, 1e300, -0.0, ""],
    {"k": None},
])
def test_dumps_writes_what_the_standard_library_reads_back_the_same(value):
    assert json.loads(dumps(value)) == value
    assert " " not in dumps({"a": [1, 2]})


@pytest.mark.parametrize("value", [{"k": [None, float("nan")]}, [None, float("-inf")],
                                   {"a": None, "b": {"c": float("inf")}}])
def test_dumps_refuses_nan_and_infinity_beside_a_null(value):
    # orjson writes them as null: the null in its output is what sends dumps looking for them.
    with pytest.raises(ValueError, match="not JSON"):
        dumps(value)
