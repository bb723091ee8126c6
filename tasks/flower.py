"""`python -m tasks.flower [flower options]`: the Procfile's `flower` process, never open by mistake.

Flower shows every task's arguments (the messages) and can revoke tasks and
stop workers: outside development it starts only behind a password,
FLOWER_BASIC_AUTH (`user:password`, several separated by commas, read by
Flower itself), and refuses otherwise with one line on stderr. In
development (HERALD_DEV, which `flask dev` sets) it may run without one,
listening on localhost only.
"""

from __future__ import annotations

import os
import sys


def check(environ, dev: bool) -> tuple[str | None, list[str]]:
    """(why Flower may not start, or None; the options to add to its command line)."""
    auth = environ.get("FLOWER_BASIC_AUTH", "")
    if environ.get("FLOWER_UNAUTHENTICATED_API", "").lower() in ("1", "true", "yes", "on") and not dev:
        return "FLOWER_UNAUTHENTICATED_API opens Flower's API to anyone: unset it", []
    if auth:
        for pair in auth.split(","):
            user, sep, password = pair.partition(":")
            if not (user and sep and password):
                return "FLOWER_BASIC_AUTH is not user:password (several separated by commas)", []
        return None, []
    if dev:
        return None, ["--address=127.0.0.1"]
    return ("FLOWER_BASIC_AUTH is not set: set it to user:password (Flower would be open to anyone), "
            "or run it through `flask dev` in development"), []


def main(argv: list[str]) -> int:
    """Check the environment, then become `celery -A tasks:celery_app flower` (returns only to refuse: 1)."""
    from pipeline.core.settings import load_or_exit

    problem, extra = check(os.environ, load_or_exit().dev)
    if problem:
        print(f"herald flower: cannot start: {problem}", file=sys.stderr)
        return 1
    os.execv(sys.executable, [sys.executable, "-m", "celery", "-A", "tasks:celery_app", "flower", *extra, *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
