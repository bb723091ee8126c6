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
    from wsproto.events import CloseConnection, TextMessage
    from web.hub.transport import WebSocket, wire_frame

    def pair(limit):
        # TCP over loopback, as in production: the kernel takes part of a frame when it fills.
        listener = socket.create_server(("127.0.0.1", 0))
        peer = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        listener.close()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        ws = WebSocket(types.SimpleNamespace(sock=server, ws=Connection(ConnectionType.SERVER), connected=True),
                       queue_limit=limit, max_message_bytes=1000)
        server.close()  # as gunicorn closes its own descriptor once the handler returns
        closed = []
        ws.start(lambda message: None, lambda: closed.append(True))
        return ws, peer, closed

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


def run(script: str) -> None:
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_frames_a_socket_cannot_take_wait_and_go_out_whole_and_in_order():
    run(QUEUED_IN_ORDER)


def test_an_overflowing_queue_closes_4008_after_finishing_the_frame_in_part():
    run(OVERFLOW)
