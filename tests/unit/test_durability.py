"""The bridge's holding back of offsets until Redis has kept their tasks (pipeline.bridge.durability)."""

from __future__ import annotations

import redis
from confluent_kafka import OFFSET_BEGINNING, OFFSET_INVALID, TopicPartition

from pipeline.bridge.durability import Durability, rewind_positions


class Servers:
    """Run ids as a server would answer them: `ids`, or an error while `down`."""

    def __init__(self):
        self.ids = ("first",)
        self.down = False

    def __call__(self):
        if self.down:
            raise redis.ConnectionError("refused")
        return self.ids


def durability(servers, now):
    return Durability(servers, lag=3.0, interval=0.5, clock=lambda: now[0])


def test_offsets_are_stored_only_once_the_same_server_answered_lag_seconds_after_their_tasks():
    servers, now = Servers(), [100.0]
    held = durability(servers, now)
    assert held.check() == {}
    held.hold({0: 11, 1: 5})
    now[0] = 101.0
    held.hold({0: 12})
    now[0] = 102.9
    assert held.check() == {}
    now[0] = 103.0
    assert held.check() == {0: 11, 1: 5}
    now[0] = 104.0
    assert held.check() == {0: 12}
    assert held.check() == {}


def test_no_answer_keeps_them_held():
    servers, now = Servers(), [100.0]
    held = durability(servers, now)
    held.check()
    held.hold({0: 11})
    servers.down = True
    now[0] = 110.0
    assert held.check() == {}
    servers.down = False
    assert held.check() == {0: 11}


def test_a_restarted_server_drops_what_is_held_until_the_bridge_read_again():
    servers, now = Servers(), [100.0]
    held = durability(servers, now)
    held.check()
    held.hold({0: 11})
    servers.ids = ("second",)
    now[0] = 110.0
    assert held.check() == {} and held.rewind_needed
    held.hold({0: 30})  # sent before the rewind: read and sent again after it
    now[0] = 120.0
    assert held.check() == {} and held.rewind_needed
    held.rewound()
    held.hold({0: 12})
    now[0] = 123.0
    assert held.check() == {0: 12} and not held.rewind_needed


def test_offsets_held_before_the_first_answer_are_read_again():
    servers, now = Servers(), [100.0]
    held = durability(servers, now)
    held.hold({0: 11})
    now[0] = 110.0
    assert held.check() == {} and held.rewind_needed


def test_a_clean_stop_waits_out_the_lag_once():
    servers, now = Servers(), [100.0]
    held = durability(servers, now)
    held.check()
    held.hold({0: 11})
    now[0] = 101.0
    held.hold({0: 12})
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    assert held.settle(sleep) == {0: 12}
    assert slept == [3.0]
    assert held.settle(sleep) == {} and slept == [3.0]


def test_rewind_goes_to_the_committed_offset_or_the_oldest_in_flight_if_lower():
    committed = [TopicPartition("t", 0, 50), TopicPartition("t", 1, 40), TopicPartition("t", 2, OFFSET_INVALID)]
    positions = rewind_positions("t", committed, {0: 45, 1: 60, 2: 7})
    assert [(tp.partition, tp.offset) for tp in positions] == [(0, 45), (1, 40), (2, OFFSET_BEGINNING)]
