"""Fault injection for the poison-message tests, loaded through PYTHONPATH by the worker only.

A message whose data is {"poison": true} kills the worker process running
it, as a segfaulting C extension or the kernel's OOM killer would; one whose
data is {"raise": "ValueError"} makes processing raise that built-in
exception, as a bug or a rule that cannot handle the data would; one whose
data is {"hang": seconds} holds its worker process that long, as a rule
caught in a catastrophic regex would; with "deaf": true it also blocks the
signal of Celery's soft time limit, as a loop in C code would not see it.
A message whose id holds "offsets-fail" makes recording its history offset
in the archive raise, once it passed its channel's order gate.
"""

import builtins
import os
import signal
import time


def _install() -> None:
    from pipeline import archive
    from tasks import processor as processing

    check_type = processing.check_type

    def check_or_fail(envelope, allowed):
        # Called for each message a worker is about to process (not for one it
        # only lets pass its channel's order gate, dead-lettered already).
        data = envelope.data
        if data == {"poison": True}:
            os._exit(137)
        if isinstance(data, dict) and isinstance(data.get("raise"), str):
            raise getattr(builtins, data["raise"])(f"injected for message {envelope.id}")
        if isinstance(data, dict) and isinstance(data.get("hang"), (int, float)):
            if data.get("deaf"):
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
            time.sleep(data["hang"])
        return check_type(envelope, allowed)

    processing.check_type = check_or_fail
    record_offsets = archive.Archive.record_offsets

    def record_or_fail(self, placed):
        failing = [msg_id for msg_id, _sid in placed if "offsets-fail" in msg_id]
        if failing:
            raise LookupError(f"injected after delivery for {failing}")
        return record_offsets(self, placed)

    archive.Archive.record_offsets = record_or_fail


_install()
