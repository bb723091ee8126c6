"""Hostile WebSocket clients against a real web process (no client can hurt
anyone else's traffic; docs/protocol.md: "WebSocket limits").

Each test drives real sockets at a gunicorn web process of its own and reads
that process's memory from /proc: a client may cost the process only its own
bounded share (the send queue, the inbox, a connect deadline), and the other
clients' messages are delivered once, in order.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import websocket
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import CloseConnection

from pipeline.core.frames import message_frame_head
from pipeline.core.messages import Envelope, new_id, parse_publish
from tests.faults.load import inversions
from tests.harness import close_code, wait_until

MB = 1024 * 1024
CONNECT_TIMEOUT = 10.0  # web/hub/protocol.py, docs/protocol.md: "WebSocket limits"


@pytest.fixture(scope="module")
def web(stack):
    """A web process of its own (one gunicorn worker), so its memory is these tests' only."""
    web = stack.web("hostile", WEB_CONCURRENCY=1)
    yield web
    web.proc.stop(10)


def worker_rss(web) -> int:
    """Resident memory (bytes) of the web process's gunicorn worker, from /proc."""
    master = web.proc.proc.pid
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert len(children) == 1, children
    for line in Path(f"/proc/{children[0]}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class PeakRss(threading.Thread):
    """Samples the worker's RSS every 0.1 s until stopped; `growth` is the peak over the start."""

    def __init__(self, web):
        super().__init__(daemon=True)
        self.web, self.base = web, worker_rss(web)
        self.peak, self.running = self.base, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, worker_rss(self.web))
            time.sleep(0.1)

    def stop(self) -> int:
        """Stop sampling; the peak growth in bytes."""
        self.running = False
        self.join(2)
        self.peak = max(self.peak, worker_rss(self.web))
        return self.peak - self.base


def connect(web, token: str | None = None, **options):
    url = f"ws://127.0.0.1:{web.port}/ws" + (f"?token={token}" if token else "")
    return websocket.create_connection(url, timeout=10, skip_utf8_validation=True, **options)


def subscribe(ws, channel: str, **options) -> None:
    assert json.loads(ws.recv())["op"] == "connected"
    ws.send(json.dumps({"op": "subscribe", "channel": channel, **options}))
    if "since" not in options:
        while json.loads(ws.recv())["op"] != "subscribed":
            pass


def deliver(stack, channel: str, count: int, size: int, per_second: float = 0.0) -> list[str]:
    """Deliver `count` messages of ~`size` bytes straight through the store (as a worker
    does: history, then pub/sub), in batches of 50, at about `per_second`; their ids in order."""
    store, ids = stack.store(), []
    started = time.monotonic()
    for first in range(0, count, 50):
        batch = [parse_publish({"channel": channel, "data": {"n": n, "pad": "x" * size}}, sender="t")
                 for n in range(first, min(first + 50, count))]
        assert [outcome for outcome, *_ in store.deliver(batch)] == ["delivered"] * len(batch)
        ids += [envelope.id for envelope in batch]
        if per_second:
            time.sleep(max(0.0, started + len(ids) / per_second - time.monotonic()))
    return ids


