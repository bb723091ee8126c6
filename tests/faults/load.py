"""Load and accounting for the fault-injection suite.

`Publisher` posts messages with unique client ids (so a retried POST is
idempotent) and records which ones got a 202; `Collector` subscribes over a
WebSocket, resumes with `since` after any disconnect, and counts deliveries
per id. `report()` prints and returns the figures every fault test asserts on.
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
    """Posts `count` messages over `channels`, round-robin over web processes, at about `rate`/s."""

    def __init__(self, webs, token: str, channels: list[str], count: int, rate: float = 100.0,
                 give_up_after: float = 60.0):
        super().__init__(daemon=True)
        self.webs, self.token, self.channels = webs, token, channels
        self.count, self.interval, self.give_up_after = count, 1.0 / rate, give_up_after
        self.tag = uuid.uuid4().hex[:8]
        self.accepted: dict[str, dict] = {}
        self.refused = collections.Counter()
        self.published = 0

    def run(self) -> None:
        next_at = time.monotonic()
        for n in range(self.count):
            msg_id = f"{self.tag}-{n:05d}"
            body = {"id": msg_id, "channel": self.channels[n % len(self.channels)], "data": {"n": n}}
            self.published += 1
            deadline = time.monotonic() + self.give_up_after
            attempt = 0
            while time.monotonic() < deadline:
                web = self.webs[(n + attempt) % len(self.webs)]
                attempt += 1
                try:
                    status, _, answer = web.request("POST", "/api/v1/messages", body, token=self.token, timeout=10)
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


def history_counts(stack, channels: list[str]) -> collections.Counter:
    """How often each message id stands in its channel's history stream."""
    store = stack.store()
    counts = collections.Counter()
    for channel in channels:
        for _sid, fields in store.redis.xrange(store.key("hist", channel)):
            counts[json.loads(fields["f"] + '0-0"}')["id"]] += 1
    return counts


def settled_in_flight(stack, timeout: float = 30.0) -> int:
    """Messages still in the in-flight index once the pipeline has had `timeout` seconds to finish them."""
    store = stack.store()
    index = store.key("inflight", "index")
    try:
        wait_until(lambda: store.redis.zcard(index) == 0, timeout, 0.2, "an empty in-flight index")
    except AssertionError:
        pass
    return store.redis.zcard(index)


def report(name: str, publisher: Publisher, collector: Collector, history: collections.Counter,
           **extra) -> dict:
    """Print the figures of a fault test and return them."""
    accepted = set(publisher.accepted)
    figures = {
        "test": name,
        "published": publisher.published,
        "accepted": len(accepted),
        "refused": dict(publisher.refused),
        "delivered": len(accepted & set(collector.seen)),
        "lost": len(accepted - set(collector.seen)),
        "duplicated": sum(c - 1 for c in collector.seen.values() if c > 1),
        "in_history": len(accepted & set(history)),
        "history_duplicates": sum(c - 1 for c in history.values() if c > 1),
        "unexpected": len(set(collector.seen) - accepted),
        "subscriber_reconnects": collector.reconnects,
        **extra,
    }
    print("\nFAULT-FIGURES " + json.dumps(figures))
    return figures


def assert_exactly_once(figures: dict) -> None:
    """Lost 0, duplicated 0, at the subscriber and in history."""
    assert figures["accepted"] > 0
    assert figures["lost"] == 0, figures
    assert figures["duplicated"] == 0, figures
    assert figures["in_history"] == figures["accepted"], figures
    assert figures["history_duplicates"] == 0, figures
    assert figures.get("in_flight", 0) == 0, figures  # a leftover entry would be re-sent for ever
