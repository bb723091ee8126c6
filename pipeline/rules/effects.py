"""What a rules decision adds to delivery: alerts and routed copies, as message frames
bound for other channels (`Emission`s), which the store writes once each.

A decision is the record the rules left on an envelope (`Envelope.rules`):
`alert` (the rules that alert), `block` (the rule that blocked it), `route`
((rule, target channel) pairs) and `matched`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import replace

from pipeline.core.frames import Emission, alert_frame_heads, message_frame_head
from pipeline.core.messages import Envelope


def emissions(envelopes: Iterable[Envelope], passed: Sequence[bool], alert_channel: str) -> list[Emission]:
    """The alerts (on `alert_channel`) and routed copies of the envelopes that passed their
    order gate (`passed`, in the same order), whatever their outcome: a duplicate or
    skipped record may be the second run of a task whose worker died before its effects
    were written; each emission is written at most once."""
    out: list[Emission] = []
    for envelope, gone_through in zip(envelopes, passed):
        decision = envelope.rules
        if not gone_through or not decision or not ("alert" in decision or "route" in decision):
            continue
        if "alert" in decision:
            out.append(Emission(alert_channel, "alerts", envelope.id, alert_frame_heads(
                alert_channel, envelope, decision["alert"], blocked_by=decision.get("block"),
                matched=decision.get("matched", []), ts=int(time.time() * 1000))))
        if not decision.get("block"):
            for _rule, target in decision.get("route", ()):
                out.append(Emission(target, "route", envelope.id,
                                    [message_frame_head(replace(envelope, channel=target))]))
    return out
