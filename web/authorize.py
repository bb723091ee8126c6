"""Who may subscribe to or publish on a channel: the token's globs first, then, for what
they do not allow, the deployment's own endpoint (HERALD_AUTHORIZE_URL; docs/guide.md:
"Permissions from your backend")."""

from __future__ import annotations

from web.auth import Identity

SUBSCRIBE, PUBLISH = "subscribe", "publish"


class Permissions:
    """Decides an identity's right to an operation (SUBSCRIBE or PUBLISH) on a channel."""

    def __init__(self, settings):
        self.settings = settings

    def allows(self, identity: Identity, op: str, channel: str) -> bool:
        """True when the token's globs allow `op` on `channel`."""
        return identity.may_publish(channel) if op == PUBLISH else identity.may_subscribe(channel)
