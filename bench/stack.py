"""Start a whole Herald stack for a benchmark; print its address as one JSON line; stop at EOF on stdin.

    python bench/stack.py HERALD_WS_MAX_PER_USER=100000 ...

Used by benchmarks that cannot host the stack themselves (a gevent-patched client).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import Stack


def main() -> None:
    """Start Tansu, Redis, a worker, the bridge and one web process; wait for EOF."""
    env = dict(arg.split("=", 1) for arg in sys.argv[1:])
    stack = Stack(Path(tempfile.mkdtemp(prefix="herald-bench-")), **env)
    try:
        stack.worker()
        stack.bridge()
        web = stack.web(WEB_CONCURRENCY=1)
        print(json.dumps({"url": web.base, "token": stack.token(), "pid": web.proc.proc.pid}), flush=True)
        sys.stdin.read()
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
