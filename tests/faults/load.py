"""Load and accounting for the fault-injection suite.

`Publisher` posts messages with unique client ids (so a retried POST is
idempotent), one after the other, and records which ones got a 202 and in
what order; `Collector` subscribes over a WebSocket, resumes with `since`
after any disconnect, and records deliveries per id in arrival order.
`report()` prints and returns the figures every fault test asserts on: lost,
duplicated and reordered, at the subscriber and in history.
"""

from __future__ import annotations

import collections
import json
import socket
import threading
import time
import uuid

import websocket

from tests.harness import wait_until


class Publisher(threading.Thread):
    """Posts `count` messages over `channels`, round-robin over web processes, at about `rate`/s;
    with `until`, goes on past `count` until that event is set (faults injected meanwhile
    then all happen under load, however slow the machine)."""

    def __init__(self, webs, token: str, channels: list[str], count: int, rate: float = 100.0,
                 give_up_after: float = 60.0, key_header: bool = False, until: threading.Event | None = None):
        super().__init__(daemon=True)
        self.webs, self.token, self.channels = webs, token, channels
        self.count, self.interval, self.give_up_after = count, 1.0 / rate, give_up_after
        self.key_header = key_header  # the id as an Idempotency-Key header instead of in the body
        self.tag = uuid.uuid4().hex[:8]
        self.accepted: dict[str, dict] = {}  # in publish order: each POST waits for the one before
        self.refused = collections.Counter()
        self.published = 0
        self.until = until

    def run(self) -> None:
        next_at = time.monotonic()
        n = -1
        while (n := n + 1) < self.count or (self.until is not None and not self.until.is_set()):
            msg_id = f"{self.tag}-{n:05d}"
            body = {"channel": self.channels[n % len(self.channels)], "data": {"n": n}}
            headers = {"Idempotency-Key": msg_id} if self.key_header else {}
            if not self.key_header:
                body["id"] = msg_id
            self.published += 1
            deadline = time.monotonic() + self.give_up_after
            attempt = 0
            while time.monotonic() < deadline:
                web = self.webs[(n + attempt) % len(self.webs)]
                attempt += 1
                try:
                    status, _, answer = web.request("POST", "/api/v1/messages", body, token=self.token,
                                                    headers=headers, timeout=10)
                except OSError:
                    status, answer = "connection", None
                if status == 202:
                    self.accepted[msg_id] = answer
                    break
                self.refused[status] += 1
                time.sleep(0.2)  # the same id again: idempotent
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.monotonic()))


class Collector(threading.Thread):
    """A subscriber that never misses a message: it reconnects and resumes from its last offsets."""

    def __init__(self, web_choices, token: str, channels: list[str]):
        super().__init__(daemon=True)
        self.web_choices, self.token, self.channels = web_choices, token, channels
        self.seen = collections.Counter()
        self.arrivals: dict[str, list[str]] = collections.defaultdict(list)  # per channel, first sightings
        self.offsets: dict[str, str] = {}
        self.unrecovered = 0
        self.reconnects = 0
        self.running = True
        self.ready = threading.Event()

    def run(self) -> None:
        attempt = 0
        while self.running:
            web = self.web_choices()[attempt % len(self.web_choices())]
            attempt += 1
            try:
                self._session(web)
            except (OSError, websocket.WebSocketException, ValueError):
                pass
            if self.running:
                self.reconnects += 1
                time.sleep(0.2)

    def _session(self, web) -> None:
        # Connect the TCP socket ourselves: websocket-client leaks the one it
        # makes when the connection is refused (a web process restarting).
        raw = socket.create_connection(("127.0.0.1", web.port), timeout=5)
        try:
            sock = websocket.create_connection(f"ws://127.0.0.1:{web.port}/ws?token={self.token}", timeout=5,
                                               socket=raw)
        except BaseException:
            raw.close()
            raise
        try:
            json.loads(sock.recv())
            for channel in self.channels:
                frame = {"op": "subscribe", "channel": channel}
                if channel in self.offsets:
                    frame["since"] = self.offsets[channel]
                sock.send(json.dumps(frame))
            sock.settimeout(1.0)
            pending = set(self.channels)
            while self.running:
                try:
                    frame = json.loads(sock.recv())
                except websocket.WebSocketTimeoutException:
                    continue
                if frame.get("op") == "message":
                    if not self.seen[frame["id"]]:
                        self.arrivals[frame["channel"]].append(frame["id"])
                    self.seen[frame["id"]] += 1
                    self.offsets[frame["channel"]] = frame["offset"]
                elif frame.get("op") == "subscribed":
                    pending.discard(frame["channel"])
                    if not pending:
                        self.ready.set()
                    if frame.get("recovered") is False:
                        self.unrecovered += 1
        finally:
            sock.close()  # a no-op when the server already dropped the connection
            raw.close()

    def stop(self) -> None:
        """Stop after the current read."""
        self.running = False
        self.join(5)


