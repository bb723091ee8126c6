"""Occupancy's pure parts: the pending entries' names, the listing's cursor, and which
events a process builds and when its leaves wait (docs/occupancy.md)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.core.events import Receiver
from pipeline.store.occupancy import member, pending, vacancy
from pipeline.webhooks import Outbox
from web.channels import ChannelsQuery, decode_cursor, encode_cursor
from web.hub.occupancy import Occupancy


def test_a_pending_leave_and_a_pending_vacate_never_share_a_name():
    assert member("a:b", "u") == '["a:b","u"]' and vacancy("a:b") == '["a:b"]'
    assert pending(member("a:b", "u")) == ("a:b", "u")
    assert pending(vacancy("a:b")) == ("a:b", None)


@pytest.mark.parametrize("channel", ["a", "room:1", "x" * 200, "a.b@c-d_e"])
def test_the_cursor_is_opaque_and_round_trips(channel):
    cursor = encode_cursor(channel)
    assert ChannelsQuery.model_validate({"cursor": cursor}).cursor == cursor
    assert decode_cursor(cursor) == channel.encode()


@pytest.mark.parametrize("cursor", ["!!", "abc", "", "AB", "00" * 201])
def test_a_cursor_no_page_gave_is_refused(cursor):
    with pytest.raises(ValueError):
        ChannelsQuery.model_validate({"cursor": cursor})


def side(grace: float, *globs: str) -> Occupancy:
    receivers = (Receiver("http://127.0.0.1:9/hook", globs),) if globs else ()
    settings = SimpleNamespace(presence_grace=grace, webhooks=receivers)
    store = SimpleNamespace(occupancy=None, keys=None)
    return Occupancy(store, Outbox(store, settings), settings, "node")


def test_leaves_wait_only_when_a_grace_is_set_and_a_receiver_would_see_the_pair():
    assert side(3, "*").user_grace == 3 and side(3, "*").channel_grace == 3
    assert side(0, "*").waits is False
    assert side(3).waits is False  # no receivers: counts only
    only_channels = side(3, "channel.*")
    assert (only_channels.user_grace, only_channels.channel_grace) == (0, 3)
    assert side(3, "presence.join").user_grace == 3  # a join without its leave is still saved from a reconnect
    assert side(3, "connection.closed").waits is False


def test_only_wanted_events_are_built():
    occupancy = side(3, "presence.*", "connection.closed")
    assert occupancy._body("channel.occupied", "c") == ""
    assert '"type":"presence.join"' in occupancy._body("presence.join", "c", user="u")
    closed = occupancy.closed_event("client1", "u", 4008, "too slow")
    assert closed is not None and "channel" not in closed
    assert {k: closed[k] for k in ("type", "client", "user", "code", "reason")} == {
        "type": "connection.closed", "client": "client1", "user": "u", "code": 4008, "reason": "too slow"}
    assert side(3, "presence.*").closed_event("client1", "u", 1000, "") is None
