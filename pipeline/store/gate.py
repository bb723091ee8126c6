"""The order gate: every record of a channel passes it in Kafka order, and a record
that passes is delivered once; one that comes before its predecessor is parked, and
taken on by whoever passes the gate next to it (gate_pass.lua; docs/design.md: "Order")."""

from __future__ import annotations

import logging
import time
from typing import Literal, NamedTuple

from pipeline.core.errors import PermanentError
from pipeline.core.frames import MESSAGE_TAIL, message_frame_head, status_frame
from pipeline.core.messages import Envelope, decode, encode
from pipeline.core.settings import Settings
from pipeline.store import inflight
from pipeline.store.keys import ROUTE_SEPARATOR, Keys
from pipeline.store.scripts import Call, Runner, Script
from pipeline.store.statuses import Statuses, expires_at


class GateKeys(NamedTuple):
    # The channel's keys (its slot on a cluster):
    gate: str  # the highest offset handled
    history: str  # the history stream
    epoch: str  # the history's first id ever
    waiting: str  # offsets parked at the gate, scored by when each was first parked
    parked: str  # parked records, by the offset each waits for
    done: str  # the message's dedupe marker
    message_channel: str  # message pub/sub channel
    status_channel: str  # status pub/sub channel
    # On a single Redis only (other slots on a cluster: the caller updates them):
    message: str | None = None  # the message's status hash
    in_flight_index: str | None = None
    in_flight_envelopes: str | None = None


class GateArgs(NamedTuple):
    offset: int  # the record's Kafka offset (-1 when unknown)
    prev: int | str  # the channel's previous offset, or ''
    expires_at: int  # when the done marker and status hash expire (Unix seconds)
    maxlen: int  # history's most entries
    frame_head: str  # the message frame without its offset ('' when skipped)
    frame_tail: str  # what closes a message frame after its offset
    status_frame: str  # the `delivered` status frame ('' when skipped)
    origin_channel: str  # the publisher's node pub/sub channel, or ''
    origin_client: str
    msg_id: str
    oldest: str  # the oldest history id to keep, '' for no age limit
    idle_ttl: int  # seconds an idle channel's keys live
    skip: str  # '1': pass the gate without delivering
    now: float  # seconds
    order_wait: float  # seconds parked after which a line's head passes without its predecessor
    publish: str  # PUBLISH, or SPUBLISH on a cluster
    record: bytes  # the record as it is parked (`encode`)


log = logging.getLogger("herald.processing")
GATE_PASS = Script("gate_pass.lua", GateKeys, GateArgs, batched=True, constants={"SEPARATOR": ROUTE_SEPARATOR})


class PassResult(NamedTuple):
    """What became of a record at its gate: `parked` while its predecessor is not handled;
    `forced` when it passed without it (parked HERALD_ORDER_WAIT); `due`: the parked
    records that may pass now (next to the gate's new position, and behind this record
    when it passed below the gate), for the caller to take on."""

    outcome: Literal["delivered", "duplicate", "skipped", "parked"]
    stream_id: str
    forced: bool
    due: tuple[Envelope, ...] = ()


def _parked(envelope: Envelope, *raw: str) -> tuple[Envelope, ...]:
    # The parked records a pass named. One this worker cannot read (written by
    # another version, say) stays parked, for the bridge's sweep to send its
    # record again; the pass that named it stands.
    due = []
    for record in raw:
        if record:
            try:
                due.append(decode(record))
            except PermanentError as exc:
                log.error("a parked record cannot be read; left for the bridge's sweep",
                          extra={"message_id": envelope.id, "channel": envelope.channel, "error": str(exc)})
    return tuple(due)


def oldest_kept(settings: Settings, channel: str, now: float) -> str:
    """The oldest history id a channel keeps by age at `now`, '' for no age limit."""
    _maxlen, max_age = settings.retention(channel)
    return f"{int((now - max_age) * 1000)}-0" if max_age else ""


class Gate:
    """Channels' order gates."""

    def __init__(self, runner: Runner, keys: Keys, settings: Settings, statuses: Statuses) -> None:
        self.runner = runner
        self.keys = keys
        self.settings = settings
        self.statuses = statuses

    def _call(self, envelope: Envelope, now: float) -> Call:
        keys, channel, skipped = self.keys, envelope.channel, envelope.skip
        gate_keys = GateKeys(keys.gate(channel), keys.history(channel), keys.epoch(channel), keys.waiting(channel),
                             keys.parked(channel), keys.done(envelope.id, channel), keys.message_channel(channel),
                             keys.status_channel(channel))
        node, client = "", ""
        if not self.runner.cluster:
            gate_keys = gate_keys._replace(message=keys.message(envelope.id), in_flight_index=keys.in_flight_index,
                                           in_flight_envelopes=keys.in_flight_envelopes)
            node, client = keys.origin_route(envelope.origin)
        return GATE_PASS(gate_keys, GateArgs(
            offset=-1 if envelope.offset is None else envelope.offset,
            prev="" if envelope.prev is None else envelope.prev,
            expires_at=expires_at(self.settings, envelope), maxlen=self.settings.retention(channel)[0],
            frame_head="" if skipped else message_frame_head(envelope), frame_tail=MESSAGE_TAIL,
            status_frame="" if skipped else status_frame(envelope, "delivered"),
            origin_channel=node, origin_client=client,
            msg_id=envelope.id, oldest=oldest_kept(self.settings, channel, now),
            idle_ttl=self.settings.channel_idle_ttl, skip="1" if skipped else "0", now=now,
            order_wait=self.settings.order_wait, publish=self.runner.publish_command, record=encode(envelope)))

    def pass_all(self, envelopes: list[Envelope]) -> list[PassResult]:
        """Pass each record through its channel's order gate, in order, and deliver it once.

        A record is parked while the channel's previous record is not handled
        (it is in Redis now: its task is done with it); records flagged `skip`
        (dead-lettered, rejected) only move the gate on. Each result names the
        parked record due next in its channel, which the caller passes in turn.
        One round trip for the batch (two on a cluster, see `_after_pass`).
        """
        now = time.time()
        replies = self.runner.run([self._call(envelope, now) for envelope in envelopes])
        results = [PassResult(outcome, sid, forced == "1", _parked(envelope, at_gate, behind))
                   for envelope, (outcome, sid, forced, at_gate, behind) in zip(envelopes, replies)]
        if self.runner.cluster:
            self._after_pass(envelopes, results)
        return results

    def _after_pass(self, envelopes: list[Envelope], results: list[PassResult]) -> None:
        # On a cluster, what the gate script cannot reach from the channel's
        # slot: the message's status, the in-flight index, and the publisher's
        # own status frame. A duplicate writes the status too, so a worker that
        # died right after delivering leaves no message stuck in `processing`
        # once its task runs again.
        passed = [e.id for e, result in zip(envelopes, results) if result.outcome != "parked"]
        if not passed:
            return
        calls = []
        pipe = self.runner.client.pipeline(transaction=False)
        for envelope, result in zip(envelopes, results):
            if result.outcome in ("delivered", "duplicate"):
                calls.append(self.statuses.call(envelope, "delivered", {"stream_id": result.stream_id}))
            if result.outcome == "delivered":
                self.statuses.publish_status(envelope, "delivered", envelope.origin, pipe, channel=False)
        inflight.forget(pipe, self.keys, passed)
        self.runner.run(calls)
        pipe.execute()
