"""The hub's byte bounds as settings (docs/protocol.md: "WebSocket limits")."""

from __future__ import annotations

import pytest

from pipeline.core.errors import ConfigError
from pipeline.core.settings import Settings

BASE = {"HERALD_SECRET_KEY": "s" * 32}


def test_the_send_queue_and_page_bounds_default_to_8_mib_and_1_mib():
    settings = Settings.from_env(BASE)
    assert (settings.send_queue_bytes, settings.history_page_bytes) == (8 << 20, 1 << 20)


def test_a_send_queue_smaller_than_two_pages_is_refused_in_one_sentence():
    with pytest.raises(ConfigError, match="HERALD_SEND_QUEUE_BYTES .* at least twice HERALD_HISTORY_PAGE_BYTES"):
        Settings.from_env({**BASE, "HERALD_SEND_QUEUE_BYTES": str(1 << 20)})
    assert Settings.from_env({**BASE, "HERALD_SEND_QUEUE_BYTES": str(1 << 20),
                              "HERALD_HISTORY_PAGE_BYTES": str(256 << 10)}).send_queue_bytes == 1 << 20
