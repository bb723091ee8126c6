"""Herald's Redis key schema: every key and pub/sub channel name is built here, and
the one pub/sub payload format that is not a bare frame.

Keys named after user input (a channel, a message id, a user, an address)
are `<prefix>:<kind>:<name>`. Herald's own fixed keys are `<prefix>:_:<name>`:
no kind is `_`, so no channel or message id can name one of them (a message
id `index` once overwrote the dead-letter index; docs/design.md: "Redis keys").

On a Redis Cluster the channel part of a channel's keys and pub/sub channels
is a hash tag, `<prefix>:<kind>:{<channel>}`, so every key one delivery
script touches lives in one slot; the dedupe marker, which that script reads,
is `<prefix>:done:{<channel>}:<id>` there. Channel names cannot hold braces,
so the tag is the whole channel. On a single Redis the names stay as they
were: a running deployment keeps its gates and history across an upgrade.

A message's keys are named by its global id (pipeline/core/ids.py: a client's id
scoped to its sender), never by an id as a client sent it. Each kind holds
one sort of name: the markers of a rule's effects (an alert, a routed copy)
have a kind of their own, `effect`, apart from the messages' dedupe markers
(`done`): a message id `X:alerts:alerts:rules` was once exactly the marker of
message X's alert, and cancelled it.
"""

from __future__ import annotations

from pipeline.core.messages import parse_origin

# A routed pub/sub payload is "<head>\n<frame>": on a channel's message
# channel the head is the message's stream id (the hub drops what a resumed
# client already has), empty for an ephemeral message, which has none; on a
# node channel the client the frame is for. The Lua scripts write it too:
# they are given this separator (pipeline/store/scripts.py).
ROUTE_SEPARATOR = "\n"


def routed(head: str, frame: str) -> str:
    """A routed payload of `frame` under `head`."""
    return f"{head}{ROUTE_SEPARATOR}{frame}"


def split_routed(payload: str) -> tuple[str, str]:
    """A routed payload's (head, frame)."""
    head, _, frame = payload.partition(ROUTE_SEPARATOR)
    return head, frame


