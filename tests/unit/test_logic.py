"""Pure helpers of the bridge, the task, the auth module and the hub's frame encoder."""

from __future__ import annotations

import time

import jwt
import pytest

from pipeline.bridge.records import ChannelOrder, group_batches
from pipeline.core.settings import Settings
from pipeline.core.streamids import key as stream_id_key
from pipeline.store.gate import PassResult
from tasks.processor import backoff_delay
from web.auth import LEEWAY_SECONDS, AuthError, mint, verify

SETTINGS = Settings.from_env({"HERALD_SECRET_KEY": "k" * 32})


def test_backoff_grows_exponentially_and_is_capped():
    top = [backoff_delay(n, 0.5, 10, rand=lambda: 1.0) for n in range(8)]
    assert top[:5] == [0.5, 1.0, 2.0, 4.0, 8.0] and top[5:] == [10, 10, 10]
    assert backoff_delay(3, 0.5, 10, rand=lambda: 0.0) == 0.0  # full jitter reaches zero


def test_channel_order_remembers_the_previous_offset_per_partition():
    order = ChannelOrder(capacity=2)
    assert order.stamp(0, "a", 5) is None
    assert order.stamp(0, "a", 9) == 5
    assert order.stamp(1, "a", 3) is None
    order.stamp(0, "b", 10)
    order.stamp(0, "c", 11)  # evicts the least recently seen channel, "a"
    assert order.stamp(0, "a", 12) is None
    order.forget([0])
    assert order.stamp(0, "c", 13) is None


def test_channel_order_forgets_a_channel_idle_longer_than_its_gate_lives():
    now = [0.0]
    order = ChannelOrder(forget_after=100, clock=lambda: now[0])
    order.stamp(0, "a", 5)
    now[0] = 99
    assert order.stamp(0, "a", 6) == 5
    now[0] = 200  # its gate may have expired in Redis: waiting for it would stall the record
    assert order.stamp(0, "a", 7) is None
    assert order.stamp(0, "a", 8) == 7


def test_channel_order_seeded_with_what_an_earlier_owner_left_unfinished():
    order = ChannelOrder()
    order.seed(3, {"a": 41, "b": 7})
    assert order.stamp(3, "a", 50) == 41
    assert order.stamp(3, "b", 51) == 7
    assert order.stamp(3, "c", 52) is None


def test_batches_keep_partition_and_offset_order_and_take_partitions_in_turn():
    records = [(0, {"o": 1}), (1, {"o": 2}), (0, {"o": 3}), (0, {"o": 4}), (0, {"o": 5}), (1, {"o": 6}),
               (1, {"o": 7}), (0, {"o": 8})]
    batches = list(group_batches(records, 2))
    assert batches == [(0, [{"o": 1}, {"o": 3}]), (1, [{"o": 2}, {"o": 6}]), (0, [{"o": 4}, {"o": 5}]),
                       (1, [{"o": 7}]), (0, [{"o": 8}])]


def test_stream_ids_order_numerically():
    assert stream_id_key("10-0") > stream_id_key("9-5") > stream_id_key("9-4")
    assert stream_id_key("junk") < stream_id_key("0-0")


def test_token_round_trip_and_globs():
    identity = verify(mint(SETTINGS, "ann", publish=["chat:*"], subscribe=["*"]), SETTINGS)
    assert identity.user == "ann" and identity.may_publish("chat:x") and not identity.may_publish("news:x")
    assert identity.may_subscribe("anything") and not identity.admin


@pytest.mark.parametrize("make", [
    lambda: None,
    lambda: "not-a-jwt",
    lambda: jwt.encode({"sub": "a", "exp": int(time.time()) - 60}, "k" * 32, algorithm="HS256"),
    lambda: jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, "wrong" * 8, algorithm="HS256"),
    lambda: jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, None, algorithm="none"),
    lambda: jwt.encode({"sub": "a"}, "k" * 32, algorithm="HS256"),
])
def test_bad_tokens_are_refused(make):
    with pytest.raises(AuthError):
        verify(make(), SETTINGS)


def test_a_token_verified_once_is_still_refused_once_it_expires(monkeypatch):
    token = mint(SETTINGS, "ann", ttl=60)
    assert verify(token, SETTINGS).user == "ann"  # now its signature check is cached
    later = time.time() + 60 + LEEWAY_SECONDS + 1
    monkeypatch.setattr(time, "time", lambda: later)
    with pytest.raises(AuthError, match="expired"):
        verify(token, SETTINGS)