@pytest.mark.parametrize("bound_by", ["writes", "bytes"])
def test_a_slow_reader_sending_pongs_is_closed_4008_and_the_others_get_every_message(stack, channel, bound_by):
    # ~24 MB of 4 KB messages at ~2.4 MB/s; a reader taking ~200 KiB/s, with a
    # Pong every second, would hold all it does not read. Its send queue holds
    # at most HERALD_SEND_QUEUE_BYTES (8 MiB) in at most HERALD_SEND_QUEUE
    # writes not yet sent whole; past either, 4008. With "writes", 32 of them
    # (runs of about the 50 messages a delivery publishes together: ~6.4 MB)
    # close it first; with "bytes", the write bound is lifted out of the way.
    env = {"HERALD_SEND_QUEUE": 1_000_000} if bound_by == "bytes" else {"HERALD_SEND_QUEUE": 32}
    web = stack.web(f"slow-{bound_by}", WEB_CONCURRENCY=1, **env)
    bound = 16 * MB  # the send queue's 8 MiB at most, plus the process's own churn under this load
    count, size = 6000, 4000
    token = stack.token()
    slow = connect(web, token, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 16384),))
    subscribe(slow, channel)
    fast = connect(web, token)
    subscribe(fast, channel)
    arrivals: list[str] = []
    slow_closed: list[int] = []

    def read_fast():
        fast.settimeout(30)
        while len(arrivals) < count:
            frame = json.loads(fast.recv())
            if frame["op"] == "message":
                arrivals.append(frame["id"])

    def read_slowly():
        # Raw bytes at ~200 KiB/s, parsed here: the server sees a slow, live client.
        parser, last_pong = Connection(ConnectionType.CLIENT), 0.0
        slow.sock.settimeout(0.05)
        while not slow_closed:
            started = time.monotonic()
            try:
                data = slow.sock.recv(10 * 1024)
            except TimeoutError:
                data = None
            if data == b"":
                slow_closed.append(-1)
                return
            if data:
                parser.receive_data(data)
                for event in parser.events():
                    if isinstance(event, CloseConnection):
                        slow_closed.append(event.code)
            if started - last_pong >= 1.0:
                slow.pong(b"")  # unsolicited: it must not keep a slow reader alive
                last_pong = started
            time.sleep(max(0.0, 0.05 - (time.monotonic() - started)))

    rss = PeakRss(web)
    rss.start()
    readers = [threading.Thread(target=read_fast, daemon=True), threading.Thread(target=read_slowly, daemon=True)]
    for reader in readers:
        reader.start()
    try:
        published = deliver(stack, channel, count, size, per_second=600)
        readers[0].join(60)
        wait_until(lambda: slow_closed, 30, what="the slow reader to be closed")
        growth = rss.stop()
        order = {msg_id: rank for rank, msg_id in enumerate(published)}
        figures = {"test": f"slow reader with pongs, bound by {bound_by}", "published": len(published),
                   "delivered": len(set(arrivals)),
                   "lost": len(set(published) - set(arrivals)), "duplicated": len(arrivals) - len(set(arrivals)),
                   "reordered": inversions([arrivals], order), "slow_close": slow_closed[0],
                   "rss_growth_mb": round(growth / MB, 1), "rss_bound_mb": bound // MB}
        print("\nFAULT-FIGURES " + json.dumps(figures))
        assert slow_closed == [4008], figures
        assert figures["lost"] == figures["duplicated"] == figures["reordered"] == 0, figures
        assert arrivals == published, figures
        assert growth < bound, figures
    finally:
        rss.running = False
        slow.close()
        fast.close()
        web.proc.stop(10)


def test_a_fast_client_taking_bursts_of_small_frames_stays_open_and_gets_each_once_in_order(stack, web, channel):
    # Four bursts of 1,500 frames of ~600 bytes, published back to back
    # straight into the channel's pub/sub channel (as a worker's delivery
    # script does after XADD), reach the hub's listener together: it fans
    # them out as runs of up to router.BATCH frames, one write each. A client
    # reading all the while, with a 64 KiB receive buffer, takes most of each
    # run at once; what waits is ~300 KB at most, far inside the queue's 8 MiB
    # (3.6 MB in all), so nothing may close it (4008 counted frames of runs
    # it had mostly taken as waiting).
    bursts, per_burst = 4, 1500
    count = bursts * per_burst
    store = stack.store()
    name = store.keys.message_channel(channel)
    client = connect(web, stack.token(), sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024),))
    subscribe(client, channel)
    arrivals: list[int] = []
    closed: list[int] = []

    def read():
        client.settimeout(30)
        while len(arrivals) < count:
            try:
                opcode, data = client.recv_data()
            except (OSError, websocket.WebSocketException):
                closed.append(-1)
                return
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                closed.append(int.from_bytes(data[:2], "big"))
                return
            frame = json.loads(data)
            if frame["op"] == "message":
                arrivals.append(frame["data"]["n"])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    base = int(time.time() * 1000)  # stream ids after any the channel has
    for burst in range(bursts):
        pipe = store.redis.pipeline(transaction=False)
        for n in range(burst * per_burst, (burst + 1) * per_burst):
            sid = f"{base}-{n}"
            envelope = Envelope(id=new_id(), channel=channel, type="message", data={"n": n, "pad": "x" * 500},
                                sender="t", ts=base)
            pipe.publish(name, f'{sid}\n{message_frame_head(envelope)}{sid}"}}')
        pipe.execute()
    reader.join(60)
    try:
        figures = {"test": "fast client, bursts of small frames", "published": count,
                   "delivered": len(set(arrivals)), "lost": len(set(range(count)) - set(arrivals)),
                   "duplicated": len(arrivals) - len(set(arrivals)),
                   "reordered": inversions([arrivals], {n: n for n in range(count)}),
                   "close": closed[0] if closed else None}
        print("\nFAULT-FIGURES " + json.dumps(figures))
        assert closed == [], figures
        assert figures["lost"] == figures["duplicated"] == figures["reordered"] == 0, figures
        assert arrivals == list(range(count)), figures
    finally:
        client.close()