class Keys:
    """Key and pub/sub channel names under one prefix."""

    def __init__(self, prefix: str, cluster: bool = False):
        self.prefix = prefix
        self.cluster = cluster

    def _user(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    def _channel(self, kind: str, channel: str) -> str:
        return self._user(kind, f"{{{channel}}}" if self.cluster else channel)

    def _own(self, name: str) -> str:
        return f"{self.prefix}:_:{name}"

    # -- per channel -------------------------------------------------------
    def history(self, channel: str) -> str:
        """The channel's history stream."""
        return self._channel("hist", channel)

    def epoch(self, channel: str) -> str:
        """The id of the first entry the channel's history ever had."""
        return self._channel("epoch", channel)

    def gate(self, channel: str) -> str:
        """The highest Kafka offset of the channel that has been handled (the order gate)."""
        return self._channel("last", channel)

    def waiting(self, channel: str) -> str:
        """The offsets of the channel's records parked at its order gate, scored by when each
        was first parked."""
        return self._channel("waiting", channel)

    def parked(self, channel: str) -> str:
        """The channel's parked records (hash: the offset each waits for -> the record)."""
        return self._channel("parked", channel)

    def presence(self, channel: str) -> str:
        """Hash of the clients present in the channel."""
        return self._channel("presence", channel)

    # -- per message -------------------------------------------------------
    def message(self, msg_id: str) -> str:
        """Hash of a message's status (and, once a worker took it, its content) by global id."""
        return self._user("msg", msg_id)

    def done(self, msg_id: str, channel: str | None = None) -> str:
        """Dedupe marker: the message was delivered (holds its stream id); on a
        cluster it is kept in the slot of the channel it was delivered to."""
        if self.cluster:
            return self._user("done", f"{{{channel}}}:{msg_id}")
        return self._user("done", msg_id)

    def effect(self, effect: str, msg_id: str, target: str) -> str:
        """Marker of a rule effect (`alerts`, `route`) of a message on a target channel, in
        that channel's slot on a cluster. '/' is in no channel, effect or message id: no
        two (target, effect, message) name one marker."""
        return self._channel("effect", target) + f"/{effect}/{msg_id}"

    def cached(self, msg_id: str) -> str:
        """An archived message's cache entry (on HERALD_CACHE_URL, which may evict it)."""
        return self._user("cache", msg_id)

    def fill_lock(self, msg_id: str) -> str:
        """The single-flight lock of the one read that fills a message's cache entry."""
        return self._user("fill", msg_id)

    def idempotency(self, msg_id: str) -> str:
        """The first publish of an id: its sender and answer."""
        return self._user("idem", msg_id)

    def dead_letter(self, letter_id: str) -> str:
        """A dead letter's entry."""
        return self._user("dlq", letter_id)

    def task_runs(self, task_id: str) -> str:
        """How many times a Celery task started."""
        return self._user("runs", task_id)

    def rate(self, rule: str, by: str, value: str) -> str:
        """Sorted set of the message ids a `rate` condition counted in its window ('/' is in no
        rule id, so a rule's windows and another's never share a name)."""
        return self._user("rate", f"{rule}/{by}/{value}")

    # -- connections and nodes ---------------------------------------------
    def user_connections(self, user: str) -> str:
        """Open WebSockets of a user, across web processes."""
        return self._user("wsuser", user)

    def address_connections(self, address: str) -> str:
        """Open WebSockets from an address, across web processes."""
        return self._user("wsaddr", address)

    def node(self, node: str) -> str:
        """A web process's liveness flag."""
        return self._user("node", node)

    def node_presence(self, node: str) -> str:
        """Set of the presence entries a web process wrote, each `[channel, client, user]` in
        JSON: once the process died, the reaper reads these, not whole channels."""
        return self._user("nodepresence", node)

    def worker(self, hostname: str) -> str:
        """A Celery worker's liveness flag (on the broker's Redis)."""
        return self._user("worker", hostname)

    def worker_deliveries(self, hostname: str) -> str:
        """Set of the broker delivery tags a worker took and has not finished."""
        return self._user("deliveries", hostname)

    # -- Herald's own ------------------------------------------------------
    @property
    def dead_letter_index(self) -> str:
        """Sorted set of dead-letter ids by failure time."""
        return self._own("dlq-index")

    @property
    def in_flight_index(self) -> str:
        """Sorted set of dispatched, unfinished message ids by dispatch time."""
        return self._own("inflight-index")

    @property
    def in_flight_envelopes(self) -> str:
        """Hash of the dispatched, unfinished envelopes by id."""
        return self._own("inflight-envelopes")

    @property
    def queued(self) -> str:
        """Sorted set of the ids of messages the bridge dispatched and no worker took off the
        Celery broker yet, by dispatch time (seconds since the epoch)."""
        return self._own("queued")

    @property
    def taken(self) -> str:
        """Sorted set of one member, `mark`: the latest dispatch time of a bridge task a worker took."""
        return self._own("taken")

    @property
    def nodes(self) -> str:
        """Sorted set of web processes (hub nodes) by their last heartbeat's time."""
        return self._own("nodes")

    @property
    def presence_nodes(self) -> str:
        """Set of the web processes that have presence entries (a `node_presence` set)."""
        return self._own("presence-nodes")

    @property
    def workers(self) -> str:
        """Set of the Celery workers that registered (on the broker's Redis)."""
        return self._own("workers")

    # The Bloom filter's two keys share a hash tag: the script that adds ids
    # writes both, and a rebuild renames one onto the other.
    @property
    def bloom(self) -> str:
        """The Bloom filter of archived message ids (a bitmap; bit 0 set once it was built)."""
        return self._own("{bloom}")

    @property
    def bloom_next(self) -> str:
        """The Bloom filter being rebuilt, renamed onto `bloom` when complete."""
        return self._own("{bloom}:next")

    @property
    def archive_pruner(self) -> str:
        """Lock of the web process pruning the archive this period."""
        return self._own("archive-pruner")

    @property
    def rules(self) -> str:
        """Hash of the rule set in force: its `version` and its `doc` (normalised JSON)."""
        return self._own("rules")

    @property
    def rules_notice(self) -> str:
        """Pub/sub channel announcing a new rule set version to the workers."""
        return self._own("rules-notice")

    @property
    def presence_reaper(self) -> str:
        """Lock of the web process reaping presence this period."""
        return self._own("presence-reaper")

    # -- events: occupancy and the webhook outbox ---------------------------
    # Every key an event script touches shares the hash tag `{events}`: one
    # script decides a transition (a channel's first subscriber, a user's last
    # leave) and appends its event in order, atomically, on a cluster too.
    @property
    def events(self) -> str:
        """The stream of webhook events, oldest first, read by each receiver from its cursor."""
        return self._own("{events}:stream")

    def webhook_cursor(self, receiver: str) -> str:
        """The id of the last event of `events` a receiver (by its name) was sent or dead-lettered."""
        return self._own(f"{{events}}:cursor:{receiver}")

    def webhook_lease(self, receiver: str) -> str:
        """The lease of the one delivery task that sends a receiver's events."""
        return self._own(f"{{events}}:lease:{receiver}")

    def webhook_dead_letters(self, receiver: str) -> str:
        """A receiver's dead-lettered batches of events."""
        return self._own(f"{{events}}:dlq:{receiver}")

    @property
    def subscribers(self) -> str:
        """Hash of each channel with subscribers -> how many subscriptions it has, cluster-wide."""
        return self._own("{events}:subscribers")

    @property
    def active_channels(self) -> str:
        """Sorted set (all scores 0) of the channels with subscribers, for listing by prefix."""
        return self._own("{events}:channels")

    @property
    def channel_users(self) -> str:
        """Hash of each channel with subscribers -> how many distinct users they are."""
        return self._own("{events}:users")

    @property
    def members(self) -> str:
        """Hash of `[channel, user]` (JSON) -> that user's subscriptions to that channel."""
        return self._own("{events}:members")

    @property
    def leaving(self) -> str:
        """Sorted set of the leaves waiting out HERALD_PRESENCE_GRACE, by when they are due."""
        return self._own("{events}:leaving")

    def node_subscriptions(self, node: str) -> str:
        """Hash of `[channel, user]` (JSON) -> a web process's subscriptions: once it died,
        the reaper takes them off the counts."""
        return self._own(f"{{events}}:node:{node}")

    @property
    def subscription_nodes(self) -> str:
        """Set of the web processes that have a `node_subscriptions` hash."""
        return self._own("{events}:nodes")

    # -- tokens ----------------------------------------------------------------
    @property
    def revoked_tokens(self) -> str:
        """Sorted set of revoked token ids (`jti`) by when their revocation lapses."""
        return self._own("revoked-jti")

    @property
    def revoked_users(self) -> str:
        """Hash of user -> the time (seconds) before which that user's tokens are revoked."""
        return self._own("revoked-users")

    # -- pub/sub channels (a namespace apart from keys) ----------------------
    def message_channel(self, channel: str) -> str:
        """Pub/sub channel carrying a channel's `message` frames."""
        return self._channel("m", channel)

    def status_channel(self, channel: str) -> str:
        """Pub/sub channel carrying a channel's `status` frames."""
        return self._channel("s", channel)

    def presence_channel(self, channel: str) -> str:
        """Pub/sub channel carrying a channel's `join`/`leave` frames."""
        return self._channel("p", channel)

    @property
    def control_channel(self) -> str:
        """Pub/sub channel every web process hears: the server API's commands (disconnect a
        user, subscribe a user, a revocation)."""
        return self._own("control")

    def node_channel(self, node: str) -> str:
        """Pub/sub channel of one web process, for frames meant for one of its clients."""
        return self._user("n", node)

    def origin_route(self, origin: str | None) -> tuple[str, str]:
        """(node pub/sub channel, client) of a publisher's origin "node/client", or ('', '')
        when it has none: where the frames meant for that client go."""
        node, client = parse_origin(origin)
        return (self.node_channel(node) if node else ""), client
