"""The hub's connection writer under gevent's real scheduling (a subprocess, so that
monkey-patching stays out of the test process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.harness import ROOT

# Two greenlets woken by I/O in the same loop iteration: the listener pushes to a
# connection whose socket is closed, which starts its writer (Thread.start()
# switches greenlets before the new one runs), and the connection's reader, back
# from its last Redis call in Hub._drop, waits for that writer at once.
RACE = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    import socket, threading, time, types
    import gevent
    from pipeline.settings import Settings
    from web.hub import Connection, Hub

    def round_trip(first_ready):
        listener_in, listener_out = socket.socketpair()
        redis_in, redis_out = socket.socketpair()
        store = types.SimpleNamespace(release_connection=lambda *args: redis_in.recv(1))
        hub = Hub(types.SimpleNamespace(settings=Settings(auth=False), store=store))
        ws = types.SimpleNamespace(connected=False, close_reason=1011, close_message="", event=threading.Event())
        conn = Connection(hub, ws, types.SimpleNamespace(user="u"), "127.0.0.1", "c1")

        def listener():
            listener_in.recv(1)
            conn.push(b"frame")  # the socket is closed: the frame must wait for a writer

        def reader():
            started = time.monotonic()
            hub._drop(conn)
            return time.monotonic() - started

        greenlets = [gevent.spawn(listener), gevent.spawn(reader)]
        gevent.sleep(0.01)
        for sock in (redis_out, listener_out) if first_ready == "redis" else (listener_out, redis_out):
            sock.send(b"x")
        gevent.joinall(greenlets, raise_error=True)
        assert greenlets[1].value < 1.0, f"the drop waited {greenlets[1].value:.1f}s"

    for order in ("redis", "listener"):
        round_trip(order)
    print("ok")
""")


def test_drop_waits_for_a_writer_that_another_greenlet_is_still_starting():
    result = subprocess.run([sys.executable, "-c", RACE], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
