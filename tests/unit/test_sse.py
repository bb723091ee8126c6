"""The event stream's pure parts: event ids, the request's bounds, frames turned into events."""

from __future__ import annotations

import json
import types

import pytest

from pipeline.core.errors import InvalidRequest
from web.hub.sse import HEARTBEAT, MAX_EVENT_ID, EventStream, decode_id, encode_id, requested_channels
from web.hub.transport import PING_FRAME, text_payloads, wire_frame

SETTINGS = types.SimpleNamespace(send_queue_size=4, send_queue_bytes=64 * 1024)


def test_an_id_round_trips_every_channels_offset():
    positions = {"a": "1765-0", "room:b.c@d-e_f": "17650000000000-42", "c": "0-0"}
    encoded = encode_id(positions)
    assert decode_id(encoded, 3) == positions
    assert all(ch.isalnum() or ch in "~!-:._@" for ch in encoded)  # URL-safe, one line


@pytest.mark.parametrize("value", [
    "a",                      # no offset
    "a~",                     # empty offset
    "a~1-x",                  # not an offset
    "a~1-0!a~2-0",            # a channel twice
    "a b~1-0",                # not a channel name
    "a~1-0!",                 # an empty entry
    "a~99999999999999999999-0",  # past 2**64
    "a~1-0\r\nX: y",
])
def test_a_malformed_id_is_refused(value):
    with pytest.raises(InvalidRequest):
        decode_id(value, 10)


def test_an_id_is_bounded_in_size_and_channels():
    with pytest.raises(InvalidRequest, match="longer"):
        decode_id("a~1-0!" * (MAX_EVENT_ID // 6) + "b~1-0", 100_000)
    with pytest.raises(InvalidRequest, match="more than 2"):
        decode_id("a~1-0!b~1-0!c~1-0", 2)
    assert decode_id("", 2) == {}


def test_the_channels_are_bounded_in_count_form_and_id_size():
    assert requested_channels(["a", "b", "a"], 2) == ("a", "b")
    with pytest.raises(InvalidRequest, match="at most 2"):
        requested_channels(["a", "b", "c"], 2)
    with pytest.raises(InvalidRequest, match="at least one"):
        requested_channels([], 2)
    with pytest.raises(InvalidRequest, match="must match"):
        requested_channels(["a b"], 2)
    long = [f"{i:03d}" + "x" * 196 for i in range(40)]  # 40 names of 200 characters
    with pytest.raises(InvalidRequest, match="would not fit"):
        requested_channels(long, 100)


def test_text_payloads_reads_what_wire_frame_writes():
    texts = ["x", "y" * 200, "z" * 70_000]
    data = b"".join(wire_frame(text) for text in texts[:2]) + PING_FRAME + wire_frame(texts[2])
    assert text_payloads(data) == [text.encode() for text in texts]


def _events(raw: bytes) -> list[dict]:
    events = []
    for block in raw.decode().split("\n\n"):
        if block:
            events.append(dict(line.split(": ", 1) for line in block.split("\n")))
    return events


def test_message_events_carry_every_channels_position():
    stream = EventStream(SETTINGS, ("a", "b"), {"a": "5-0"}, None)
    frames = [
        {"op": "connected", "client": "c1"},
        {"op": "subscribed", "channel": "a", "offset": "9-0", "recovered": True, "replayed": 3},
        {"op": "subscribed", "channel": "b", "offset": None, "recovered": True, "replayed": 0},
        {"op": "message", "channel": "a", "offset": "6-0"},
        {"op": "message", "channel": "b", "offset": "7-1"},
        {"op": "message", "channel": "other", "offset": "8-0"},
        {"op": "message", "channel": "a", "ephemeral": True},
    ]
    stream.push(b"".join(wire_frame(json.dumps(frame, separators=(",", ":"))) for frame in frames))
    events = _events(stream._queue[0])
    assert [event["event"] for event in events] == ["connected", "subscribed", "subscribed", "message", "message",
                                                    "message", "message"]
    assert [json.loads(event["data"]) for event in events] == frames
    # A replay of `a` from 5-0 keeps it there; `b`, live, starts before every offset; an
    # ephemeral message, with no offset, leaves the id as it was.
    assert [event.get("id") for event in events] == [None, "a~5-0", "a~5-0!b~0-0", "a~6-0!b~0-0", "a~6-0!b~7-1",
                                                     None, None]


def test_a_stream_past_its_queue_is_closed_too_slow():
    stream = EventStream(SETTINGS, ("a",), {}, None)
    overflowed = []
    stream.on_overflow = lambda: overflowed.append(True)
    frame = wire_frame(json.dumps({"op": "message", "channel": "a", "offset": "1-0"}))
    for _ in range(4):
        stream.push(frame)
    assert not stream.closing and stream.queued
    stream.push(frame)
    assert overflowed and stream.closing and stream.close_code == 4008 and not stream.queued


def test_the_body_writes_what_is_queued_and_ends_once_closed():
    stream = EventStream(SETTINGS, ("a",), {}, None)
    closed = []
    stream.on_closed = lambda: closed.append(True)
    body = stream.events()
    assert next(body) == b"retry: 3000\n\n"
    stream.push(wire_frame(json.dumps({"op": "message", "channel": "a", "offset": "1-0"})))
    assert not stream.wait_drained(0.01)
    assert next(body).startswith(b"event: message\nid: a~1-0\n")
    assert stream.ping()
    assert next(body) == HEARTBEAT
    stream.close(1001, "server going away")
    assert list(body) == []  # what was queued is out: the body ends
    assert not stream._pinged and not stream.wait_drained(0.01)  # drained, but closing
    stream.finish()
    stream.finish()
    assert closed == [True]


def test_a_heartbeat_not_written_by_the_next_one_cuts_the_stream():
    stream = EventStream(SETTINGS, ("a",), {}, None)
    assert stream.ping()
    assert not stream.ping()
    assert stream.closing and stream.close_code == 1008
