"""The server API's commands to live sockets: their one format, and their effect on this process.

The HTTP API (web/serverapi.py) publishes a command on the control channel
(`Keys.control_channel`), which every web process's router subscribes; each
process applies it to its own clients, found through the hub's index by user
(or by token id), so a command costs that user's sockets, not all of them.
A command is a small JSON object, bounded in bytes and checked field by
field when it is made and again when it is read: a malformed one is logged
and skipped, never applied.

A command reaches the processes listening when it is published; one whose
pub/sub link is down misses it. A revocation is also in Redis, which a
process reads again when its link comes back (web/revocations.py); a
missed disconnect or subscribe is not replayed (docs/server-api.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging

from pipeline.core.messages import valid_channel
from pipeline.core.streamids import valid as valid_stream_id
from web.auth import MAX_JTI, MAX_USER
from web.revocations import REVOKED_REASON

log = logging.getLogger("herald.hub")

MAX_COMMAND_BYTES = 4096
MAX_REASON_BYTES = 120  # a close frame carries 123 bytes of reason at most
DISCONNECT_CODE = 4010
DISCONNECT_REASON = "disconnected by the server"
REVOKED_CODE = 4001
CODES = range(4000, 5000)  # the close codes a disconnect may choose: the application's range (RFC 6455 7.4.2)


class BadCommand(ValueError):
    """A command that is not in the format, or breaks one of its bounds."""


def check_user(user: object) -> str:
    """A user name a command may carry."""
    if not isinstance(user, str) or not 0 < len(user) <= MAX_USER:
        raise BadCommand(f"user must be a string of 1 to {MAX_USER} characters")
    return user


def check_code(code: object) -> int:
    """A close code a disconnect may use: 4000-4999."""
    if not isinstance(code, int) or isinstance(code, bool) or code not in CODES:
        raise BadCommand("code must be an integer from 4000 to 4999")
    return code


def check_reason(reason: object) -> str:
    """A close reason: text of at most MAX_REASON_BYTES bytes in UTF-8."""
    try:
        size = len(reason.encode()) if isinstance(reason, str) else None
    except UnicodeEncodeError:  # a lone surrogate
        size = None
    if size is None or size > MAX_REASON_BYTES:
        raise BadCommand(f"reason must be text of at most {MAX_REASON_BYTES} bytes in UTF-8")
    return reason  # type: ignore[return-value]


def clip_reason(reason: str) -> str:
    """A close reason cut to MAX_REASON_BYTES bytes in UTF-8, on a character's boundary (what
    cannot be encoded, a lone surrogate, becomes '?')."""
    return reason.encode(errors="replace")[:MAX_REASON_BYTES].decode(errors="ignore")


def check_channel(channel: object) -> str:
    """A channel name."""
    if not valid_channel(channel):
        raise BadCommand("channel must be a channel name")
    return channel  # type: ignore[return-value]


def check_since(since: object) -> str | None:
    """An optional offset to resume after."""
    if since is not None and not valid_stream_id(since):
        raise BadCommand("since must be an offset from a message frame")
    return since  # type: ignore[return-value]


def check_jti(jti: object) -> str:
    """A token id."""
    if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI:
        raise BadCommand(f"jti must be a string of 1 to {MAX_JTI} characters")
    return jti


def check_time(value: object, name: str) -> float:
    """A time in seconds since the epoch."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1e11:
        raise BadCommand(f"{name} must be a time in seconds since the epoch")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Disconnect:
    """Close every socket of `user` with `code` and `reason`."""

    user: str
    code: int = DISCONNECT_CODE
    reason: str = DISCONNECT_REASON

    def __post_init__(self):
        check_user(self.user)
        check_code(self.code)
        check_reason(self.reason)


@dataclasses.dataclass(frozen=True)
class Subscribe:
    """Subscribe every live socket of `user` to `channel` (after `since`, when given)."""

    user: str
    channel: str
    since: str | None = None

    def __post_init__(self):
        check_user(self.user)
        check_channel(self.channel)
        check_since(self.since)


@dataclasses.dataclass(frozen=True)
class Unsubscribe:
    """Unsubscribe every live socket of `user` from `channel`."""

    user: str
    channel: str

    def __post_init__(self):
        check_user(self.user)
        check_channel(self.channel)


