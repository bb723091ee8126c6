"""Rule effects in history: frames appended to a target channel's history and published,
once per source message and target (emit.lua). What the frames are is decided
by the rules (pipeline/rules/effects.py); this only writes them."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from pipeline.core.frames import MESSAGE_TAIL, Emission
from pipeline.core.settings import Settings
from pipeline.store.gate import oldest_kept
from pipeline.store.keys import ROUTE_SEPARATOR, Keys
from pipeline.store.scripts import Call, Runner, Script


class EmitKeys(NamedTuple):
    history: str  # the target channel's history stream
    epoch: str  # its history's first id ever
    message_channel: str  # its message pub/sub channel
    markers: list[str]  # one per source message (Keys.effect)


class EmitArgs(NamedTuple):
    marker_ttl: int
    maxlen: int  # history's most entries
    idle_ttl: int  # seconds an idle channel's keys live
    publish: str  # PUBLISH, or SPUBLISH on a cluster
    oldest: str  # the oldest history id to keep, '' for no age limit
    frame_tail: str  # what closes a message frame after its offset
    frames: list[Any]  # per marker: how many frames it guards, then their heads


EMIT = Script("emit.lua", EmitKeys, EmitArgs, batched=True, constants={"SEPARATOR": ROUTE_SEPARATOR})


class Effects:
    """Writes rule effects into the target channels' histories."""

    def __init__(self, runner: Runner, keys: Keys, settings: Settings) -> None:
        self.runner = runner
        self.keys = keys
        self.settings = settings

    def emit(self, emissions: list[Emission]) -> None:
        """Append and publish each emission's frames unless its marker says they were
        already; one call per target channel, all in one round trip."""
        by_channel: dict[str, tuple[list[str], list[Any]]] = {}  # target: (markers, [count, heads...] each)
        for emission in emissions:
            markers, frames = by_channel.setdefault(emission.channel, ([], []))
            markers.append(self.keys.effect(emission.kind, emission.msg_id, emission.channel))
            frames += [len(emission.heads), *emission.heads]
        if by_channel:
            self.runner.run([self._call(channel, markers, frames) for channel, (markers, frames) in by_channel.items()])

    def _call(self, channel: str, markers: list[str], frames: list[Any]) -> Call:
        return EMIT(EmitKeys(self.keys.history(channel), self.keys.epoch(channel), self.keys.message_channel(channel),
                             markers),
                    EmitArgs(self.settings.status_ttl, self.settings.retention(channel)[0],
                             self.settings.channel_idle_ttl, self.runner.publish_command,
                             oldest_kept(self.settings, channel, time.time()), MESSAGE_TAIL, frames))
