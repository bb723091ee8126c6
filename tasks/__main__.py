"""`python -m tasks [celery worker options]`: the `worker` process, kept up.

Runs `celery -A tasks:celery_app worker` and starts it again when it dies
on its own: kombu 5.7's Redis transport can raise AttributeError in
`restore_unacked` when the broker connection drops, which ends the worker
("Unrecoverable error"). A platform restarts a crashed dyno too, but
`make dev` (honcho) would stop everything instead. SIGTERM is passed
on (SIGINT reaches the worker from the terminal itself), and then the
worker's own exit code is ours. Redis is checked once, before the first
start: Celery would retry a broker it cannot reach for ever.

Metrics: the worker's pool processes write them to a PROMETHEUS_MULTIPROC_DIR
made here (a fresh one, unless it is set), and this process serves them all,
merged, on HERALD_METRICS_PORT: it outlives a crashed worker, and so do the
counts.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

RESTART_DELAY = 1.0  # seconds before a crashed worker is started again


def main(argv: list[str]) -> int:
    """Run the worker until it is told to stop; returns its exit code."""
    from pipeline.core.settings import multiprocess_metrics_dir

    own_metrics_dir = multiprocess_metrics_dir()
    try:
        return _run(argv)
    finally:
        if own_metrics_dir:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)


def _run(argv: list[str]) -> int:
    from pipeline.core.errors import StartupError
    from pipeline.core.metrics import serve
    from pipeline.core.settings import load_or_exit
    from pipeline.store import check_at_start

    settings = load_or_exit()
    try:
        warning = check_at_start(settings)
    except StartupError as exc:  # one line, no traceback
        print(f"herald worker: cannot start: {exc}", file=sys.stderr)
        return 1
    if warning:
        print(f"herald worker: warning: {warning}", file=sys.stderr)
    try:
        serve(settings)
    except StartupError as exc:
        print(f"herald worker: cannot start: {exc}", file=sys.stderr)
        return 1
    command = [sys.executable, "-m", "celery", "-A", "tasks:celery_app", "worker", *argv]
    stopping = False
    child: subprocess.Popen | None = None

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        # Ctrl-C in a terminal reaches the worker too (same process group):
        # passing SIGINT on would be a second Ctrl-C, Celery's cold shutdown.
        if signum != signal.SIGINT and child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    while not stopping:  # a stop asked for while waiting to restart ends it here
        child = subprocess.Popen(command)
        code = child.wait()
        if stopping or code == 0:
            break
        print(f'{{"level": "error", "proc": "worker", "event": "worker exited with {code}; restarting"}}',
              file=sys.stderr, flush=True)
        time.sleep(RESTART_DELAY)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