@dataclasses.dataclass(frozen=True)
class RevokeToken:
    """The token `jti` is revoked until `lapse`: its sockets are closed 4001."""

    jti: str
    lapse: float

    def __post_init__(self):
        check_jti(self.jti)
        check_time(self.lapse, "lapse")


@dataclasses.dataclass(frozen=True)
class RevokeUser:
    """`user`'s tokens issued before `issued_before` are revoked: their sockets are closed 4001."""

    user: str
    issued_before: float

    def __post_init__(self):
        check_user(self.user)
        check_time(self.issued_before, "issued_before")


Command = Disconnect | Subscribe | Unsubscribe | RevokeToken | RevokeUser
KINDS: dict[str, type[Command]] = {"disconnect": Disconnect, "subscribe": Subscribe, "unsubscribe": Unsubscribe,
                                   "revoke_token": RevokeToken, "revoke_user": RevokeUser}
_NAMES = {kind: name for name, kind in KINDS.items()}


def name_of(command: Command) -> str:
    """The command's `op`: disconnect, subscribe, unsubscribe, revoke_token or revoke_user."""
    return _NAMES[type(command)]


def encode(command: Command) -> str:
    """The command as published on the control channel."""
    return json.dumps({"op": _NAMES[type(command)], **dataclasses.asdict(command)}, separators=(",", ":"))


def decode(payload: str | bytes) -> Command:
    """The command a payload carries; BadCommand when it is not one (too large, not JSON,
    an unknown op, a missing, extra or out-of-bounds field)."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise BadCommand(f"a command is at most {MAX_COMMAND_BYTES} bytes")
    try:
        fields = json.loads(payload)
    except (ValueError, RecursionError):
        raise BadCommand("a command is a JSON object") from None
    if not isinstance(fields, dict):
        raise BadCommand("a command is a JSON object")
    kind = KINDS.get(fields.pop("op", None))
    if kind is None:
        raise BadCommand("unknown command")
    names = {field.name for field in dataclasses.fields(kind)}
    if not set(fields) <= names:
        raise BadCommand(f"unknown fields: {sorted(set(fields) - names)}")
    try:
        return kind(**fields)
    except TypeError:  # a required field missing
        raise BadCommand(f"missing fields: {sorted(names - set(fields))}") from None


class Control:
    """Applies the commands read on the control channel to this process's clients."""

    def __init__(self, hub):
        self.hub = hub

    def handle(self, payload: str | bytes) -> None:
        """Apply one published command (a bad one is logged and skipped)."""
        try:
            command = decode(payload)
        except BadCommand as exc:
            log.warning("control command skipped", extra={"error": str(exc), "bytes": len(payload)})
            return
        clients = self.hub.clients
        if isinstance(command, Disconnect):
            targets = clients.of_user(command.user)
            for client in targets:
                client.ws.close(command.code, command.reason)
        elif isinstance(command, Subscribe | Unsubscribe):
            targets = clients.of_user(command.user)
            for client in targets:
                self.hub.protocol.by_server(client, command)
        elif isinstance(command, RevokeToken):
            self.hub.revocations.apply_token(command.jti, command.lapse)
            targets = clients.of_token(command.jti)
            self._close_revoked(targets)
        else:
            self.hub.revocations.apply_user(command.user, command.issued_before)
            targets = [client for client in clients.of_user(command.user)
                       if self.hub.revocations.revoked(client.identity)]
            self._close_revoked(targets)
        log.info("control command applied", extra={"command": name_of(command), "sockets": len(targets),
                                                    "user": getattr(command, "user", None)})

    def close_revoked(self) -> int:
        """Close every client whose token the (just reloaded) copy revokes; returns how many.
        A walk over all clients, made only when the pub/sub link reconnects: revocations
        published while it was down were missed."""
        targets = [client for client in list(self.hub.clients.values())
                   if self.hub.revocations.revoked(client.identity)]
        self._close_revoked(targets)
        return len(targets)

    @staticmethod
    def _close_revoked(clients) -> None:
        for client in clients:
            client.ws.close(REVOKED_CODE, REVOKED_REASON)
