"""Accepting messages: idempotency, then Kafka, then the `accepted` status; and sending
ephemeral ones, which skip all three.

Shared by the HTTP API and the WebSocket hub, so both answer the same way:
`accepted` means Kafka acknowledged the record (never otherwise); `sent`, that
Redis took an ephemeral message's frame for its subscribers.
An id the client chose is scoped to its sender here, before anything is
claimed or written (pipeline/core/ids.py, docs/design.md: "Message ids").
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import replace

import redis

from pipeline.core.errors import HeraldError, IdempotencyConflict, InvalidInput, RedisUnavailable
from pipeline.core.ids import MAX_CLIENT_ID, client_id, scoped
from pipeline.core.messages import Envelope, Publish, encode, new_id, to_headers
from pipeline.core.metrics import PUBLISHES

log = logging.getLogger("herald.ingest")


class ClaimUnavailable(RedisUnavailable):
    """Redis did not answer the idempotency claim: the message was not published."""


class IdTooLong(InvalidInput):
    """A client's id leaves no room for its sender's scope (pipeline/core/ids.py)."""

    def __init__(self) -> None:
        super().__init__(f"A message id a client chooses is at most {MAX_CLIENT_ID} characters",
                         [{"field": "id", "problem": f"longer than {MAX_CLIENT_ID} characters"}])


class GroupCommit:
    """Writes what concurrent callers submit in as few `write(items)` calls as it can.

    The first caller writes at once; those that come while a write is under
    way wait, and the next of them writes for all of them together. Each
    caller returns once its own items are written, or raises what that write
    raised. Threads or gevent greenlets alike (threading is patched there).
    """

    def __init__(self, write):
        self._write = write
        self._lock = threading.Lock()
        self._waiting: list[tuple[list, _Turn]] = []
        self._busy = False

    def submit(self, items: list) -> None:
        """Write `items`, with whatever else is waiting; returns once they are written."""
        turn = _Turn()
        with self._lock:
            self._waiting.append((items, turn))
            lead, self._busy = not self._busy, True
        if not lead:
            turn.done.wait()
            if not turn.lead:
                if turn.error is not None:
                    raise turn.error
                return
        with self._lock:
            group, self._waiting = self._waiting, []
        error = None
        try:
            self._write([item for items, _turn in group for item in items])
        except BaseException as exc:  # a gevent Timeout too: the others must not wait for ever
            error = exc
        with self._lock:
            successor = self._waiting[0][1] if self._waiting else None
            self._busy = successor is not None
        shared = error if error is None or isinstance(error, Exception) else \
            redis.ConnectionError("the write was interrupted")
        for _items, other in group:
            if other is not turn:
                other.error = shared
                other.done.set()
        if successor is not None:
            successor.lead = True
            successor.done.set()
        if error is not None:
            raise error


class _Turn:
    __slots__ = ("done", "lead", "error")

    def __init__(self):
        self.done = threading.Event()
        self.lead = False
        self.error: BaseException | None = None


class Ingest:
    """Publishes validated envelopes to the main topic."""

    def __init__(self, settings, store, publisher):
        self.settings = settings
        self.store = store
        self.publisher = publisher
        # Concurrent requests record their accepted messages in one Redis
        # round trip: a round trip each, with its pool checkout, would be a
        # large share of a single POST's handling.
        self._statuses = GroupCommit(self._write_statuses)

    def publish(self, envelope: Envelope, *, idempotent: bool, origin: str | None = None,
                request_id: str | None = None, log_accepted: bool = True) -> dict:
        """Publish one envelope; returns `{id, global_id, channel, status, partition, offset}`.
        With `idempotent`, `envelope.id` is the client's and is scoped to `envelope.sender`."""
        return self.publish_many([envelope], idempotent=[idempotent], origin=origin, request_id=request_id,
                                 log_accepted=log_accepted)[0]

    def publish_many(self, envelopes: list[Envelope], *, idempotent: list[bool], origin: str | None = None,
                     request_id: str | None = None, raise_errors: bool = True, log_accepted: bool = True) -> list:
        """Publish several envelopes at once; each result is an answer dict or, with
        `raise_errors=False`, the HeraldError that kept that message out. `log_accepted=False`
        leaves the "accepted" line to the caller (the HTTP API puts it in its access line)."""
        results: list = [None] * len(envelopes)
        pending, claims = {}, {}
        duplicates = 0  # idempotent retries answered with their first answer
        envelopes = list(envelopes)
        for index, envelope in enumerate(envelopes):
            try:
                if idempotent[index]:
                    if len(envelope.id) > MAX_CLIENT_ID:
                        raise IdTooLong()
                    envelope = envelopes[index] = replace(envelope, id=scoped(envelope.sender, envelope.id))
                    claim = json.dumps({"claim": new_id()})
                    prior = self._claim(envelope, claim)
                    if prior is not None:
                        results[index] = prior
                        duplicates += 1
                        continue
                    claims[index] = claim
                pending[index] = self.publisher.send(self.settings.topic, envelope.channel, encode(envelope),
                                                     to_headers(origin, request_id))
            except HeraldError as exc:
                self._forget(envelope, claims.get(index))
                results[index] = exc
        accepted = []
        for index, future in pending.items():
            envelope = envelopes[index]
            try:
                partition, offset = self.publisher.wait(future)
            except HeraldError as exc:
                self._forget(envelope, claims.get(index))
                results[index] = exc
                continue
            results[index] = {"id": client_id(envelope.id), "global_id": envelope.id, "channel": envelope.channel,
                              "status": "accepted", "partition": partition, "offset": offset}
            accepted.append((index, partition, offset))
        _count(len(accepted), duplicates, sum(isinstance(result, HeraldError) for result in results))
        if accepted:
            self._record(envelopes, accepted, results, claims)
            if log_accepted:
                _log_accepted([results[index] for index, _partition, _offset in accepted], request_id)
        if raise_errors:
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        return results

    def send(self, envelope: Envelope, *, idempotent: bool) -> dict:
        """Send an ephemeral message (docs/protocol.md: "Ephemeral messages") straight to its
        channel's subscribers: no Kafka, no claim, no status; returns `{id, channel, status: "sent"}`.
        With `idempotent`, the client's id is checked and scoped as a published one's (its frame
        shows it as sent), but nothing remembers it: a repeat is sent again."""
        if idempotent:
            if len(envelope.id) > MAX_CLIENT_ID:
                raise IdTooLong()
            envelope = replace(envelope, id=scoped(envelope.sender, envelope.id))
        try:
            self.store.publish_ephemeral(envelope)
        except redis.RedisError as exc:
            raise RedisUnavailable(f"cannot publish the ephemeral message: {exc}") from None
        PUBLISHES.labels("sent").inc()
        return {"id": client_id(envelope.id), "channel": envelope.channel, "status": "sent"}

    def _claim(self, envelope: Envelope, claim: str) -> dict | None:
        """None once this request owns the (global) id; else the first answer. Only the id's
        own sender reaches its claim: another sender's same id is another global id."""
        msg_id = envelope.id
        deadline = time.monotonic() + self.settings.produce_timeout + 2
        try:
            while True:
                prior = self.store.claim_idempotency(msg_id, claim)
                if prior is None:
                    return None
                held = json.loads(prior)
                if "answer" in held:
                    return held["answer"]
                if time.monotonic() > deadline:
                    raise IdempotencyConflict(f"message {msg_id} is still being published by another request")
                time.sleep(0.01)
        except redis.RedisError as exc:
            log.warning("idempotency store unavailable", extra={"message_id": msg_id, "error": str(exc)})
            raise ClaimUnavailable("cannot check the idempotency key") from None

    def _forget(self, envelope: Envelope, claim: str | None) -> None:
        if claim is None:
            return
        try:
            self.store.release_idempotency(envelope.id, claim)
        except redis.RedisError:
            log.warning("cannot release idempotency claim", extra={"message_id": envelope.id})

    def _write_statuses(self, items: list) -> None:
        self.store.record_accepted([(envelope, partition, offset) for envelope, partition, offset, _ in items],
                                   {envelope.id: answer for envelope, _p, _o, answer in items if answer is not None})

    def _record(self, envelopes, accepted, results, claims) -> None:
        # One Redis round trip for a whole batch (and whatever other requests
        # write meanwhile): one per message made a batch of 100 wait for 100 in a row.
        answers = {envelopes[index].id: (claims[index], json.dumps({"answer": results[index]}))
                   for index, _partition, _offset in accepted if index in claims}
        try:
            self._statuses.submit([(envelopes[index], partition, offset, answers.get(envelopes[index].id))
                                   for index, partition, offset in accepted])
        except redis.RedisError as exc:
            # Kafka has the records: the answers stand, the worker fills the status in.
            log.warning("status store unavailable", extra={"message_id": envelopes[accepted[0][0]].id,
                                                           "count": len(accepted), "error": str(exc)})


def ephemeral(settings, message: Publish) -> bool:
    """Whether a message goes straight to subscribers (`Ingest.send`): it asks to, or its channel's
    namespace is in HERALD_EPHEMERAL_NAMESPACES."""
    return bool(message.ephemeral) or settings.ephemeral(message.channel)


def accepted_fields(answers: list[dict]) -> dict:
    """What a log line says of accepted messages: global id (as the workers' lines name it),
    channel and place of one, or the global ids of several."""
    if len(answers) == 1:
        answer = answers[0]
        return {"message_id": answer["global_id"], "channel": answer["channel"], "partition": answer["partition"],
                "offset": answer["offset"]}
    # One line per call: a line per message was most of a batch's logging.
    return {"message_ids": [answer["global_id"] for answer in answers]}


def _count(accepted: int, duplicate: int, refused: int) -> None:
    """Count a call's publishes by result: an increment per result, not per message."""
    for result, count in (("accepted", accepted), ("duplicate", duplicate), ("refused", refused)):
        if count:
            PUBLISHES.labels(result).inc(count)


def _log_accepted(answers: list[dict], request_id: str | None) -> None:
    log.info("accepted", extra={**accepted_fields(answers), "request_id": request_id})
