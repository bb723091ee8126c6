"""The hub's transport under gevent's real loop, on a socket pair (a subprocess, so that
monkey-patching stays out of the test process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.harness import ROOT

PRELUDE = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    import socket, types
    import gevent
    from wsproto import ConnectionType
    from wsproto.connection import Connection
    import time
    from wsproto.events import CloseConnection, Ping, Pong, TextMessage
    from web.hub.transport import WebSocket, wire_frame

    def pair(limit, queue_bytes=1 << 30, start=True):
        # TCP over loopback, as in production: the kernel takes part of a frame when it fills.
        listener = socket.create_server(("127.0.0.1", 0))
        peer = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        listener.close()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        ws = WebSocket(types.SimpleNamespace(sock=server, ws=Connection(ConnectionType.SERVER), connected=True),
                       queue_limit=limit, max_message_bytes=1000, queue_bytes=queue_bytes)
        server.close()  # as gunicorn closes its own descriptor once the handler returns
        closed = []
        if start:
            ws.start(lambda message: None, lambda: closed.append(True))
        return ws, peer, closed

    def accounted(ws):
        # The bytes counted as queued are the bytes the queue holds, less those of its head already sent.
        held = sum(len(data) for data in ws._queue) - ws._offset
        assert ws.queued == held, (ws.queued, held)

    def read_all(peer):
        # Parse everything the server wrote, as a client would: a frame cut
        # or spliced into another would fail here.
        parser, texts, part, close = Connection(ConnectionType.CLIENT), [], "", None
        peer.settimeout(10)
        while close is None:
            data = peer.recv(65536)
            if not data:
                break
            parser.receive_data(data)
            for event in parser.events():
                if isinstance(event, TextMessage):
                    part += event.data
                    if event.message_finished:
                        texts.append(part)
                        part = ""
                elif isinstance(event, CloseConnection):
                    close = event.code
        return texts, close

    frames = [("%05d" % i) + "y" * 10_000 for i in range(200)]
""")

QUEUED_IN_ORDER = PRELUDE + textwrap.dedent("""
    ws, peer, closed = pair(limit=500)
    for text in frames:
        ws.push(wire_frame(text))  # far more than the socket buffers hold: most wait in the queue
    assert ws._queue, "the socket took everything: the test proves nothing"
    reader = gevent.spawn(read_all, peer)
    assert ws.wait_drained(10)
    ws.close(1000, "done")
    texts, close = reader.get(timeout=10)
    assert texts == frames, [t[:5] for t in texts[:3]]
    assert close == 1000
    peer.close()
    gevent.sleep(0.1)
    assert closed == [True]
    print("ok")
""")

OVERFLOW = PRELUDE + textwrap.dedent("""
    ws, peer, closed = pair(limit=20)
    for text in frames:
        ws.push(wire_frame(text))
    assert ws.closing, "the queue never overflowed"
    texts, close = read_all(peer)
    # A prefix of the frames, each whole and in order, then the close: the
    # frame written in part when the queue overflowed was finished first.
    assert 0 < len(texts) < len(frames) and texts == frames[:len(texts)], len(texts)
    assert close == 4008
    print("ok")
""")


BYTE_BOUND = PRELUDE + textwrap.dedent("""
    # A frame bound far away: only the byte bound (200 KB) can close it.
    ws, peer, closed = pair(limit=100_000, queue_bytes=200_000)
    pushed = 0
    for text in frames:
        ws.push(wire_frame(text))
        if ws.closing:
            break
        pushed += 1
        accounted(ws)
        assert ws.queued <= 200_000, ws.queued
    assert ws.closing, "the byte bound never closed it"
    assert pushed < len(frames)
    texts, close = read_all(peer)
    assert 0 < len(texts) <= pushed and texts == frames[:len(texts)], len(texts)
    assert close == 4008
    print("ok")
""")

# A slow reader: a client that takes ~64 KiB whenever it reads, while
# 500 frames of 6 KB arrive between two reads, answering pings meanwhile.
SLOW_READER = PRELUDE + textwrap.dedent("""
    ws, peer, closed = pair(limit=512, queue_bytes=4 * 1024 * 1024)
    frame = wire_frame("z" * 6000)
    peer.setblocking(False)
    most, rounds, elements = 0, 0, []
    pong = Connection(ConnectionType.CLIENT).send(Pong())
    while not ws.closing and rounds < 200:
        for _ in range(500):
            ws.push(frame)
        most = max(most, ws.queued)
        accounted(ws)
        peer.sendall(pong)  # unsolicited: must not keep it alive
        try:
            peer.recv(65536)
        except BlockingIOError:
            pass
        gevent.sleep(0.01)  # the loop writes what the socket takes
        accounted(ws)
        if not ws.closing:
            elements.append(len(ws._queue))
        rounds += 1
    assert ws.closing, f"a slow reader was never closed; {ws.queued} bytes queued"
    assert most <= 4 * 1024 * 1024, most
    # The queue kept its elements: nothing folded into one (and copied again) per write.
    assert elements and min(elements) > 100, elements
    print("ok")
""")

