"""The key schema: user input never names one of Herald's own keys (README: "Redis keys")."""

from __future__ import annotations

from pipeline.keys import Keys


def test_no_user_named_key_is_one_of_heralds_own():
    keys = Keys("herald")
    own = {keys.dead_letter_index, keys.in_flight_index, keys.in_flight_envelopes, keys.presence_channels,
           keys.presence_reaper}
    names = ["index", "channels", "reaper", "dlq-index", "inflight-index", "inflight-envelopes",
             "presence-channels", "presence-reaper", "_", "_:dlq-index"]
    named = set()
    for name in names:
        for build in (keys.history, keys.epoch, keys.gate, keys.waiting, keys.presence, keys.message, keys.done,
                      keys.idempotency, keys.dead_letter, keys.task_runs, keys.user_connections,
                      keys.address_connections, keys.node):
            named.add(build(name))
    assert not own & named
