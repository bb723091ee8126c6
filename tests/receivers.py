"""Real webhook receivers for tests and benchmarks: HTTP servers on free ports, in threads.

A Receiver records every POST it is sent (its headers and parsed body) and
answers as its `answer` says: a status, a body, a delay before answering (a
hanging receiver), each may change while it runs (a receiver that fails for
a while, then accepts).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from devtools import embedded


@dataclass
class Post:
    """One POST as the receiver got it."""

    at: float
    headers: dict[str, str]
    raw: bytes
    status: int  # what the receiver answered

    @property
    def events(self) -> list[dict]:
        """The POST's events."""
        return json.loads(self.raw)["events"]


@dataclass
class Answer:
    """How a receiver answers: `status`, `body` bytes, after `delay` seconds."""

    status: int = 200
    body: bytes = b"ok"
    delay: float = 0.0


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1, started with `start()`."""

    answer: Answer = field(default_factory=Answer)
    posts: list[Post] = field(default_factory=list)
    port: int = field(default_factory=embedded.free_port)

    @property
    def url(self) -> str:
        """Where it listens."""
        return f"http://127.0.0.1:{self.port}/hooks"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The answer's head and body are two writes: with Nagle's algorithm the body
            # waits for the sender's delayed ACK (40 ms a POST).
            disable_nagle_algorithm = True

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                answer = receiver.answer
                if answer.delay:
                    time.sleep(answer.delay)
                receiver.posts.append(Post(time.time(), dict(self.headers), raw, answer.status))
                self.send_response(answer.status)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                try:
                    self.wfile.write(answer.body)
                except OSError:  # the sender dropped the connection (a bounded read): as it may
                    pass

            def log_message(self, *_args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a sender that dropped the connection (a bounded read) is no error here

        self.server = Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def accepted(self) -> list[Post]:
        """The POSTs it answered with a 2xx."""
        return [p for p in self.posts if 200 <= p.status < 300]

    def events(self) -> list[dict]:
        """Every event of the POSTs it accepted, in the order they came."""
        return [e for p in self.accepted() for e in p.events]