# A socket that took 64 KiB of a run of 500 small
# frames (a router batch) holds the rest of one push, not 500 frames waiting;
# a second run, or a catch-up page of 4,000 frames, must not close a client
# whose queue holds ~34 KB. What waits is bounded by its bytes and its pushes.
RUNS_OF_SMALL_FRAMES = PRELUDE + textwrap.dedent("""
    class Taking:
        # A socket taking `room` bytes (kept in `wire`), then nothing until given more;
        # the loop watches the real one, which is always writable.
        def __init__(self, real, room):
            self.real, self.room, self.wire = real, room, bytearray()
        def fileno(self):
            return self.real.fileno()
        def send(self, data):
            return self.sendmsg([data])
        def sendmsg(self, pieces):
            data = b"".join(bytes(piece) for piece in pieces)
            if not self.room:
                raise BlockingIOError
            taken = min(len(data), self.room)
            self.room -= taken
            self.wire += data[:taken]
            return taken
        def close(self):
            self.real.close()

    from web.hub.router import Router, Subscription

    ws, peer, closed = pair(limit=512, queue_bytes=8 * 1024 * 1024)
    ws._raw = Taking(ws._raw, 64 * 1024)
    sub = Subscription(ws, status=False, presence=False, hold=0, hold_bytes=0)
    sub.backlog = None  # live
    frame = wire_frame("x" * 200)
    assert len(frame) == 204
    offsets = iter(range(1, 10_000))

    def fan_out(count):
        # As the router sends a channel's run: one push to a live subscriber.
        Router.send_messages({"client": sub}, [(next(offsets), 0) for _ in range(count)], [frame] * count)

    fan_out(500)  # two pub/sub batches (router.BATCH)
    fan_out(500)
    assert not ws.closing, f"closed with {ws.queued} bytes queued"
    accounted(ws)
    assert ws.queued == 1000 * len(frame) - 64 * 1024, ws.queued
    fan_out(4000)  # a catch-up page after a pub/sub reconnect
    assert not ws.closing, f"closed with {ws.queued} bytes queued"
    # The client reads: every byte goes out, each frame once and in order.
    ws._raw.room = 1 << 30
    assert ws.wait_drained(10)
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(bytes(ws._raw.wire))
    texts = [event.data for event in client.events()]
    assert texts == ["x" * 200] * 5000, len(texts)
    # The bound still holds: 512 pushes the socket did not take close it.
    ws, peer, closed = pair(limit=512, queue_bytes=8 * 1024 * 1024)
    ws._raw = Taking(ws._raw, 0)
    for _ in range(512):
        ws.push(frame)
    assert not ws.closing and len(ws._queue) == 512
    ws.push(frame)
    assert ws.closing
    print("ok")
""")

PONG_BEFORE_THE_PING_IS_OUT = PRELUDE + textwrap.dedent("""
    ws, peer, closed = pair(limit=10_000)
    for text in frames:
        ws.push(wire_frame(text))  # more than the socket takes: the ping waits behind them
    assert ws.ping()
    peer.sendall(Connection(ConnectionType.CLIENT).send(Pong()))  # a Pong to a ping it cannot have seen
    gevent.sleep(0.2)
    assert ws.awaiting_pong
    assert not ws.ping(), "an unsolicited Pong kept a client that reads nothing alive"
    texts, close = read_all(peer)
    assert close == 1008
    # And once the ping is out, its Pong counts.
    ws, peer, closed = pair(limit=10)
    assert ws.ping()
    peer.settimeout(5)
    assert peer.recv(2) == b"\\x89\\x00"
    peer.sendall(Connection(ConnectionType.CLIENT).send(Pong()))
    gevent.sleep(0.2)
    assert not ws.awaiting_pong and ws.ping()
    print("ok")
""")

NOTHING_ANSWERED_BEFORE_START = PRELUDE + textwrap.dedent("""
    ws, peer, closed = pair(limit=10, start=False)
    client = Connection(ConnectionType.CLIENT)
    def pinger():
        while True:
            peer.sendall(client.send(Ping(b"x")))
            gevent.sleep(0.1)
    sender = gevent.spawn(pinger)
    started = time.monotonic()
    assert ws.read_message(started + 1.0) is None
    waited = time.monotonic() - started
    sender.kill()
    # Pings every 0.1 s did not extend the deadline (1 s), and none was answered.
    assert 0.9 <= waited < 3, waited
    peer.settimeout(0.3)
    try:
        answer = peer.recv(100)
    except socket.timeout:
        answer = b""
    assert answer == b"", answer
    print("ok")
""")


def run(script: str) -> None:
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_frames_a_socket_cannot_take_wait_and_go_out_whole_and_in_order():
    run(QUEUED_IN_ORDER)


def test_an_overflowing_queue_closes_4008_after_finishing_the_frame_in_part():
    run(OVERFLOW)


def test_the_queue_is_bounded_in_bytes_and_closes_4008_past_them():
    run(BYTE_BOUND)


def test_runs_of_small_frames_mostly_sent_do_not_close_a_client_that_keeps_up():
    run(RUNS_OF_SMALL_FRAMES)


def test_a_slow_reader_sending_pongs_is_closed_and_its_queue_never_folds():
    run(SLOW_READER)


def test_before_start_pings_get_no_pong_and_do_not_extend_the_read_deadline():
    run(NOTHING_ANSWERED_BEFORE_START)


def test_a_pong_counts_only_once_the_ping_is_out():
    run(PONG_BEFORE_THE_PING_IS_OUT)
