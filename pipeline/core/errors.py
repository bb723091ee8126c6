"""One exception hierarchy for Herald: callers catch `HeraldError` or a branch of it."""


class HeraldError(Exception):
    """Base of every error Herald raises on purpose."""


class ConfigError(HeraldError):
    """The environment does not describe a runnable configuration."""


class StartupError(HeraldError):
    """A service Herald needs answers wrongly, or not at all, at start: the process stops."""


class ValidationError(HeraldError):
    """Input that can never be accepted; `errors` lists field problems."""

    def __init__(self, detail, errors=None, *, status=422, title="Invalid message"):
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []
        self.status = status
        self.title = title


class TransientError(HeraldError):
    """A failure worth retrying: a service is down or busy."""


class KafkaUnavailable(TransientError):
    """Kafka did not acknowledge a record in time; nothing was accepted."""


class PermanentError(HeraldError):
    """A message no retry can fix: it goes straight to the dead-letter topic."""


class TopicError(HeraldError):
    """Herald's topics are missing, or exist in a shape the settings do not ask for."""