def test_a_token_signed_with_another_secret_is_refused_after_the_right_one_was_cached():
    token = mint(SETTINGS, "ann")
    verify(token, SETTINGS)
    other = Settings.from_env({"HERALD_SECRET_KEY": "x" * 32})
    with pytest.raises(AuthError):
        verify(token, other)


def test_auth_off_allows_everything():
    identity = verify(None, Settings.from_env({"HERALD_AUTH": "off", "HERALD_DEV": "1"}))
    assert identity.may_publish("x") and identity.admin


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_a_broadcast_frame_encoded_once_matches_wsproto(size):
    from wsproto import ConnectionType
    from wsproto.connection import Connection, ConnectionState
    from wsproto.events import TextMessage

    from web.hub.transport import wire_frame

    text = ("é" + "x" * size)[:size] if size else ""
    server = Connection(ConnectionType.SERVER)
    assert server.state == ConnectionState.OPEN
    assert wire_frame(text) == server.send(TextMessage(data=text))


@pytest.mark.parametrize("value, valid", [
    ("0-0", True), ("1700000000000-3", True), ("17", True), (str(2**64 - 1) + "-0", True),
    (str(2**64) + "-0", False), ("1-" + str(2**64), False), ("\u0663-1", False), (" 1-2", False),
    ("1_000-2", False), ("+1-2", False), ("1-", False), ("-1", False), ("1-2-3", False), ("", False), (17, False),
])
def test_stream_offsets_are_validated_as_redis_writes_them(value, valid):
    from pipeline.core.streamids import valid as valid_stream_id

    assert valid_stream_id(value) is valid


def _processor(deliver):
    from tasks.processor import Processor

    class Store:
        def mark_processing(self, envelopes):
            return ["processing"] * len(envelopes)

    class Archive:
        def store(self, envelopes):
            pass

        def record_offsets(self, placed):
            pass

    store = Store()
    store.deliver = deliver
    return Processor(SETTINGS, store, Archive(), dead_letters=None)


def test_a_transient_failure_while_taking_on_parked_records_hands_them_on_with_retries_of_their_own():
    # They are still parked, and due; folded into this task's retry they could be
    # dead-lettered for its failures (docs/design.md: "Order").
    import redis

    from pipeline.core.messages import Envelope

    first = Envelope("a1", "a", "message", 1, "s", 0, partition=0, offset=5, prev=4)
    parked = Envelope("a2", "a", "message", 2, "s", 0, partition=0, offset=9, prev=5)
    calls = []

    def deliver(envelopes):
        calls.append([e.id for e in envelopes])
        if len(calls) == 1:
            return [PassResult("delivered", "1-0", False, (parked,))]
        raise redis.ConnectionError("Redis went away")

    outcome = _processor(deliver).run([first])
    assert outcome.delivered == 1 and outcome.due == [parked]
    assert calls == [["a1"], ["a2"]]


def test_parked_records_due_in_many_channels_are_taken_on_together_each_once():
    # One round trip a round for every channel's next record, not one each; two
    # records of a channel naming the same successor bring it once.
    from pipeline.core.messages import Envelope

    batch = [Envelope(f"m{n}", f"c{n % 20}", "message", n, "s", 0, partition=0, offset=100 + n, prev=n)
             for n in range(40)]
    due = {f"c{n}": Envelope(f"d{n}", f"c{n}", "message", n, "s", 0, partition=0, offset=200 + n, prev=120 + n)
           for n in range(20)}
    calls = []

    def deliver(envelopes):
        calls.append(len(envelopes))
        if len(calls) == 1:
            return [PassResult("delivered", "1-0", False, (due[e.channel],)) for e in envelopes]
        return [PassResult("delivered", "1-0", False)] * len(envelopes)

    outcome = _processor(deliver).run(batch)
    assert outcome.delivered == 60 and not outcome.due
    assert calls == [40, 20]


class _Record:
    """A consumed Kafka record as confluent-kafka gives it: message `m<partition>-<offset>`."""

    def __init__(self, partition, offset, channel):
        from pipeline.core.messages import Envelope, encode

        self._at = (partition, offset)
        self._value = encode(Envelope(f"m{partition}-{offset}", channel, "message", 1, "s", 0))

    def error(self):
        return None

    def partition(self):
        return self._at[0]

    def offset(self):
        return self._at[1]

    def value(self):
        return self._value

    def timestamp(self):
        return 1, 1_700_000_000_000  # TIMESTAMP_CREATE_TIME, as a producer sets it

    def headers(self):
        return None


