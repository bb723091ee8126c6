"""The server API's reads of occupancy (admin token; docs/occupancy.md): the active channels
by prefix with their subscriber counts, paged, and one channel's counts without its members.

Both read the counts the hub keeps (pipeline/store/occupancy.py): a page is one
ZRANGEBYLEX of at most `limit` names and two HMGETs, a channel's counts two
hash fields, whatever the number of channels or subscribers.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from pipeline.store.occupancy import MAX_PAGE
from web.api import api_blueprint, contract, services
from web.openapi import STANDARD, Answer
from web.schemas import ChannelPath

blueprint = api_blueprint("channels")


def encode_cursor(channel: str) -> str:
    """The opaque cursor of a page ending at `channel`: its name in hex."""
    return channel.encode().hex()


def decode_cursor(cursor: str) -> bytes:
    """The position a cursor stands for: any bytes are a place in the names' order, so
    every cursor the pattern lets in continues a listing (ValueError for one that is not hex)."""
    return bytes.fromhex(cursor)


class ChannelsQuery(BaseModel):
    """Paging through the active channels by prefix."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prefix: Annotated[str, Field(max_length=200, pattern=r"^[A-Za-z0-9_:.@-]*$",
                                 description="only channels whose names start with it")] = ""
    cursor: Annotated[str | None, Field(None, pattern=r"^(?:[0-9a-f]{2}){1,200}$",
                                        description="the `next` of the page before; none for the first")] = None
    limit: Annotated[int, Field(ge=1, le=MAX_PAGE, description="channels a page holds at most")] = 100


class ChannelOccupancy(BaseModel):
    """A channel's subscriber counts now, across every web process."""

    channel: str
    subscribers: int = Field(description="subscriptions to the channel (a socket subscribed once counts once)")
    users: int = Field(description="distinct users among them")


class ChannelsPage(BaseModel):
    """A page of the channels with subscribers, in name order."""

    channels: list[ChannelOccupancy]
    next: str | None = Field(description="the cursor of the next page; null after the last")


@contract.operation(blueprint, "GET", "/channels", summary="Channels with subscribers, by prefix (admin token)",
                    auth="admin", query=ChannelsQuery,
                    description="In name order, with each channel's subscriptions and distinct users across "
                                "every web process. `next` continues the listing; a channel that gains or "
                                "loses its subscribers meanwhile may be in it or not.",
                    answers={200: Answer("A page", ChannelsPage),
                             503: Answer(STANDARD[503], headers=("Retry-After",))}, tags=("channels",))
def channels_list(identity, query: ChannelsQuery):
    after = decode_cursor(query.cursor) if query.cursor is not None else None
    channels, last = services().store.occupancy.page(query.prefix, after, query.limit)
    return {"channels": channels, "next": encode_cursor(last) if last is not None else None}


@contract.operation(blueprint, "GET", "/channels/<channel>/occupancy",
                    summary="A channel's subscriber counts, without its members (admin token)", auth="admin",
                    path=ChannelPath,
                    answers={200: Answer("The counts (0 for a channel nobody is subscribed to)", ChannelOccupancy),
                             503: Answer(STANDARD[503], headers=("Retry-After",))}, tags=("channels",))
def channel_occupancy(identity, path: ChannelPath):
    subscribers, users = services().store.occupancy.counts(path.channel)
    return {"channel": path.channel, "subscribers": subscribers, "users": users}
