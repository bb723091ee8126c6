"""gunicorn settings for the `web` process: gevent workers, one hub per worker.

gevent because one process must hold thousands of WebSockets; each gunicorn
worker is its own hub node, and the Kafka producer is made after the fork.
"""

import os
import shutil
import sys

import gevent

from pipeline.core.settings import load_or_exit, multiprocess_metrics_dir

# Every worker writes its metrics there and /metrics merges them; set before
# anything imports prometheus_client (the workers inherit it).
_own_metrics_dir = multiprocess_metrics_dir()
# The arbiter's own; each worker reads its own when it loads app.py (its node_id
# names the worker).
_settings = load_or_exit()

# In development (HERALD_DEV, which `flask dev` sets) only this machine may
# connect: GET /dev/token hands out tokens allowed everything.
# A --bind on the command line (or GUNICORN_CMD_ARGS) wins over this.
bind = f"{'127.0.0.1' if _settings.dev else '0.0.0.0'}:{_settings.port}"
worker_class = "gevent"
# gunicorn reads WEB_CONCURRENCY too, with int(), before this file: a value
# that is no number stops it there, with gunicorn's traceback.
workers = _settings.web_concurrency
worker_connections = _settings.worker_connections
# Heroku sends SIGKILL 30 s after SIGTERM: finish well before it.
graceful_timeout = 20
timeout = 30
keepalive = 5
accesslog = None
errorlog = "-"
loglevel = "warning"


def on_starting(server):
    """Refuse to start, in one line, when Redis or Kafka does not answer, Redis may evict,
    or the topics are missing."""
    from pipeline.core.errors import HeraldError, StartupError
    from pipeline.kafka import open_admin
    from pipeline.kafka.topics import require_topics
    from pipeline.store import check_at_start

    if os.environ.get("HERALD_NODE_ID") and _settings.web_concurrency > 1:
        # Each worker is a hub node of its own: named alike, each would take its siblings'
        # subscriptions for a dead predecessor's and take them off the counts.
        print("herald web: cannot start: HERALD_NODE_ID names one process, and WEB_CONCURRENCY="
              f"{_settings.web_concurrency} starts several: leave HERALD_NODE_ID unset", file=sys.stderr)
        sys.exit(1)
    try:
        warning = check_at_start(_settings)
    except StartupError as exc:  # one line, no traceback (docs/operations.md)
        print(f"herald web: cannot start: {exc}", file=sys.stderr)
        sys.exit(1)
    if warning:
        print(f"herald web: warning: {warning}", file=sys.stderr)
    try:
        # A real client, to catch refused certificates and passwords too; it
        # is gone before gunicorn forks (librdkafka threads do not survive a fork).
        admin, metadata = open_admin(_settings)
        del admin
        require_topics(_settings, metadata)
    except HeraldError as exc:
        print(f"herald web: cannot start: {exc}", file=sys.stderr)
        sys.exit(1)


def post_worker_init(worker):
    """Connect this worker's services and watch for shutdown."""
    from pipeline.core.logs import configure_logging

    configure_logging("web", _settings.log_level)
    services = worker.wsgi.extensions["herald"]
    services.start()

    def watch():
        # gunicorn only flips `alive` on SIGTERM; WebSocket handlers would keep
        # the worker up until graceful_timeout, so close them ourselves.
        while worker.alive:
            gevent.sleep(0.2)
        services.stop()

    gevent.spawn(watch)


def worker_exit(server, worker):
    """Finish the shutdown before the worker exits: WebSockets are served by the event
    loop, not by request greenlets, so gunicorn does not wait for them itself."""
    services = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("herald")
    if services is not None:  # None when the app failed to load
        services.stop()


def child_exit(server, worker):
    """A worker's live gauges (its WebSocket connections) leave the merged /metrics with it."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics directory made at start (one given in the environment is kept)."""
    if _own_metrics_dir:
        shutil.rmtree(_own_metrics_dir, ignore_errors=True)