def _bridge():
    """A Bridge with a fake store, Celery and consumer; returns it and what it recorded:
    {"scans", "sent", "tracked", "stamps", "seeks"}."""
    from pipeline.bridge import Bridge
    from pipeline.taskqueue import DISPATCHED_HEADER

    seen = {"scans": [], "sent": [], "tracked": [], "stamps": [], "seeks": []}

    class Store:
        def in_flight_before(self, first_offsets):
            seen["scans"].append(dict(first_offsets))
            return {1: {"c1": 8}}

        def track_dispatched(self, envelopes, at):
            seen["tracked"].append(sorted(e.id for e in envelopes))
            seen["stamps"].append(at)

    class Celery:
        def send_task(self, name, args, headers):
            seen["sent"].append(args[0])
            seen["stamps"].append(headers[DISPATCHED_HEADER])

    class DeadLetters:
        store = Store()

    class Consumer:
        def store_offsets(self, offsets):
            pass

        def seek(self, tp):
            seen["seeks"].append((tp.partition, tp.offset))

    bridge = Bridge(SETTINGS, Celery(), DeadLetters())
    bridge.consumer = Consumer()
    return bridge, seen


def test_partitions_first_seen_in_one_poll_are_seeded_with_one_scan_and_tracked_with_one_write():
    # The scan reads the whole index: once per newly assigned partition, it
    # was a third of the bridge's CPU while a backlog drained.
    bridge, seen = _bridge()
    bridge.unseeded.update({0, 1, 2})
    bridge.handle([_Record(0, 5, "c0"), _Record(1, 9, "c1"), _Record(0, 6, "c0"), _Record(1, 10, "c1")])
    bridge.handle([_Record(2, 3, "c2")])
    assert seen["scans"] == [{0: 5, 1: 9}, {2: 3}]
    # A poll's batches go into the in-flight index in one round trip, before any is sent.
    # One task per poll (pack_tasks), its partitions each in offset order.
    assert seen["tracked"] == [["m0-5", "m0-6", "m1-10", "m1-9"], ["m2-3"]] and len(seen["sent"]) == 2
    # Each task carries the time its messages went into the queued set (docs/design.md: "Under faults").
    stamps = seen["stamps"]
    assert stamps[0] == stamps[1] <= stamps[2] == stamps[3]
    prev = {w["id"]: w.get("prev") for batch in seen["sent"] for w in batch}
    assert prev == {"m0-5": None, "m0-6": 5, "m1-9": 8, "m1-10": 9, "m2-3": None}


def test_offsets_the_broker_skipped_are_read_again_before_the_records_after_them_go_on():
    # Tansu under load once handed over a partition's records without three of
    # them (bench/overload.py): accepted messages left `accepted` for ever.
    bridge, seen = _bridge()
    bridge.handle([_Record(4, 10, "c"), _Record(4, 11, "c"), _Record(5, 1, "d")])
    bridge.handle([_Record(4, 15, "c"), _Record(4, 16, "c"), _Record(5, 2, "d")])  # 12-14 missing
    assert seen["seeks"] == [(4, 12)]
    assert seen["tracked"][1] == ["m5-2"]  # 15 and 16 wait for what comes before them
    bridge.handle([_Record(4, 12, "c"), _Record(4, 13, "c"), _Record(4, 14, "c"), _Record(4, 15, "c")])
    sent = [w["id"] for batch in seen["sent"] for w in batch if w["channel"] == "c"]
    assert sent == ["m4-10", "m4-11", "m4-12", "m4-13", "m4-14", "m4-15"]
    assert [w.get("prev") for batch in seen["sent"] for w in batch if w["channel"] == "c"] == [None, 10, 11, 12, 13,
                                                                                              14]
    # A gap that stays through GAP_REREADS reads is let stand: what follows it goes on.
    for _read in range(3):
        bridge.handle([_Record(4, 20, "c")])  # 16-19 never come
    assert seen["seeks"] == [(4, 12), (4, 16), (4, 16), (4, 16)]
    bridge.handle([_Record(4, 20, "c")])
    assert [w["id"] for w in seen["sent"][-1]] == ["m4-20"]


