"""Webhook delivery against a real Redis and real receivers, without the rest of the stack:
the cursor, the lease, the trim, dead letters and the backlog (pipeline/webhooks/delivery.py)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from devtools import embedded
from pipeline.core.events import event
from pipeline.webhooks import Outbox
from pipeline.webhooks.deadletters import ReplayFailed, WebhookDeadLetters
from pipeline.webhooks.delivery import FAILED, IDLE, LOST, Delivery
from pipeline.webhooks.sender import ANSWER_BYTES, DEADLINE_SLACK, Sender
from pipeline.webhooks.signing import verify
from tests.receivers import Answer, Receiver

HOOK_SECRET = "webhook-secret-for-the-delivery-tests-0123"


@pytest.fixture
def receivers():
    made = [Receiver().start(), Receiver().start()]
    yield made
    for receiver in made:
        receiver.stop()


# The HTTP pools a test opened, closed after it (its stores close with `spare_store`).
_opened: list[Sender] = []


@pytest.fixture(autouse=True)
def _close_senders():
    yield
    while _opened:
        _opened.pop().pool.clear()


def _sender(settings) -> Sender:
    sender = Sender(settings)
    _opened.append(sender)
    return sender


def _system(spare_store, receivers: list[Receiver], **env):
    store = spare_store(KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9", HERALD_WEBHOOK_SECRET=HOOK_SECRET,
                        HERALD_WEBHOOK_URL="; ".join(r.url for r in receivers), **env)
    return store.settings, store, Outbox(store, store.settings)


def _delivery(settings, store, index: int, token: str = "t1") -> Delivery:
    receiver = settings.webhooks[index]
    assert store.webhooks.take_lease(receiver.name, token, 30)
    return Delivery(settings, store, _sender(settings), receiver, token)


def _emit(outbox, count: int, channel: str = "c") -> list[str]:
    events = [event("message.delivered", channel, n=n) for n in range(count)]
    outbox.emit(events)
    return [e["id"] for e in events]


def test_events_go_signed_in_order_and_the_stream_is_trimmed_once_every_receiver_passed(spare_store, receivers):
    settings, store, outbox = _system(spare_store, receivers, HERALD_WEBHOOK_BATCH="100")
    ids = _emit(outbox, 250)
    assert _delivery(settings, store, 0).run() is IDLE
    first = receivers[0]
    assert [e["id"] for e in first.events()] == ids
    assert [len(p.events) for p in first.posts] == [100, 100, 50]
    for post in first.posts:
        assert verify(HOOK_SECRET, post.headers["Herald-Signature"], post.raw)
        assert post.headers["Content-Type"] == "application/json" and post.headers["Herald-Delivery"]
    # The other receiver has not read them: nothing is trimmed yet.
    assert store.redis.xlen(store.keys.events) == 250
    assert _delivery(settings, store, 1).run() is IDLE
    assert [e["id"] for e in receivers[1].events()] == ids
    assert store.redis.xlen(store.keys.events) <= 1  # the last entry (the least cursor) stays


def test_a_task_whose_lease_went_to_another_moves_no_cursor(spare_store, receivers):
    settings, store, outbox = _system(spare_store, receivers[:1])
    _emit(outbox, 5)
    name = settings.webhooks[0].name
    stale = Delivery(settings, store, _sender(settings), settings.webhooks[0], "stale")
    assert store.webhooks.take_lease(name, "holder", 30)
    assert stale.run() is LOST
    assert receivers[0].posts == [] and store.webhooks.cursor(name) == "0-0"


def test_a_failing_batch_is_retried_first_then_dead_lettered_and_replayed(spare_store, receivers):
    settings, store, outbox = _system(spare_store, receivers[:1], HERALD_WEBHOOK_RETRY_FOR="1",
                                      HERALD_WEBHOOK_BATCH="10")
    receiver = receivers[0]
    receiver.answer = Answer(500)
    ids = _emit(outbox, 15)
    delivery = _delivery(settings, store, 0)
    assert delivery.run() is FAILED and delivery.failing_since
    since = delivery.failing_since
    assert delivery.run(since) is FAILED  # the same batch again, nothing after it
    assert {tuple(e["id"] for e in p.events) for p in receiver.posts} == {tuple(ids[:10])}
    time.sleep(1.1)
    # Still refused past HERALD_WEBHOOK_RETRY_FOR: both batches go to the dead letters, in turn.
    assert delivery.run(since) is FAILED
    assert delivery.run(delivery.failing_since, slice_seconds=0.5) in (FAILED, IDLE)
    time.sleep(1.1)
    assert delivery.run(delivery.failing_since) is IDLE
    letters = WebhookDeadLetters(store, settings)
    _opened.append(letters.sender)
    name = settings.webhooks[0].name
    page = letters.page(name, limit=10)
    assert page["total"] == 15 and len(page["items"]) == 10 and page["next"]
    rest = letters.page(name, limit=10, after=page["next"])
    listed = [i["event"]["id"] for i in rest["items"] + page["items"]]
    assert sorted(listed) == sorted(ids) and rest["next"] is None
    assert "HERALD_WEBHOOK_RETRY_FOR" in page["items"][0]["reason"]
    # A replay the receiver refuses keeps them; one it accepts sends them, same ids, and removes them.
    with pytest.raises(ReplayFailed):
        letters.replay(name, [ids[3]])
    assert letters.count(name) == 15
    receiver.answer = Answer(200)
    assert letters.replay(name, [ids[3], "no-such-event"]) == {"replayed": 1, "remaining": 14}
    assert receiver.events()[-1]["id"] == ids[3]
    assert letters.replay(name) == {"replayed": 14, "remaining": 0}
    assert sorted(e["id"] for e in receiver.events()) == sorted(ids)


def test_a_receiver_past_the_backlog_has_its_oldest_events_dead_lettered(spare_store, receivers):
    settings, store, outbox = _system(spare_store, receivers[:1], HERALD_WEBHOOK_BACKLOG="1000",
                                      HERALD_WEBHOOK_BATCH="500")
    ids = _emit(outbox, 1600)
    assert _delivery(settings, store, 0).run() is IDLE
    name = settings.webhooks[0].name
    dead = WebhookDeadLetters(store, settings).count(name)
    got = [e["id"] for e in receivers[0].events()]
    assert dead == 1000 and got == ids[dead:]  # dead-lettered a batch a round until within the backlog


def test_a_huge_or_slow_answer_costs_only_its_own_post(spare_store, receivers):
    settings, store, outbox = _system(spare_store, receivers[:1], HERALD_WEBHOOK_TIMEOUT="1")
    receiver = receivers[0]
    receiver.answer = Answer(200, b"x" * (50 * ANSWER_BYTES))
    _emit(outbox, 3)
    started = time.monotonic()
    assert _delivery(settings, store, 0).run() is IDLE
    assert time.monotonic() - started < 2 and len(receiver.events()) == 3
    receiver.answer = Answer(200, delay=3)
    _emit(outbox, 1)
    started = time.monotonic()
    store.webhooks.release_lease(settings.webhooks[0].name, "t1")
    delivery = _delivery(settings, store, 0, token="t2")
    assert delivery.run() is FAILED
    assert time.monotonic() - started < 2.5  # the timeout, not the receiver, ends the wait


def test_an_answer_that_is_a_redirect_or_refused_connection_is_a_failure(spare_store, receivers):
    settings, store, outbox = _system(spare_store, receivers[:1])
    sender = _sender(settings)
    receivers[0].answer = Answer(302)
    assert sender.post(receivers[0].url, b"{}")[0] is False
    receivers[0].stop()
    accepted, what = sender.post(receivers[0].url, b"{}")
    assert accepted is False and what
    assert json.loads(b'{"events":[]}') == {"events": []}


class Dripper:
    """A raw-socket receiver that drips its status line and headers a byte each `every` seconds
    on its first `drips` connections (past any socket timeout's reach), then answers 200."""

    def __init__(self, drips: int = 1, every: float = 0.2):
        self.drips, self.every, self.port = drips, every, embedded.free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def start(self) -> Dripper:
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def stop(self) -> None:
        self.listener.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._answer, args=(conn, self.connections <= self.drips), daemon=True).start()

    def _answer(self, conn: socket.socket, drip: bool) -> None:
        # One request after another on the connection (keep-alive), until the sender hangs up.
        with conn:
            try:
                data = b""
                while True:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        data += chunk
                    head, _, data = data.partition(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    while len(data) < length:
                        data += conn.recv(65536)
                    data = data[length:]
                    if drip:  # ~20 s of status line and headers, unless the sender hangs up
                        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100:
                            conn.sendall(bytes([byte]))
                            time.sleep(self.every)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass


def test_a_receiver_dripping_its_headers_is_cut_at_the_timeout_and_holds_the_lease_no_longer(
        spare_store, receivers):
    dripper = Dripper().start()
    try:
        settings, store, outbox = _system(spare_store, [dripper, receivers[0]], HERALD_WEBHOOK_TIMEOUT="1")
        ids = _emit(outbox, 3)
        sender = _sender(settings)
        name = settings.webhooks[0].name
        assert store.webhooks.take_lease(name, "t1", 30)
        taken_by_another = []

        def second_task():  # the bridge's view: tries to take the lease while the POST hangs
            while not done.is_set():
                if store.webhooks.take_lease(name, "t2", 30):
                    taken_by_another.append(time.monotonic())
                time.sleep(0.05)

        done = threading.Event()
        watcher = threading.Thread(target=second_task)
        watcher.start()
        started = time.monotonic()
        try:
            outcome = Delivery(settings, store, sender, settings.webhooks[0], "t1").run()
        finally:
            took = time.monotonic() - started
            done.set()
            watcher.join()
        print(f"DRIP-FIGURES timeout=1.0s post_took={took:.2f}s bound={1 + DEADLINE_SLACK:.1f}s")
        assert outcome is FAILED and took < 1 + DEADLINE_SLACK
        assert taken_by_another == [] and store.webhooks.renew_lease(name, "t1", 30)
        assert store.webhooks.cursor(name) == "0-0"  # the batch is sent again, not lost
        # The same Sender: the good receiver's POST and the dripper's, now answering at once, go
        # through; the cut connection never went back to the pool, a good one stays in it (keep-alive).
        good = settings.webhooks[1]
        assert store.webhooks.take_lease(good.name, "t1", 30)
        assert Delivery(settings, store, sender, good, "t1").run() is IDLE
        assert [e["id"] for e in receivers[0].events()] == ids
        assert Delivery(settings, store, sender, settings.webhooks[0], "t1").run() is IDLE
        assert store.webhooks.cursor(name) != "0-0" and dripper.connections == 2
        assert sender.post(dripper.url, b'{"events":[]}') == (True, "HTTP 200")
        assert dripper.connections == 2  # the same connection again
    finally:
        dripper.stop()
