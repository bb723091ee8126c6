"""Ephemeral messages without services: the setting, the frame, and the hub's fan-out of a frame
with no offset, live and at the seam of a replay (docs/protocol.md: "Ephemeral messages")."""

from __future__ import annotations

import json

import pydantic
import pytest

from pipeline.core.errors import ConfigError
from pipeline.core.frames import ephemeral_frame
from pipeline.core.messages import parse_publish
from pipeline.core.settings import Settings
from pipeline.store.keys import routed, split_routed
from web.hub.frames import server_frame
from web.hub.protocol import _go_live
from web.hub.router import Router, Subscription

BASE = {"HERALD_SECRET_KEY": "k" * 32}


class Socket:
    """What a subscription pushes to, kept in order."""

    def __init__(self):
        self.pushed: list[bytes] = []

    def push(self, data: bytes) -> None:
        self.pushed.append(data)


def test_namespaces_are_read_once_and_decide_by_the_part_before_the_first_colon():
    settings = Settings.from_env({**BASE, "HERALD_EPHEMERAL_NAMESPACES": " typing, cursors "})
    assert settings.ephemeral_namespaces == ("typing", "cursors")
    assert settings.ephemeral("typing:room-1") and settings.ephemeral("cursors:doc:7")
    assert not settings.ephemeral("chat:typing") and not settings.ephemeral("typing")
    assert not Settings.from_env(BASE).ephemeral("typing:room-1")
    for bad in ("typing:x", "ty ping", "t/x"):
        with pytest.raises(ConfigError, match="HERALD_EPHEMERAL_NAMESPACES"):
            Settings.from_env({**BASE, "HERALD_EPHEMERAL_NAMESPACES": bad})


def test_the_frame_is_a_message_frame_without_an_offset():
    envelope = parse_publish({"channel": "typing:r", "data": {"on": True}, "id": "t1"}, sender="ann")
    frame = json.loads(ephemeral_frame(envelope))
    assert "offset" not in frame and frame["ephemeral"] is True
    assert frame["id"] == "t1" and frame["sender"] == "ann"
    server_frame(frame)  # the AsyncAPI model takes it; a stored message's frame needs its offset
    for wrong in ({k: v for k, v in frame.items() if k != "ephemeral"}, {**frame, "offset": "1-0"}):
        with pytest.raises(pydantic.ValidationError):
            server_frame(wrong)
    assert split_routed(routed("", ephemeral_frame(envelope))) == ("", ephemeral_frame(envelope))


def live(last=(5, 0)) -> tuple[Subscription, Socket]:
    ws = Socket()
    sub = Subscription(ws, status=False, presence=False, hold=10, hold_bytes=10_000)
    sub.backlog, sub.last = None, last
    return sub, ws


def test_a_live_subscriber_gets_every_ephemeral_frame_and_the_stored_ones_it_lacks():
    sub, ws = live()
    Router.send_messages({"a": sub}, [None, None], [b"e1", b"e2"])
    assert ws.pushed == [b"e1e2"] and sub.last == (5, 0)  # no offset: the resume point stays
    # Mixed: a stored frame it has is dropped, the ephemeral ones around it are not.
    Router.send_messages({"a": sub}, [(4, 0), None, (6, 0), None], [b"old", b"e3", b"new", b"e4"])
    assert ws.pushed[1:] == [b"e3", b"new", b"e4"] and sub.last == (6, 0)
    # All new: one push, the resume point at the newest stored one.
    Router.send_messages({"a": sub}, [None, (7, 0), None], [b"e5", b"s7", b"e6"])
    assert ws.pushed[-1] == b"e5s7e6" and sub.last == (7, 0)


def test_a_subscriber_mid_replay_gets_them_after_the_replay_in_arrival_order():
    ws = Socket()
    sub = Subscription(ws, status=False, presence=False, hold=10, hold_bytes=10_000)
    sub.last = (3, 0)  # what the replay sent so far
    Router.send_messages({"a": sub}, [(2, 0), None, (4, 0), None], [b"s2", b"e1", b"s4", b"e2"])
    assert ws.pushed == []  # held: nothing before the `subscribed` reply and the replay
    assert _go_live(sub)
    assert ws.pushed == [b"e1", b"s4", b"e2"] and sub.last == (4, 0)


def test_held_ephemeral_frames_are_lost_with_an_overflowing_backlog():
    ws = Socket()
    sub = Subscription(ws, status=False, presence=False, hold=2, hold_bytes=10_000)
    Router.send_messages({"a": sub}, [None, None, None], [b"e1", b"e2", b"e3"])
    assert not _go_live(sub)  # history is read on for the stored ones; the ephemeral ones are gone
    assert ws.pushed == []
    assert _go_live(sub) and ws.pushed == []
