"""Fault injection for the poison-message test, loaded through PYTHONPATH by the worker only.

A message whose data is {"poison": true} kills the worker process running
it, as a segfaulting C extension or the kernel's OOM killer would.
"""

import os


def _install() -> None:
    from pipeline import processing

    check_type = processing.check_type

    def check_or_die(envelope, allowed):
        # Called for each message a worker is about to process (not for one it
        # only lets pass its channel's order gate, dead-lettered already).
        if envelope.data == {"poison": True}:
            os._exit(137)
        return check_type(envelope, allowed)

    processing.check_type = check_or_die


_install()
