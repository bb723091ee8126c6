"""What becomes of a batch that neither succeeded nor failed transiently: the redelivery policy.

A batch handed back after its worker died is split, one task a message, and
a message that keeps killing workers is dead-lettered past
HERALD_MAX_REDELIVERIES; a batch that failed for a reason that is not
transient is split the same way until the message at fault runs alone and is
dead-lettered; a failure no message can be blamed for is retried without
limit; batches come back shortly while the worker has no rule set it can
apply; what a run left of a channel's line of parked records goes on in a
new task.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace

from celery.exceptions import Retry

from pipeline.core.messages import Envelope
from pipeline.core.metrics import RETRIES
from pipeline.rules.repository import RulesUnavailable
from tasks.processor import Outcome, PassedGate, Processor, failure_reason

log = logging.getLogger("herald.tasks")
# Seconds before a batch is tried again while its worker has no rule set it can
# apply: one VERSION_CHECK or two, a set stored meanwhile is applied at once.
RULES_RECHECK = 1.0


def to_wire(envelopes: list[Envelope]) -> list[dict]:
    """A batch as the task's argument (Celery task arguments are JSON)."""
    return [envelope.to_wire() for envelope in envelopes]


class Redelivery:
    """The policy, given this worker's settings, its Processor (`processor()`, made after
    the fork) and `send(envelopes, **options)`, which queues a batch as a new task
    (Celery's `apply_async` options). `task` is always the bound Celery task running."""

    def __init__(self, settings, processor: Callable[[], Processor], send: Callable[..., None]):
        self.settings = settings
        self.processor = processor
        self.send = send

    def deaths(self, task) -> int:
        """How many workers died running this task: a task started more often than it was
        retried was handed back by a worker that died while running it (maybe one message
        kills workers). Raises redis errors."""
        return self.processor().store.count_run(task.request.id) - 1 - task.request.retries

    def after_worker_loss(self, task, envelopes: list[Envelope], deaths: int) -> dict:
        """Isolate the message that may be killing workers; dead-letter it past the cap."""
        if len(envelopes) > 1:
            # One task per message from here on, so only a poisonous one is held back.
            log.warning("batch redelivered after a worker died; splitting it",
                        extra={"message_id": envelopes[0].id, "count": len(envelopes), "deaths": deaths})
            for envelope in envelopes:
                self.send([envelope])
            return {"split": len(envelopes)}
        if deaths > self.settings.max_redeliveries:
            return self.dead_letter(
                task, envelopes,
                f"worker died {deaths} times while processing it (or it ran past HERALD_TASK_TIME_LIMIT)",
                attempts=deaths + 1)
        # Nor does it take on its channels' parked records: each goes on in a task
        # of its own, so that a record that kills workers there is isolated too.
        outcome = self.processor().run(envelopes, take_on=False)
        self._send_each(task, outcome.due)
        return {**outcome.counts(), "handed_on": len(outcome.due)}

    def dead_letter(self, task, envelopes: list[Envelope], reason: str, attempts: int) -> dict:
        """Dead-letter the batch's first message and send the rest on behind it (`pass_gate`):
        the others never failed themselves, and get a fresh set of retries. A dead letter
        that fails retries the batch (`retry_unlimited`)."""
        try:
            self.processor().dead_letter_first(envelopes, reason, attempts=attempts)
        except Exception as exc:
            raise self.retry_unlimited(task, envelopes, exc) from None
        self.pass_gate(task, envelopes)
        return {"dead": 1}

    def pass_gate(self, task, envelopes: list[Envelope]) -> None:
        """Send the batch on, its first message dead-lettered: that one only passes its channel's
        order gate, without its data or rules' decision (what may have failed), in a fresh task.
        Should the broker refuse it, the task is retried with that batch, never with the message
        again: it would be dead-lettered twice."""
        onward = [replace(envelopes[0], skip=True, data=None, rules=None), *envelopes[1:]]
        try:
            self.send(onward)
        except Exception as exc:
            raise self.retry_unlimited(task, onward, exc) from None

    def retry_unlimited(self, task, envelopes: list[Envelope], exc: BaseException) -> Retry:
        """Retry `envelopes` after HERALD_RETRY_MAX_DELAY, however often they were: for a failure
        no message can be blamed for, where a task given up would be acked and its messages lost
        or their channel stalled until HERALD_ORDER_WAIT."""
        log.warning("retrying without limit", extra={"message_id": envelopes[0].id, "count": len(envelopes),
                                                     "error": failure_reason(exc), "retries": task.request.retries})
        RETRIES.inc()
        # Celery reads max_retries=None as the task's own limit: infinity is no limit.
        return task.retry(args=(to_wire(envelopes),), countdown=self.settings.retry_max_delay, max_retries=math.inf,
                          exc=exc)

    def isolate(self, task, envelopes: list[Envelope], exc: Exception, attempts: int) -> dict:
        """A batch failed for a reason that is not transient: split it, so that each message runs
        alone and only the one at fault fails; a message alone is dead-lettered with the reason,
        and its channel's order gate moves on. Nothing here leaves the task given up: a step
        that fails (the dead letter, a send) retries it (`retry_unlimited`)."""
        if isinstance(exc, PassedGate):
            # The batch's records passed or are parked (safe at their gates): none
            # is dead-lettered. What the run was taking on goes on, one task a record.
            log.error("failed after passing its order gate; not dead-lettered",
                      extra={"message_ids": sorted(exc.passed), "error": failure_reason(exc.cause),
                             "handed_on": [e.id for e in exc.due]})
            self._send_each(task, exc.due)
            return {"dead": 0, "handed_on": len(exc.due)}
        reason = failure_reason(exc)
        if len(envelopes) > 1:
            log.warning("batch failed; splitting it", extra={"message_id": envelopes[0].id, "count": len(envelopes),
                                                              "error": reason})
            self._send_each(task, envelopes)
            return {"split": len(envelopes)}
        if envelopes[0].skip:
            # Even passing the gate failed, with no data of its own to blame: a fault
            # of Herald's, not the message's. Until it passes, its channel waits.
            log.error("a dead-lettered message could not pass its order gate",
                      extra={"message_id": envelopes[0].id, "channel": envelopes[0].channel, "error": reason})
            raise self.retry_unlimited(task, envelopes, exc)
        return self.dead_letter(task, envelopes, reason, attempts)

    def _send_each(self, task, envelopes: list[Envelope]) -> None:
        # One task a record; a broker that refuses one retries the task with the rest.
        sent = 0
        try:
            for envelope in envelopes:
                self.send([envelope])
                sent += 1
        except Exception as down:
            raise self.retry_unlimited(task, envelopes[sent:], down) from None

    def await_rules(self, task, envelopes: list[Envelope], exc: RulesUnavailable) -> dict:
        """This process has no rule set it can apply: the batch comes back in RULES_RECHECK
        seconds, as often as it takes, without a retry counted against its messages (none is
        dead-lettered for a fault of the policy's) and before the run is counted (`deaths`)."""
        log.warning("retrying: no rule set to apply", extra={"message_id": envelopes[0].id, "count": len(envelopes),
                                                              "error": failure_reason(exc)})
        RETRIES.inc()
        self.send(envelopes, task_id=task.request.id, retries=task.request.retries,
                  countdown=min(RULES_RECHECK, self.settings.retry_max_delay))
        return {"waiting_for_rules": len(envelopes)}

    def hand_on(self, outcome: Outcome) -> dict:
        """Send the parked records a run left due at their gates (Processor's LINE_SLICE) on
        as a new task, at once; returns the batch's counts (the task's result)."""
        if outcome.due:
            self.send(outcome.due)
        return {**outcome.counts(), "handed_on": len(outcome.due)}