def wait_for_delivery(collector: Collector, publisher: Publisher, timeout: float = 90.0) -> None:
    """Wait until every accepted message has been seen (or the timeout passes; the report tells)."""
    try:
        wait_until(lambda: set(publisher.accepted) <= set(collector.seen), timeout, 0.2, "every delivery")
    except AssertionError:
        pass


def history_of(stack, channels: list[str]) -> dict[str, list[str]]:
    """Each channel's history stream, as message ids in stream order."""
    store = stack.store()
    return {channel: [json.loads(fields["f"] + '0-0"}')["id"]
                      for _sid, fields in store.redis.xrange(store.keys.history(channel))]
            for channel in channels}


def inversions(sequences, order: dict[str, int]) -> int:
    """Adjacent pairs, per channel, that stand against publish order (`order`: id -> rank);
    ids not in `order` are left out."""
    count = 0
    for ids in sequences:
        ranks = [order[i] for i in ids if i in order]
        count += sum(1 for a, b in zip(ranks, ranks[1:]) if a > b)
    return count


def forced_passes(*workers) -> int:
    """How often the workers let a record past its channel's order gate after HERALD_ORDER_WAIT."""
    return sum(worker.log().count("passed out of order") for worker in workers)


def settled_in_flight(stack, timeout: float = 30.0) -> int:
    """Messages still in the in-flight index once the pipeline has had `timeout` seconds to finish them."""
    store = stack.store()
    index = store.keys.in_flight_index
    try:
        wait_until(lambda: store.redis.zcard(index) == 0, timeout, 0.2, "an empty in-flight index")
    except AssertionError:
        pass
    return store.redis.zcard(index)


def report(name: str, publisher: Publisher, collector: Collector, history: dict[str, list[str]],
           **extra) -> dict:
    """Print the figures of a fault test and return them."""
    accepted = set(publisher.accepted)
    order = {msg_id: rank for rank, msg_id in enumerate(publisher.accepted)}
    in_history = collections.Counter(i for ids in history.values() for i in ids)
    figures = {
        "test": name,
        "published": publisher.published,
        "accepted": len(accepted),
        "refused": dict(publisher.refused),
        "delivered": len(accepted & set(collector.seen)),
        "lost": len(accepted - set(collector.seen)),
        "duplicated": sum(c - 1 for c in collector.seen.values() if c > 1),
        "reordered": inversions(collector.arrivals.values(), order),
        "in_history": len(accepted & set(in_history)),
        "history_duplicates": sum(c - 1 for c in in_history.values() if c > 1),
        "history_reordered": inversions(history.values(), order),
        "unexpected": len(set(collector.seen) - accepted),
        "subscriber_reconnects": collector.reconnects,
        **extra,
    }
    print("\nFAULT-FIGURES " + json.dumps(figures))
    return figures


def assert_exactly_once(figures: dict) -> None:
    """Lost 0, duplicated 0, reordered 0, at the subscriber and in history."""
    assert figures["accepted"] > 0
    assert figures["lost"] == 0, figures
    assert figures["duplicated"] == 0, figures
    assert figures["reordered"] == 0, figures
    assert figures["in_history"] == figures["accepted"], figures
    assert figures["history_duplicates"] == 0, figures
    assert figures["history_reordered"] == 0, figures
    assert figures["unexpected"] == 0, figures
    assert figures.get("in_flight", 0) == 0, figures  # a leftover entry would be re-sent for ever
