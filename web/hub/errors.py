"""The hub's refusals and the one table that turns each into a WebSocket error code.

docs/protocol.md ("WebSocket close codes and errors") lists the codes; an
HTTP problem title changes none of them.
"""

from __future__ import annotations

from pipeline.core.errors import (
    DataOutOfBounds,
    Forbidden,
    HeraldError,
    InvalidInput,
    Refused,
    TooLarge,
    TooLargeForKafka,
    TransientError,
    Unencodable,
)
from web.authorize import AuthorizeUnavailable
from web.hub import frames


class Unavailable(TransientError):
    """Redis or Kafka failed an op: answered `unavailable` (worth retrying), never counted as a bad frame.
    Its text is what the client is told; the failure's own text is logged."""


class BadFrame(InvalidInput):
    """A frame that is not an op this hub takes, or not in the shape of its op."""


class BadChannel(InvalidInput):
    """A frame whose channel is not a channel name."""


class TooManySubscriptions(Refused):
    """A subscribe past HERALD_WS_MAX_SUBSCRIPTIONS."""


# The one place an exception type becomes a WebSocket error code: the most
# specific entry of its type wins (as `except` clauses would). The codes are
# the protocol's (frames.ErrorCode): an HTTP title changes none of them.
ERROR_CODES: dict[type[HeraldError], frames.ErrorCode] = {
    Unavailable: "unavailable",
    AuthorizeUnavailable: "unavailable",
    Refused: "bad_frame",
    BadFrame: "bad_frame",
    BadChannel: "bad_channel",
    InvalidInput: "invalid_message",
    DataOutOfBounds: "data_out_of_bounds",
    Unencodable: "unencodable_data",
    Forbidden: "forbidden",
    TooManySubscriptions: "too_many_subscriptions",
    TooLarge: "payload_too_large",
    TooLargeForKafka: "message_too_large",
}


def error_code(exc: Unavailable | AuthorizeUnavailable | Refused) -> frames.ErrorCode:
    """The code of the `error` frame answering `exc`."""
    for kind in type(exc).__mro__:
        code = ERROR_CODES.get(kind)
        if code is not None:
            return code
    raise LookupError(f"no WebSocket error code for {type(exc).__name__}")
