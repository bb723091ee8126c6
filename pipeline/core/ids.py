"""The message id space (docs/design.md: "Message ids").

A message's *global id* names its state everywhere inside Herald (status,
dedupe marker, idempotency claim, in-flight entry, archive row, dead letter):
- an id Herald minted (a ULID: 26 upper-case Crockford characters) is its own
  global id;
- an id a client chose is scoped to its sender (the token's `sub`):
  `<scope>.<id>`, the scope being 12 lower-case base32 characters of the
  SHA-256 of the sender. No client id can name another sender's message (its
  own is scoped too), nor a minted one (those have no '.').

Clients see the id they sent (frames, answers); the global id is the answer's
`global_id`. Scoping is what keeps one sender from squatting another's id, or
from probing whether another sender used an id.
"""

from __future__ import annotations

import base64
import hashlib
import re

from pipeline.core.messages import ID_RE

SCOPE_LENGTH = 12  # 60 bits: two senders share a scope by chance once in ~10^18 pairs
_SCOPE_RE = re.compile(f"[a-z2-7]{{{SCOPE_LENGTH}}}")
# A global id is a message id (ID_RE: at most 128 characters), scope and '.' included.
MAX_CLIENT_ID = 128 - SCOPE_LENGTH - 1


def scope(sender: str) -> str:
    """The sender's scope: 12 lower-case base32 characters of SHA-256 of its UTF-8."""
    digest = hashlib.sha256(sender.encode("utf-8", "surrogatepass")).digest()
    return base64.b32encode(digest).decode()[:SCOPE_LENGTH].lower()


def scoped(sender: str, client_id: str) -> str:
    """The global id of the id `client_id` that `sender` chose (at most MAX_CLIENT_ID characters)."""
    return f"{scope(sender)}.{client_id}"


def client_id(global_id: str) -> str:
    """The id as its sender sent it: the global id without its scope (a minted id as it is)."""
    if len(global_id) > SCOPE_LENGTH + 1 and global_id[SCOPE_LENGTH] == "." \
            and _SCOPE_RE.fullmatch(global_id, 0, SCOPE_LENGTH):
        return global_id[SCOPE_LENGTH + 1:]
    return global_id


def candidates(sender: str, msg_id: str) -> list[str]:
    """The global ids `msg_id` may name for a reader: `sender`'s own message of that id first,
    then `msg_id` as a global id (a minted id, another sender's `global_id`)."""
    if len(msg_id) <= MAX_CLIENT_ID and ID_RE.fullmatch(msg_id):
        return [scoped(sender, msg_id), msg_id]
    return [msg_id]
