"""Webhook events: their types, their form, and which receiver wants which (docs/webhooks.md).

An event is a JSON object `{"id", "type", "time", "channel", ...}`: `id` is
unique per event and the same on every retry and replay of it (a receiver
dedupes by it), `time` is milliseconds since the epoch, `channel` is the
channel it is about (absent for `connection.closed`), and each type adds its
own fields. HERALD_WEBHOOK_URL names the receivers: `;`-separated, each a URL
and, after a blank, the comma-separated globs of the event types it wants
(every type when none are given).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from fnmatch import fnmatchcase
from urllib.parse import urlsplit

from pipeline.core.errors import ConfigError
from pipeline.core.messages import new_id, now_ms

EVENT_TYPES = (
    "presence.join",          # a user's first subscription to a channel (a reconnect within the grace is none)
    "presence.leave",         # a user's last subscription to a channel ended, and the grace passed
    "channel.occupied",       # a channel's first subscriber
    "channel.vacated",        # a channel's last subscriber left, and the grace passed
    "message.delivered",      # a message passed its channel's order gate and went out
    "message.rejected",       # the rules blocked a message
    "message.dead_lettered",  # a message went to the dead-letter topic
    "connection.closed",      # a WebSocket closed, with its close code
)
MAX_RECEIVERS = 10
_GLOB = re.compile(r"[a-z_.*]{1,64}")


@dataclasses.dataclass(frozen=True)
class Receiver:
    """One webhook endpoint and the event types it wants (globs over EVENT_TYPES)."""

    url: str
    events: tuple[str, ...] = ("*",)

    @property
    def name(self) -> str:
        """A short stable name for the receiver's keys and metrics: a digest of its URL."""
        return hashlib.sha256(self.url.encode()).hexdigest()[:12]

    def wants(self, event_type: str) -> bool:
        """True when one of the receiver's globs covers `event_type`."""
        return any(fnmatchcase(event_type, glob) for glob in self.events)


def parse_receivers(name: str, raw: str) -> tuple[Receiver, ...]:
    """HERALD_WEBHOOK_URL's receivers: `URL [GLOB,GLOB...]; URL ...`."""
    receivers: list[Receiver] = []
    for entry in filter(None, (part.strip() for part in raw.split(";"))):
        address, _, wanted = entry.partition(" ")
        parts = urlsplit(address)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{name}: {address!r} is not an http:// or https:// URL with a host")
        globs = tuple(g.strip() for g in wanted.split(",") if g.strip()) or ("*",)
        for glob in globs:
            if not _GLOB.fullmatch(glob) or not any(fnmatchcase(t, glob) for t in EVENT_TYPES):
                raise ConfigError(f"{name}: {glob!r} names no event type ({', '.join(EVENT_TYPES)})")
        receivers.append(Receiver(address, globs))
    if len({r.url for r in receivers}) != len(receivers):
        raise ConfigError(f"{name} lists a URL twice")
    if len(receivers) > MAX_RECEIVERS:
        raise ConfigError(f"{name} lists {len(receivers)} receivers; at most {MAX_RECEIVERS}")
    return tuple(receivers)


def event(event_type: str, channel: str | None = None, *, event_id: str | None = None,
          **fields: object) -> dict[str, object]:
    """A new event of `event_type` (one of EVENT_TYPES). `event_id` is given where a retry
    of the work that emits it must emit the same id (a message's outcome), else minted."""
    assert event_type in EVENT_TYPES, event_type
    body: dict[str, object] = {"id": event_id or new_id(), "type": event_type, "time": now_ms()}
    if channel is not None:
        body["channel"] = channel
    body.update(fields)
    return body
