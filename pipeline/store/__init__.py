"""Herald's Redis state, one repository per concern over a shared script runner:

  client.py       connecting (single node or cluster, TLS) and the start-up checks
  scripts.py      the Lua scripts of lua/ and the runner (one round trip per batch)
  statuses.py     message status hashes and their `status` frames
  gate.py         channels' order gates: delivery, once, in Kafka order
  effects.py      rule effects (alerts, routed copies) written once into history
  history.py      history pages
  inflight.py     the in-flight index of dispatched tasks, task run counts
  idempotency.py  claims of message ids and their first answers
  connections.py  WebSocket caps per user and address
  rates.py        rules' rate windows
  webhooks.py     webhook receivers' cursors, delivery leases and dead letters
  occupancy.py    subscriptions counted per channel and user, and their events
  revocations.py  revoked token ids and users' revocation cut-offs
  keys.py         the key schema; pubsub.py the subscribers' pub/sub links

Every change that must happen at most once (delivering a message, moving its
status forward) is one Lua script, so a task that runs twice, or two workers
racing, cannot deliver twice or move a status backwards.

`Store` gathers the repositories behind the methods its callers use.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.core.frames import Emission, ephemeral_frame
from pipeline.core.messages import Envelope
from pipeline.core.settings import Settings
from pipeline.store.client import Client, check_at_start, connect, run_ids
from pipeline.store.connections import Connections
from pipeline.store.effects import Effects
from pipeline.store.gate import Gate, PassResult
from pipeline.store.history import History
from pipeline.store.idempotency import Idempotency
from pipeline.store.inflight import InFlight
from pipeline.store.keys import Keys, routed
from pipeline.store.occupancy import Occupancy
from pipeline.store.rates import RATE_WINDOW_CAP, Rates
from pipeline.store.revocations import RevokedTokens
from pipeline.store.scripts import Runner
from pipeline.store.statuses import Statuses, expires_at, message_fields
from pipeline.store.webhooks import WebhookState

# What callers outside the store import from the package.
__all__ = ["RATE_WINDOW_CAP", "Store", "check_at_start", "connect", "run_ids"]


class Store:
    """Typed access to Herald's keys under one prefix: the repositories of one client."""

    def __init__(self, client: Client, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.runner = Runner(client)
        self.cluster = self.runner.cluster
        self.keys = Keys(settings.redis_prefix, self.cluster)
        self.statuses = Statuses(self.runner, self.keys, settings)
        self.gate = Gate(self.runner, self.keys, settings, self.statuses)
        self.effects = Effects(self.runner, self.keys, settings)
        self.history_streams = History(self.runner, self.keys, settings)
        self.in_flight = InFlight(self.runner, self.keys, settings)
        self.idempotency = Idempotency(self.runner, self.keys, settings)
        self.connections = Connections(self.runner, self.keys, settings)
        self.rates = Rates(self.runner, self.keys)
        self.webhooks = WebhookState(self.runner, self.keys, [r.name for r in settings.webhooks])
        self.occupancy = Occupancy(self.runner, self.keys)
        self.revocations = RevokedTokens(self.runner, self.keys)

    def publish(self, name: str, message: str, client: Any = None) -> Any:
        """Publish on a pub/sub channel built by Keys (sharded on a cluster); returns how many
        subscribers received it (the pipeline, when `client` is one)."""
        return self.runner.publish(name, message, client)

    def publish_ephemeral(self, envelope: Envelope) -> None:
        """Publish an ephemeral message's frame on its channel's message pub/sub channel, as the
        delivery script publishes a stored one but with no stream id: in no history, no status."""
        self.publish(self.keys.message_channel(envelope.channel), routed("", ephemeral_frame(envelope)))

    def mget(self, keys: list[str]) -> list[Any]:
        """GET of many keys in one call (spread over their nodes on a cluster)."""
        return self.runner.mget(keys)

    # -- statuses ------------------------------------------------------------
    def set_status(self, envelope: Envelope, status: str, *, fields: dict[str, Any] | None = None,
                   origin: str | None = None, force: bool = False) -> str:
        """Move a message's status forward (never back) and push the change; returns the status now."""
        return self.statuses.set_status(envelope, status, fields=fields, origin=origin, force=force)

    def record_accepted(self, accepted: list[tuple[Envelope, int, int]],
                        answers: dict[str, tuple[str, str]]) -> None:
        """Note records Kafka acknowledged, (envelope, partition, offset) each, unless a worker
        already moved them further, and keep the first answer of each claimed id (`answers`:
        global id to (its claim, the answer)) as long as its status (`expires_at`), in place
        of the claim only while the claim is still this request's. One round trip for them
        all. The `accepted` status has no frame to publish, and no data."""
        expiry = {envelope.id: expires_at(self.settings, envelope) for envelope, _partition, _offset in accepted}
        answer_calls = [self.idempotency.answer_call(msg_id, claim, value, expiry[msg_id])
                        for msg_id, (claim, value) in answers.items()]
        self.runner.run(self.statuses.accept_calls(accepted) + answer_calls)

    def mark_processing(self, envelopes: list[Envelope]) -> list[str]:
        """Workers took these messages; returns each one's status now (a finished one stays finished)."""
        return self.statuses.mark([(envelope, "processing", message_fields(envelope)) for envelope in envelopes])

    def mark_rejected(self, rejected: list[tuple[Envelope, str]]) -> None:
        """Record messages a rule blocked, (envelope, rule) each, as `rejected` naming the rule,
        in one round trip; each still has to pass its channel's order gate (as `skip`)."""
        # A blocked message's data is not served (a moderation `block` would
        # hide nothing otherwise); the alert, if any, carries it.
        self.statuses.mark([(envelope, "rejected", message_fields(envelope)
                             | {"data": "null", "error": f"blocked by rule {rule}", "rule": rule})
                            for envelope, rule in rejected])

    def mark_failed(self, envelope: Envelope, error: str) -> None:
        """Record a dead-lettered message; it still has to pass its channel's order gate
        (as `skip`) for the channel to move on."""
        self.set_status(envelope, "failed", fields={"error": error}, origin=envelope.origin)

    def get_message(self, msg_id: str) -> dict[str, Any] | None:
        """The stored message with its status (by global id), or None."""
        return self.statuses.get_message(msg_id)

    # -- the order gate and history -------------------------------------------
    def deliver(self, envelopes: list[Envelope]) -> list[PassResult]:
        """Pass each record through its channel's order gate, in order, and deliver it once,
        or park it until its predecessor passes (Gate.pass_all)."""
        return self.gate.pass_all(envelopes)

    def emit(self, emissions: list[Emission]) -> None:
        """Write rule effects into their channels' histories, once each (Effects.emit)."""
        self.effects.emit(emissions)

    def history(self, channel: str, since: str | None, limit: int) -> dict[str, Any]:
        """A page of a channel's history after `since` (History.page)."""
        return self.history_streams.page(channel, since, limit)

    def last_ids(self, channels: list[str]) -> list[str | None]:
        """The newest history id of each channel, or None, in one round trip."""
        return self.history_streams.last_ids(channels)

    def count_in_window(self, key: str, per: float, member: str, *, record: bool = True) -> int:
        """Rates.count_in_window."""
        return self.rates.count_in_window(key, per, member, record=record)

    # -- in flight -------------------------------------------------------------
    def track_dispatched(self, envelopes: list[Envelope], at: float | None = None) -> None:
        """Remember messages dispatched at `at` (by default now) until they pass their order
        gate, and as queued until a worker takes them (InFlight.track)."""
        self.in_flight.track(envelopes, time.time() if at is None else at)

    def mark_taken(self, ids: list[str], dispatched_at: float) -> None:
        """InFlight.taken."""
        self.in_flight.taken(ids, dispatched_at)

    def queue_ends(self) -> tuple[float | None, float | None]:
        """InFlight.queue_ends."""
        return self.in_flight.queue_ends()

    def claim_queued(self, before: float, limit: int = 500) -> list[Envelope]:
        """InFlight.claim_queued."""
        return self.in_flight.claim_queued(before, limit)

    def stale_dispatched(self, older_than: float, limit: int = 500) -> list[Envelope]:
        """InFlight.stale."""
        return self.in_flight.stale(older_than, limit)

    def in_flight_before(self, first_offsets: dict[int, int]) -> dict[int, dict[str, int]]:
        """InFlight.before."""
        return self.in_flight.before(first_offsets)

    def oldest_in_flight(self, partitions: set[int]) -> dict[int, int]:
        """InFlight.oldest."""
        return self.in_flight.oldest(partitions)

    def count_run(self, task_id: str) -> int:
        """How many times a task has started (redeliveries and retries included)."""
        return self.in_flight.count_run(task_id)

    # -- connection caps ---------------------------------------------------------
    def claim_connections(self, claims: list[tuple[str, str, str]]) -> list[str | None]:
        """Connections.claim."""
        return self.connections.claim(claims)

    def refresh_connections(self, members: list[tuple[str, str, str]]) -> None:
        """Connections.refresh."""
        self.connections.refresh(members)

    def release_connection(self, member: str, user: str, address: str) -> None:
        """Stop counting a closed WebSocket."""
        self.connections.release(member, user, address)

    # -- idempotency ---------------------------------------------------------------
    def claim_idempotency(self, msg_id: str, claim: str) -> str | None:
        """Idempotency.claim."""
        return self.idempotency.claim(msg_id, claim)

    def release_idempotency(self, msg_id: str, claim: str) -> None:
        """Idempotency.release."""
        self.idempotency.release(msg_id, claim)
