"""Fault injection for the hand-back test, loaded through PYTHONPATH by one worker only.

A message whose data is {"stall": true} hangs the worker process running it,
as a worker on a host that froze or lost its network would: it holds the
task, unacknowledged, and answers nothing.
"""

import time


def _install() -> None:
    from tasks import processor as processing

    check_type = processing.check_type

    def check_or_stall(envelope, allowed):
        if envelope.data == {"stall": True}:
            time.sleep(3600)
        return check_type(envelope, allowed)

    processing.check_type = check_or_stall


_install()
