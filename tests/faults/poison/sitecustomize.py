"""Fault injection for the poison-message test, loaded through PYTHONPATH by the worker only.

A message whose data is {"poison": true} kills the worker process running
it, as a segfaulting C extension or the kernel's OOM killer would.
"""

import os


def _install() -> None:
    from pipeline import processing

    run = processing.Processor.run

    def run_or_die(self, envelopes, **options):
        if any(envelope.get("data") == {"poison": True} for envelope in envelopes):
            os._exit(137)
        return run(self, envelopes, **options)

    processing.Processor.run = run_or_die


_install()