def test_a_client_flooding_frames_during_its_replay_is_closed_and_costs_a_bounded_inbox(stack, web, channel):
    # 1,000 messages of 8 KB in history; the client asks for all of them, reads
    # nothing (the replay's first page waits for it), and sends 50 frames/s of
    # 60 KiB. Those wait behind the replay, at most INBOX_FRAMES (64) and 1 MiB.
    bound = 8 * MB  # the inbox's 1 MiB and the replay page's 1 MiB, with room for the process's churn
    deliver(stack, channel, 1000, 8000)
    flooder = connect(web, stack.token(), sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
    rss = PeakRss(web)
    rss.start()
    try:
        subscribe(flooder, channel, since="0-0")
        frame = json.dumps({"op": "ping", "ref": "f" * 60 * 1024})
        sent, started = 0, time.monotonic()
        while time.monotonic() - started < 6:  # 300 frames, ~18 MB
            try:
                flooder.send(frame)
            except (OSError, websocket.WebSocketException):
                break  # the server is gone
            sent += 1
            time.sleep(max(0.0, started + sent / 50 - time.monotonic()))
        code = close_code(SimpleNamespace(sock=flooder), timeout=10)  # close_code reads a WsClient's socket
        growth = rss.stop()
        print("\nFIGURES " + json.dumps({"test": "flood during replay", "frames_sent": sent, "close": code,
                                         "rss_growth_mb": round(growth / MB, 1), "rss_bound_mb": bound // MB}))
        assert code == 4029
        assert growth < bound, growth
    finally:
        rss.running = False
        flooder.close()


def test_unauthenticated_sockets_that_ping_are_closed_at_the_connect_deadline_unanswered(stack, web):
    # 20 sockets without a token, each sending a WebSocket ping every second:
    # closed 4001 once CONNECT_TIMEOUT has passed since their upgrade, never a
    # Pong, and HTTP keeps answering meanwhile.
    slack = 5.0
    results: dict[int, tuple] = {}

    def hold(n):
        ws = connect(web)
        opened, pongs = time.monotonic(), 0
        next_ping = opened
        try:
            while time.monotonic() - opened < CONNECT_TIMEOUT + slack + 5:
                try:
                    if time.monotonic() >= next_ping:
                        ws.ping(b"p")
                        next_ping += 1.0
                    ws.settimeout(max(0.01, next_ping - time.monotonic()))
                    frame = ws.recv_frame()
                except websocket.WebSocketTimeoutException:
                    continue
                except (OSError, websocket.WebSocketException):
                    results[n] = (-1, time.monotonic() - opened, pongs)
                    return
                if frame.opcode == websocket.ABNF.OPCODE_PONG:
                    pongs += 1
                elif frame.opcode == websocket.ABNF.OPCODE_CLOSE:
                    results[n] = (int.from_bytes(frame.data[:2], "big"), time.monotonic() - opened, pongs)
                    return
            results[n] = (None, time.monotonic() - opened, pongs)
        finally:
            ws.close()

    holders = [threading.Thread(target=hold, args=(n,), daemon=True) for n in range(20)]
    for holder in holders:
        holder.start()
    answers = []
    while any(holder.is_alive() for holder in holders):
        answers.append(web.request("GET", "/healthz", timeout=5)[0])
        time.sleep(0.5)
    print("\nFIGURES " + json.dumps({"test": "unauthenticated pingers", "sockets": 20,
                                     "closes": sorted({r[0] for r in results.values()}, key=str),
                                     "longest_open_s": round(max(r[1] for r in results.values()), 1),
                                     "pongs": sum(r[2] for r in results.values()), "http": sorted(set(answers))}))
    assert len(results) == 20
    assert all(code == 4001 for code, _, _ in results.values()), results
    assert all(seconds <= CONNECT_TIMEOUT + slack for _, seconds, _ in results.values()), results
    assert sum(pongs for _, _, pongs in results.values()) == 0, results
    assert answers and set(answers) == {200}, answers
