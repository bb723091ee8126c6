"""The order gate on a real Redis: a record before its predecessor is parked, and the
pass of that predecessor brings it back (docs/design.md: "Order")."""

from __future__ import annotations

import re
import time
import uuid

from pipeline.core.messages import Envelope
from pipeline.store import Store


def _line(channel: str, count: int, first: int = 10) -> list[Envelope]:
    # A channel's records at offsets first, first+2, ... (another channel's between them).
    offsets = [first + 2 * n for n in range(count)]
    return [Envelope(f"{channel}-{n}", channel, "message", {"n": n}, "s", 0, partition=0, offset=offset,
                     prev=offsets[n - 1] if n else None, rules={"v": 1, "matched": []})
            for n, offset in enumerate(offsets)]


def _history(store: Store, channel: str) -> list[str]:
    # The message ids in the channel's history, in order (each entry holds its frame's head).
    return [re.search(r'"id":"([^"]+)"', fields["f"])[1] for _sid, fields in store.redis.xrange(
        store.keys.history(channel))]


def test_records_parked_in_any_order_are_taken_on_in_order_by_whoever_passes_before_them(spare_store):
    store = spare_store()
    channel = f"c{uuid.uuid4().hex[:8]}"
    line = _line(channel, 5)
    for record in reversed(line[1:]):  # every later record reaches the gate first
        assert store.deliver([record])[0][:3] == ("parked", "", False)
    assert store.redis.hlen(store.keys.parked(channel)) == 4
    seen, due = [], [line[0]]
    while due:
        (result,) = store.deliver(due)
        assert result.outcome == "delivered" and not result.forced
        seen.append(due[0].id)
        due = list(result.due)
        assert due == line[len(seen):len(seen) + 1]  # as parked: its rules' decision kept
    assert seen == [r.id for r in line] == _history(store, channel)
    assert not store.redis.exists(store.keys.parked(channel), store.keys.waiting(channel))


def test_a_record_taken_on_by_a_worker_that_died_is_brought_back_by_the_next_pass(spare_store):
    # The parked entry leaves only when its record passes: a task run again
    # (its predecessor a duplicate now) brings it back.
    store = spare_store()
    channel = f"c{uuid.uuid4().hex[:8]}"
    first, second, third = _line(channel, 3)
    store.deliver([third])
    store.deliver([second])
    assert store.deliver([first])[0].due == (second,)  # ...and the worker holding it died
    again = store.deliver([first])[0]
    assert (again.outcome, again.due) == ("duplicate", (second,))
    assert store.deliver([second])[0][::3] == ("delivered", (third,))
    assert store.deliver([third])[0][::3] == ("delivered", ())
    assert _history(store, channel) == [first.id, second.id, third.id]


def test_a_lines_head_alone_passes_without_its_predecessor_once_parked_order_wait(spare_store):
    store = spare_store(HERALD_ORDER_WAIT="1")
    channel = f"c{uuid.uuid4().hex[:8]}"
    lost, head, behind = _line(channel, 3)
    store.deliver([behind])
    store.deliver([head])
    time.sleep(1.1)
    assert store.deliver([behind])[0].outcome == "parked"  # its predecessor is parked itself: it keeps its place
    forced = store.deliver([head])[0]
    assert forced[:3] == ("delivered", forced.stream_id, True) and forced.due == (behind,)
    passed = store.deliver([behind])[0]
    assert (passed.outcome, passed.forced) == ("delivered", False)
    assert _history(store, channel) == [head.id, behind.id]
    assert store.deliver([lost])[0].outcome == "delivered"  # late, after its successors: what forcing costs


def test_a_record_passing_below_a_gate_that_jumped_brings_back_the_one_parked_behind_it(spare_store):
    # A record stamped without its predecessor (the bridge forgot the channel)
    # moves the gate past a line: the line's records are still taken on.
    store = spare_store()
    channel = f"c{uuid.uuid4().hex[:8]}"
    a, b, c = _line(channel, 3)  # offsets 10, 12, 14
    jumped = Envelope(f"{channel}-x", channel, "message", {}, "s", 0, partition=0, offset=30, prev=None)
    assert store.deliver([a])[0].outcome == "delivered"
    assert store.deliver([c])[0].outcome == "parked"
    assert store.deliver([jumped])[0].due == ()
    assert store.deliver([b])[0][::3] == ("delivered", (c,))
    assert store.deliver([c])[0].outcome == "delivered"
    assert not store.redis.exists(store.keys.parked(channel))


def test_a_parked_record_this_worker_cannot_read_is_left_parked_and_the_pass_stands(spare_store):
    store = spare_store()
    channel = f"c{uuid.uuid4().hex[:8]}"
    first, second = _line(channel, 2)
    store.redis.hset(store.keys.parked(channel), str(first.offset), b'{"id": "x"}')  # another version's record
    assert store.deliver([first])[0][::3] == ("delivered", ())
    assert store.redis.hlen(store.keys.parked(channel)) == 1
    assert _history(store, channel) == [first.id]
