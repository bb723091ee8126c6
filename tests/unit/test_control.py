"""The server API's command format (web/hub/control.py): one encoder, one decoder, every field bounded."""

from __future__ import annotations

import json

import pytest

from web.hub import control
from web.hub.control import (
    BadCommand,
    Disconnect,
    RevokeToken,
    RevokeUser,
    Subscribe,
    Unsubscribe,
    decode,
    encode,
)

COMMANDS = [
    Disconnect("alice"),
    Disconnect("alice", 4321, "banned for spam"),
    Disconnect("ünïcode", 4999, "é" * 60),  # 120 bytes
    Subscribe("bob", "room:1"),
    Subscribe("bob", "room:1", "1700000000000-3"),
    Unsubscribe("bob", "room:1"),
    RevokeToken("abc123", 1_800_000_000.5),
    RevokeUser("carol", 1_700_000_000.25),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: type(c).__name__)
def test_round_trip(command):
    payload = encode(command)
    assert len(payload) <= control.MAX_COMMAND_BYTES
    assert decode(payload) == command
    assert decode(payload.encode()) == command


def test_defaults_are_the_documented_close():
    command = Disconnect("alice")
    assert (command.code, command.reason) == (4010, "disconnected by the server")


@pytest.mark.parametrize("make", [
    lambda: Disconnect("alice", 3999),
    lambda: Disconnect("alice", 5000),
    lambda: Disconnect("alice", 1000),
    lambda: Disconnect("alice", True),
    lambda: Disconnect("alice", 4010, "x" * 121),
    lambda: Disconnect("alice", 4010, "é" * 61),  # 122 bytes
    lambda: Disconnect("alice", 4010, "\ud800"),
    lambda: Disconnect(""),
    lambda: Disconnect("u" * (control.MAX_USER + 1)),
    lambda: Subscribe("bob", "bad channel"),
    lambda: Subscribe("bob", "room:1", "not-an-offset"),
    lambda: Subscribe("bob", "room:1", str(2 ** 64)),
    lambda: Unsubscribe("bob", ""),
    lambda: RevokeToken("", 1.0),
    lambda: RevokeToken("j" * 129, 1.0),
    lambda: RevokeUser("carol", -1),
    lambda: RevokeUser("carol", float("inf")),
    lambda: RevokeUser("carol", "now"),
])
def test_out_of_bounds_commands_cannot_be_made(make):
    with pytest.raises(BadCommand):
        make()


@pytest.mark.parametrize("payload", [
    b"",
    b"not json",
    b"[]",
    b"null",
    b'{"user": "alice"}',
    b'{"op": "explode", "user": "alice"}',
    b'{"op": "disconnect"}',
    b'{"op": "disconnect", "user": "alice", "extra": 1}',
    b'{"op": "disconnect", "user": "alice", "code": 1000}',
    b'{"op": "disconnect", "user": "alice", "code": "4010"}',
    b'{"op": "subscribe", "user": "bob", "channel": "a b"}',
    b'{"op": "revoke_token", "jti": "x", "lapse": 1e400}',
    b"[" * 100_000,
    json.dumps({"op": "disconnect", "user": "alice", "reason": "x" * 5000}).encode(),
])
def test_hostile_payloads_are_refused(payload):
    with pytest.raises(BadCommand):
        decode(payload)


@pytest.mark.parametrize("reason, clipped", [
    ("short", "short"),
    ("x" * 200, "x" * 120),
    ("é" * 61, "é" * 60),  # 122 bytes: the last character would be cut in half
    ("a\ud800b", "a?b"),
])
def test_a_reason_is_clipped_to_what_a_close_frame_carries(reason, clipped):
    assert control.clip_reason(reason) == clipped
    assert control.check_reason(clipped) == clipped
