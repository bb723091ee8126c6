"""web/hub/batch.py: calls made together share one run, and a failure reaches each caller."""

from __future__ import annotations

import gevent

from web.hub.batch import Batcher


def test_callers_arriving_together_share_one_run_and_get_their_own_results():
    runs = []

    def run(calls):
        runs.append(list(calls))
        return [a * 10 for (a,) in calls]

    batcher = Batcher(run)
    callers = [gevent.spawn(batcher, n) for n in range(20)]
    gevent.joinall(callers, raise_error=True)
    assert [c.value for c in callers] == [n * 10 for n in range(20)]
    assert runs == [[(n,) for n in range(20)]]
    assert batcher(7) == 70 and len(runs) == 2  # a caller alone is a batch of one


def test_a_failed_run_raises_to_every_caller_of_its_batch_and_the_next_batch_runs():
    fail = [True]

    def run(calls):
        if fail[0]:
            raise ConnectionError("down")
        return [a for (a,) in calls]

    batcher = Batcher(run)
    callers = [gevent.spawn(batcher, n) for n in range(3)]
    gevent.joinall(callers)
    assert all(isinstance(c.exception, ConnectionError) for c in callers)
    fail[0] = False
    assert batcher(5) == 5