def test_a_batch_is_one_log_line_naming_its_messages(caplog):
    import logging

    from pipeline.core.messages import Envelope

    batch = [Envelope(f"m{n}", "c", "message", n, "s", 0, partition=2, offset=10 + n, prev=9 + n) for n in range(50)]
    results = [PassResult("delivered", "1-0", False)] * 49 + [PassResult("duplicate", "1-0", False)]
    with caplog.at_level(logging.INFO, logger="herald.processing"):
        _processor(lambda envelopes: results).run(batch)
    (record,) = [r for r in caplog.records if r.name == "herald.processing"]
    assert record.delivered_ids == [f"m{n}" for n in range(49)] and record.duplicate_ids == ["m49"]
    assert record.partitions == {2: [10, 59]}


def test_a_batch_is_recorded_in_redis_in_one_round_trip_with_the_answers_of_its_claimed_ids(caplog):
    import json
    import logging

    from pipeline.core.ids import scoped
    from pipeline.core.messages import Envelope
    from pipeline.ingest import Ingest

    calls = []

    class Store:
        def claim_idempotency(self, msg_id, claim):
            return None

        def record_accepted(self, accepted, answers):
            calls.append((accepted, answers))

    class Publisher:
        def send(self, topic, key, value, headers):
            return int(json.loads(value)["data"])

        def wait(self, future):
            return 3, 100 + future

    envelopes = [Envelope(f"m{n}", "c", "message", n, "s", 0) for n in range(100)]
    with caplog.at_level(logging.INFO, logger="herald.ingest"):
        answers = Ingest(SETTINGS, Store(), Publisher()).publish_many(
            envelopes, idempotent=[n == 7 for n in range(100)], request_id="r1")
    # The client's id is scoped to its sender (docs/protocol.md: "Message ids"); the answer echoes it as sent.
    m7 = scoped("s", "m7")
    assert answers[7] == {"id": "m7", "global_id": m7, "channel": "c", "status": "accepted", "partition": 3,
                          "offset": 107}
    ((accepted, stored),) = calls
    ids = [f"m{n}" if n != 7 else m7 for n in range(100)]
    assert [(e.id, p, o) for e, p, o in accepted] == [(ids[n], 3, 100 + n) for n in range(100)]
    ((claim, answer),) = stored.values()
    assert list(stored) == [m7] and "claim" in json.loads(claim) and json.loads(answer) == {"answer": answers[7]}
    (record,) = [r for r in caplog.records if r.name == "herald.ingest"]
    assert record.message_ids == ids and record.request_id == "r1"


def _submit_while_a_write_is_under_way(write_error=None):
    import threading

    from pipeline.ingest import GroupCommit

    writes, release, outcomes = [], threading.Event(), {}

    def write(items):
        writes.append(list(items))
        if len(writes) == 1:
            release.wait(5)
        elif write_error is not None:
            raise write_error

    commit = GroupCommit(write)

    def submit(name):
        try:
            commit.submit([name])
            outcomes[name] = "written"
        except Exception as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=submit, args=(name,)) for name in "abcd"]
    threads[0].start()
    while not writes:
        time.sleep(0.001)
    for thread in threads[1:]:
        thread.start()
    while len(commit._waiting) < 3:
        time.sleep(0.001)
    release.set()
    for thread in threads:
        thread.join(5)
    return writes, outcomes


def test_status_writes_that_come_during_a_write_go_together_in_the_next():
    writes, outcomes = _submit_while_a_write_is_under_way()
    assert writes[0] == ["a"] and sorted(writes[1]) == ["b", "c", "d"] and len(writes) == 2
    assert outcomes == {name: "written" for name in "abcd"}


def test_a_failed_group_write_fails_every_caller_in_it():
    import redis

    failure = redis.ConnectionError("Redis went away")
    writes, outcomes = _submit_while_a_write_is_under_way(failure)
    assert outcomes["a"] == "written"
    assert all(outcomes[name] is failure for name in "bcd")


def test_the_sqlite_archive_syncs_at_checkpoints_not_at_every_commit(tmp_path):
    # FULL's fsync per commit capped each worker's tasks a second (docs/benchmarks.md: History).
    from pipeline.archive import Archive

    archive = Archive(f"sqlite:///{tmp_path / 'archive.db'}")
    with archive.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    archive.dispose()
