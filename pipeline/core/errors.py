"""Herald's exceptions: every error Herald raises on purpose is a `HeraldError`.

They say what went wrong in the domain's terms, never how a transport answers
it: web/problems.py maps them to HTTP problems, web/hub/protocol.py to
WebSocket error codes. Errors a module keeps to itself may be defined there,
as a subclass of one of these.
"""

from __future__ import annotations


class HeraldError(Exception):
    """Base of every error Herald raises on purpose."""


class ConfigError(HeraldError):
    """The environment does not describe a runnable configuration."""


class StartupError(HeraldError):
    """A service Herald needs answers wrongly, or not at all, at start: the process stops."""


class TopicError(HeraldError):
    """Herald's topics are missing, or exist in a shape the settings do not ask for."""


# -- what a caller sent or may do -----------------------------------------------
class Refused(HeraldError):
    """A request or op refused for what it asks or who asks it: no retry changes the answer.
    `detail` says why; `errors` lists field problems (`{field, problem}`)."""

    def __init__(self, detail: str, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


class InvalidInput(Refused):
    """A message, or a request's body, whose fields break the contract."""


class InvalidRequest(InvalidInput):
    """A request's path, query or headers break the contract."""


class InvalidRuleSet(InvalidInput):
    """A rule set that cannot be used; each fault is a field problem named by its path."""


class DataOutOfBounds(InvalidInput):
    """A message's data nests too deep or holds an integer past 64 bits."""


class Unencodable(InvalidInput):
    """A message's data cannot be written as UTF-8 JSON (a lone surrogate, NaN, an infinity)."""


class Malformed(InvalidInput):
    """A body that is not JSON at all."""


class Forbidden(Refused):
    """The caller's token does not allow this."""


class TooLarge(Refused):
    """A message or body larger than Herald's limit."""


class TooLargeForKafka(TooLarge):
    """A message within Herald's limit that Kafka's broker refuses as too large."""


class UnsupportedMedia(Refused):
    """A body in a media type the request does not take."""


# -- services -------------------------------------------------------------------
class TransientError(HeraldError):
    """A failure worth retrying: a service is down or busy."""


class KafkaUnavailable(TransientError):
    """Kafka did not acknowledge a record in time; nothing was accepted."""


class RedisUnavailable(TransientError):
    """Redis did not answer; what needed it did not happen."""


class IdempotencyConflict(TransientError):
    """The same message id is being published by another request right now."""


class PermanentError(HeraldError):
    """A message no retry can fix: it goes straight to the dead-letter topic."""
