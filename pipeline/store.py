"""Herald's Redis state: message status, channel history, dedupe, idempotency and fan-out.

Every change that must happen at most once (delivering a message, moving its
status forward) is one Lua script, so a task that runs twice, or two workers
racing, cannot deliver twice or move a status backwards.
"""

from __future__ import annotations

import collections
import json
import re
import time
from urllib.parse import urlsplit, urlunsplit

import redis

from pipeline.errors import StartupError
from pipeline.keys import Keys
from pipeline.messages import Envelope, decode, encode
from pipeline.redis_tls import redis_tls

STATUS_RANK = {"accepted": 1, "processing": 2, "delivered": 3, "failed": 3, "rejected": 3}

# KEYS: msg hash, status pub/sub channel. ARGV: status, rank, ttl, status frame,
# origin pub/sub channel or '', origin client, force ('1' lets a replay restart
# a finished message), then field/value pairs to store.
_SET_STATUS = """
local current = redis.call('HGET', KEYS[1], 'status')
local rank = {accepted=1, processing=2, delivered=3, failed=3, rejected=3}
local new = tonumber(ARGV[2])
if current and ARGV[7] ~= '1' and (rank[current] or 0) >= new then
  if ARGV[1] == 'processing' and current == 'processing' then
    redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  end
  return current
end
if #ARGV > 7 then redis.call('HSET', KEYS[1], unpack(ARGV, 8)) end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
if ARGV[1] == 'processing' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
if ARGV[4] ~= '' then
  redis.call('PUBLISH', KEYS[2], ARGV[4])
  if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6] .. '\\n' .. ARGV[4]) end
end
return ARGV[1]
"""

# Every record of a channel passes this gate in Kafka order, whatever its
# outcome: delivered, a duplicate of a message already handled (a retried POST
# writes a second record under the same id), or skipped (dead-lettered,
# rejected). A record waits until the gate reached its channel's previous
# offset, then moves the gate to its own (README: "Order"). A forced record
# (its wait ran out) passes without its predecessor only when that one is
# not itself waiting in line (recently seen in the waiting set): so records
# forced together still pass one after the other, in order.
# KEYS: done marker, order gate, history stream, msg hash, message pub/sub
# channel, status pub/sub channel, history epoch, in-flight index, in-flight
# envelopes, waiting set (offsets scored by when they last waited).
# ARGV: kafka offset, previous offset of the channel or '', status ttl, history
# maxlen, message frame head, status frame, origin channel or '', origin client,
# force ('1' once the order wait ran out), message id, oldest id to keep ('' = no
# age limit), channel idle ttl, '1' to skip (let the gate pass without delivering),
# now (seconds), seconds after which a waiting record counts as stuck.
_PASS = """
local offset = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[2]) or '-1')
local forced = '0'
if ARGV[2] ~= '' and last < tonumber(ARGV[2]) then
  local now = tonumber(ARGV[14])
  local queued = false
  if ARGV[9] == '1' then
    local seen = redis.call('ZSCORE', KEYS[10], ARGV[2])
    queued = seen and tonumber(seen) > now - tonumber(ARGV[15])
  end
  if ARGV[9] ~= '1' or queued then
    redis.call('ZADD', KEYS[10], now, ARGV[1])
    redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', now - tonumber(ARGV[12]))
    redis.call('EXPIRE', KEYS[10], ARGV[12])
    return {'wait', '', '0'}
  end
  forced = '1'
end
redis.call('ZREM', KEYS[10], ARGV[1])
if offset > last then redis.call('SET', KEYS[2], offset, 'EX', ARGV[12]) end
redis.call('ZREM', KEYS[8], ARGV[10])
redis.call('HDEL', KEYS[9], ARGV[10])
local done = redis.call('GET', KEYS[1])
if done then return {'duplicate', done, forced} end
if ARGV[13] == '1' then return {'skipped', '', forced} end
local sid = redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[4], '*', 'f', ARGV[5])
if ARGV[11] ~= '' then redis.call('XTRIM', KEYS[3], 'MINID', ARGV[11]) end
-- An idle channel's keys expire (a message to each of many new channels
-- must not hold Redis memory for ever).
redis.call('EXPIRE', KEYS[3], ARGV[12])
redis.call('SET', KEYS[7], sid, 'NX')
redis.call('EXPIRE', KEYS[7], ARGV[12])
redis.call('SET', KEYS[1], sid, 'EX', ARGV[3])
redis.call('HSET', KEYS[4], 'status', 'delivered', 'stream_id', sid)
redis.call('EXPIRE', KEYS[4], ARGV[3])
redis.call('PUBLISH', KEYS[5], sid .. '\\n' .. ARGV[5] .. sid .. '"}')
redis.call('PUBLISH', KEYS[6], ARGV[6])
if ARGV[7] ~= '' then redis.call('PUBLISH', ARGV[7], ARGV[8] .. '\\n' .. ARGV[6]) end
return {'delivered', sid, forced}
"""

# The first publish of a message id claims it. KEYS: claim. ARGV: pending
# value, its ttl. Returns nothing when claimed, else the value there.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return false end
return redis.call('GET', KEYS[1])
"""

# KEYS: claim. ARGV: the value this request claimed it with. Only the owner
# lets go of a claim (a second item with the same id once deleted the first's).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# Open WebSockets per user and per address, counted across every web process:
# sorted sets of "node/client" scored by when the entry lapses, so the
# connections of a process that died stop counting after the presence TTL.
# KEYS: user set, address set; ARGV: member, now, lapse, user cap, address cap.
_CLAIM_CONNECTION = """
local now = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 'user' end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return 'address' end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('PEXPIREAT', KEYS[1], math.floor(tonumber(ARGV[3]) * 1000))
redis.call('PEXPIREAT', KEYS[2], math.floor(tonumber(ARGV[3]) * 1000))
return false
"""


def connect(settings, pool_size: int = 4, *, url: str | None = None) -> redis.Redis:
    """A client of the main Redis (or of `url`), with bounded timeouts, so an
    outage fails fast instead of hanging, and TLS as configured for `rediss://`.

    Its pool blocks for a free connection (up to 5 s) when `pool_size` are in
    use: a burst of thousands of WebSocket subscribes waits its turn instead
    of failing with "Too many connections". Long-lived services pass
    `HERALD_REDIS_POOL_SIZE`; the small default suits one-off clients.
    """
    address, tls = redis_tls(url or settings.redis_url, settings)
    pool = redis.BlockingConnectionPool.from_url(
        address,
        max_connections=pool_size,
        timeout=5,
        decode_responses=True,
        socket_timeout=5,
        socket_connect_timeout=3,
        health_check_interval=15,
        **tls,
    )
    return redis.Redis(connection_pool=pool)


def check_at_start(settings) -> str | None:
    """Refuse to run on a Redis that does not answer or may evict Herald's keys.

    Pings the main Redis and a Redis Celery broker, so a wrong address or
    certificate stops the process in one line rather than in a retry loop.
    Then reads the main Redis' `maxmemory-policy`: any policy but `noeviction`
    may evict dedupe markers and idempotency claims, and a message would then
    be delivered twice (README: "Redis: TLS and eviction"). Raises StartupError unless
    `HERALD_ALLOW_EVICTION` is on; returns a warning to show, if any.
    """
    client = _ping(settings, settings.redis_url)
    if settings.redis_broker and settings.celery_broker_url != settings.redis_url:
        _ping(settings, settings.celery_broker_url).close()
    try:
        policy = eviction_policy(client)
    finally:
        client.close()
    if policy is None:
        return (f"could not read the maxmemory-policy of Redis at {redacted(settings.redis_url)}: "
                "make sure it is noeviction")
    if policy == "noeviction":
        return None
    if settings.allow_eviction:
        return f"Redis maxmemory-policy is {policy}: running anyway (HERALD_ALLOW_EVICTION)"
    raise StartupError(f"Redis maxmemory-policy is {policy}, which can evict dedupe markers and idempotency "
                       "claims: set it to noeviction, or HERALD_ALLOW_EVICTION=1 to run anyway")


def eviction_policy(client: redis.Redis) -> str | None:
    """The server's `maxmemory-policy`, or None when it does not say.

    Managed Redis often refuses CONFIG; INFO's `maxmemory_policy` field says
    the same there.
    """
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
        if policy:
            return policy
    except redis.ResponseError:
        pass
    try:
        return client.info("memory").get("maxmemory_policy")
    except redis.ResponseError:
        return None


def redacted(url: str) -> str:
    """`url` without its password and query, fit for a log line."""
    parts = urlsplit(url)
    host = f"{parts.hostname}:{parts.port}" if parts.port else (parts.hostname or "")
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _ping(settings, url: str) -> redis.Redis:
    client = connect(settings, 1, url=url)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        # redis-py's messages are one line; an SSL failure names its cause.
        raise StartupError(f"Redis at {redacted(url)} does not answer: {exc}") from None
    return client


def message_frame_head(envelope: Envelope) -> str:
    """The SPEC's `message` frame without its closing offset, which XADD assigns."""
    frame = {"op": "message", "channel": envelope.channel, "id": envelope.id, "type": envelope.type,
             "data": envelope.data, "sender": envelope.sender, "ts": envelope.ts}
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)[:-1] + ',"offset":"'


def status_frame(envelope: Envelope, status: str) -> str:
    """The SPEC's `status` frame."""
    return json.dumps({"op": "status", "channel": envelope.channel, "id": envelope.id, "status": status},
                      separators=(",", ":"))


_STREAM_ID = re.compile(r"[0-9]{1,20}(?:-[0-9]{1,20})?\Z")


def valid_stream_id(value) -> bool:
    """An offset as Redis writes stream ids, 'ms-seq' or 'ms', each part below 2**64:
    anything else would make Redis refuse the history read."""
    if not isinstance(value, str) or not _STREAM_ID.match(value):
        return False
    ms, _, seq = value.partition("-")
    return int(ms) < 1 << 64 and int(seq or 0) < 1 << 64


def stream_id_key(sid: str) -> tuple[int, int]:
    """Orders stream ids ('ms-seq'); malformed ids sort first."""
    ms, _, seq = sid.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return -1, -1


class Store:
    """Typed access to Herald's keys under one prefix."""

    def __init__(self, client: redis.Redis, settings):
        self.redis = client
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self._set_status = client.register_script(_SET_STATUS)
        self._pass = client.register_script(_PASS)
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)
        self._claim_connection = client.register_script(_CLAIM_CONNECTION)

    def set_status(self, envelope: Envelope, status: str, *, fields=None, origin=None, force=False) -> str:
        """Move a message's status forward (never back) and push the change; returns the status now."""
        return self._set_status(**self._status_call(envelope, status, fields, origin, force))

    def _status_call(self, envelope, status, fields=None, origin=None, force=False) -> dict:
        flat = []
        for name, value in (fields or {}).items():
            flat += [name, value if isinstance(value, str) else json.dumps(value)]
        frame = status_frame(envelope, status) if status != "accepted" else ""
        node, client = _origin(self, origin)
        return {"keys": [self.keys.message(envelope.id), self.keys.status_channel(envelope.channel)],
                "args": [status, STATUS_RANK[status], self.settings.status_ttl, frame, node, client,
                         "1" if force else "0", *flat]}

    def record_accepted(self, accepted: list[tuple[Envelope, int, int]], answers: dict[str, str]) -> None:
        """Note records Kafka acknowledged, (envelope, partition, offset) each, unless a worker
        already moved them further, and keep the first answer of each claimed id (`answers`,
        id to value) for the status lifetime (24 h by default). One round trip for them all."""
        def queue(pipe):
            for envelope, partition, offset in accepted:
                _evalsha(pipe, self._set_status,
                         **self._status_call(envelope, "accepted", _message_fields(envelope, partition, offset)))
            for msg_id, value in answers.items():
                pipe.set(self.keys.idempotency(msg_id), value, ex=self.settings.status_ttl)

        self._pipelined(queue)

    def mark_processing(self, envelopes: list[Envelope]) -> list[str]:
        """Workers took these messages; returns each one's status now (a finished one stays finished)."""
        def queue(pipe):
            for envelope in envelopes:
                fields = _message_fields(envelope, _or(envelope.partition, ""), _or(envelope.offset, ""))
                _evalsha(pipe, self._set_status, **self._status_call(envelope, "processing", fields, envelope.origin))

        return self._pipelined(queue)

    def deliver(self, envelopes: list[Envelope], *, force: bool = False) -> list[tuple[str, str, str]]:
        """Pass each record through its channel's order gate, in order, and deliver it once.

        Returns per record ('delivered'|'duplicate'|'skipped'|'wait', stream id,
        '1' when it passed without its predecessor, else '0'): 'wait' while the
        channel's previous record is not handled; records flagged `skip`
        (dead-lettered, rejected) only move the gate on.
        One round trip for the batch.
        """
        now = time.time()

        def queue(pipe):
            for envelope in envelopes:
                channel, skipped = envelope.channel, envelope.skip
                node, client = _origin(self, envelope.origin)
                maxlen, max_age = self.settings.retention(channel)
                oldest = f"{int((now - max_age) * 1000)}-0" if max_age else ""
                keys = self.keys
                _evalsha(
                    pipe, self._pass,
                    keys=[keys.done(envelope.id), keys.gate(channel), keys.history(channel),
                          keys.message(envelope.id), keys.message_channel(channel),
                          keys.status_channel(channel), keys.epoch(channel),
                          keys.in_flight_index, keys.in_flight_envelopes, keys.waiting(channel)],
                    args=[_or(envelope.offset, -1), _or(envelope.prev, ""), self.settings.status_ttl,
                          maxlen, "" if skipped else message_frame_head(envelope),
                          "" if skipped else status_frame(envelope, "delivered"), node, client,
                          "1" if force or envelope.force_order else "0", envelope.id, oldest,
                          self.settings.channel_idle_ttl, "1" if skipped else "0", now,
                          max(1.0, self.settings.order_wait)],
                )

        return [tuple(result) for result in self._pipelined(queue)]

    def _pipelined(self, queue) -> list:
        """Run the commands `queue(pipe)` adds in one round trip and return their replies.

        Scripts go by their hash alone (`_evalsha`): redis-py's own pipelines
        first ask SCRIPT EXISTS, a second round trip every time. A Redis that
        lost them (a restart) answers NOSCRIPT; they are loaded and the whole
        pipeline runs again, which its idempotent scripts allow.
        """
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            queue(pipe)
            try:
                return pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                for script in (self._set_status, self._pass):
                    self.redis.script_load(script.script)
        raise AssertionError("unreachable")

    def mark_failed(self, envelope: Envelope, error: str, status: str = "failed") -> None:
        """Record a dead-lettered (or rejected) message; it still has to pass its
        channel's order gate (`deliver(..., skip=...)`) for the channel to move on."""
        self.set_status(envelope, status, fields={"error": error}, origin=envelope.origin)

    def get_message(self, msg_id: str) -> dict | None:
        """The stored message with its status, or None."""
        raw = self.redis.hgetall(self.keys.message(msg_id))
        if not raw:
            return None
        out = {"id": msg_id}
        for name in ("channel", "type", "sender", "status", "error"):
            out[name] = raw.get(name)
        for name in ("ts", "attempts", "partition", "offset"):
            out[name] = int(raw[name]) if raw.get(name, "").lstrip("-").isdigit() else None
        out["attempts"] = out["attempts"] or 0
        out["data"] = json.loads(raw["data"]) if "data" in raw else None
        out["stream_id"] = raw.get("stream_id")
        return out

    def history(self, channel: str, since: str | None, limit: int) -> dict:
        """Messages after `since` (exclusive), oldest first, and whether nothing was lost."""
        stream = self.keys.history(channel)
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.keys.epoch(channel))
        pipe.xrange(stream, min=f"({since}" if since else "-", count=limit + 1)
        pipe.xinfo_stream(stream) if since else pipe.exists(stream)
        try:
            epoch, entries, info = pipe.execute()
        except redis.ResponseError:  # no such stream: nothing retained
            epoch, entries, info = None, [], None
        recovered = True
        if since == "0-0":
            # "From the start" (a client that had seen nothing yet): nothing is
            # missing while the first message ever added is still retained.
            first = (info or {}).get("first-entry")
            recovered = bool(epoch) and bool(first) and first[0] == epoch
        elif since:
            recovered = bool(epoch) and bool(info) and _nothing_trimmed_after(since, epoch, info)
        more = len(entries) > limit
        entries = entries[:limit]
        messages = [json.loads(fields["f"] + sid + '"}') for sid, fields in entries]
        return {"messages": messages, "next": entries[-1][0] if more else None, "recovered": recovered}

    def last_id(self, channel: str) -> str | None:
        """The newest history entry's id, or None."""
        newest = self.redis.xrevrange(self.keys.history(channel), count=1)
        return newest[0][0] if newest else None

    # In-flight index: what the bridge handed to Celery and no worker finished.
    # The broker can still lose a task (a worker killed between taking it and
    # recording it as unacked); the bridge sends such stale ones again.
    def track_dispatched(self, envelopes: list[Envelope]) -> None:
        """Remember dispatched messages until they are delivered or dead-lettered."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.in_flight_index, {e.id: now for e in envelopes}, nx=True)
        pipe.hset(self.keys.in_flight_envelopes, mapping={e.id: encode(e) for e in envelopes})
        pipe.execute()

    def forget_dispatched(self, ids: list[str]) -> None:
        """Drop messages from the in-flight index."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(self.keys.in_flight_index, *ids)
        pipe.hdel(self.keys.in_flight_envelopes, *ids)
        pipe.execute()

    def stale_dispatched(self, older_than: float, limit: int = 500) -> list[Envelope]:
        """Messages dispatched more than `older_than` seconds ago and still not finished;
        their clock restarts, so each is returned once per period."""
        index = self.keys.in_flight_index
        now = time.time()
        ids = self.redis.zrangebyscore(index, "-inf", now - older_than, start=0, num=limit)
        if not ids:
            return []
        raw = self.redis.hmget(self.keys.in_flight_envelopes, ids)
        self.redis.zadd(index, {i: now for i in ids}, xx=True)
        return [decode(r) for r in raw if r]

    def in_flight_before(self, first_offsets: dict[int, int]) -> dict[int, dict[str, int]]:
        """For each partition of `first_offsets` ({partition: offset}), the highest offset
        below that offset of each channel's dispatched, unfinished messages
        ({partition: {channel: offset}}, partitions with none left out); one scan of the index."""
        latest: dict[int, dict[str, int]] = {}
        for _id, raw in self.redis.hscan_iter(self.keys.in_flight_envelopes, count=500):
            envelope = decode(raw)
            at = _or(envelope.offset, -1)
            if 0 <= at < first_offsets.get(envelope.partition, -1):
                channels = latest.setdefault(envelope.partition, {})
                channels[envelope.channel] = max(at, channels.get(envelope.channel, -1))
        return latest

    def count_run(self, task_id: str) -> int:
        """How many times a task has started (redeliveries and retries included)."""
        key = self.keys.task_runs(task_id)
        pipe = self.redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, self.settings.status_ttl)
        return pipe.execute()[0]

    def presence(self, channel: str) -> list[dict]:
        """Clients subscribed to a channel now, oldest first (entries of dead nodes left out)."""
        entries = [json.loads(v) for v in self.redis.hvals(self.keys.presence(channel))]
        alive = self._alive_nodes({e.get("node", "") for e in entries})
        entries = sorted((e for e in entries if e.get("node", "") in alive), key=lambda e: e.get("since", 0))
        return [{"client": e["client"], "user": e["user"], "since": e["since"]} for e in entries]

    def reap_presence(self) -> list[tuple[str, dict]]:
        """Remove presence entries of web processes that stopped heart-beating; returns them."""
        reaped = []
        for channel in self.redis.smembers(self.keys.presence_channels):
            key = self.keys.presence(channel)
            entries = {client: json.loads(v) for client, v in self.redis.hgetall(key).items()}
            alive = self._alive_nodes({e.get("node", "") for e in entries.values()})
            for client, entry in entries.items():
                if entry.get("node", "") not in alive:
                    if self.redis.hdel(key, client):
                        frame = json.dumps({"op": "leave", "channel": channel, "user": entry["user"],
                                            "client": client}, separators=(",", ":"))
                        self.redis.publish(self.keys.presence_channel(channel), frame)
                        reaped.append((channel, entry))
            if not self.redis.exists(key):
                self.redis.srem(self.keys.presence_channels, channel)
        return reaped

    def _alive_nodes(self, nodes: set[str]) -> set[str]:
        nodes = [n for n in nodes if n]
        if not nodes:
            return set()
        flags = self.redis.mget([self.keys.node(n) for n in nodes])
        return {n for n, flag in zip(nodes, flags) if flag}

    # Connection caps across the cluster.
    def claim_connection(self, member: str, user: str, address: str) -> str | None:
        """Count a new WebSocket; returns "user" or "address" (and counts nothing) when that cap is reached."""
        now = time.time()
        return self._claim_connection(
            keys=[self.keys.user_connections(user), self.keys.address_connections(address)],
            args=[member, now, now + self.settings.presence_ttl,
                  self.settings.ws_max_per_user, self.settings.ws_max_per_ip]) or None

    def refresh_connections(self, members: list[tuple[str, str, str]]) -> None:
        """Keep this process's open connections (member, user, address) counted for another TTL."""
        lapse = time.time() + self.settings.presence_ttl
        by_key: dict[str, dict[str, float]] = collections.defaultdict(dict)
        for member, user, address in members:
            by_key[self.keys.user_connections(user)][member] = lapse
            by_key[self.keys.address_connections(address)][member] = lapse
        pipe = self.redis.pipeline(transaction=False)
        for key, scores in by_key.items():
            # Re-added, not only updated: a Redis that restarted empty counts them again.
            pipe.zadd(key, scores)
            pipe.pexpireat(key, int(lapse * 1000))
        pipe.execute()

    def release_connection(self, member: str, user: str, address: str) -> None:
        """Stop counting a closed WebSocket."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(self.keys.user_connections(user), member)
        pipe.zrem(self.keys.address_connections(address), member)
        pipe.execute()

    # Idempotent publishing: the first request claims the id, later ones get its answer.
    def claim_idempotency(self, msg_id: str, claim: str) -> str | None:
        """None when this request now owns `msg_id` (claimed with the value `claim`);
        else the value there: another request's pending claim, or a stored answer.

        A pending claim lapses after a few produce timeouts, so a web process
        killed mid-publish does not block the id for a day; the retry may then
        write a second record, which the workers deduplicate.
        """
        ttl = max(10, int(self.settings.produce_timeout * 3))
        return self._claim(keys=[self.keys.idempotency(msg_id)], args=[claim, ttl])

    def release_idempotency(self, msg_id: str, claim: str) -> None:
        """Forget a claim whose publish failed, so the client may retry; only its owner can."""
        self._release(keys=[self.keys.idempotency(msg_id)], args=[claim])


def _nothing_trimmed_after(since: str, epoch: str, info: dict) -> bool:
    # Trimming removes the oldest entries, so nothing after `since` is gone
    # when `since` is at or past the first retained one (or, in an emptied
    # stream, past the last one ever added). `epoch` is the first entry this
    # stream ever had: an offset older than it belongs to a lost history.
    key = stream_id_key(since)
    if key < stream_id_key(epoch):
        return False
    first = info.get("first-entry")
    if not first:
        return key >= stream_id_key(info.get("last-generated-id", "0-0"))
    return key >= stream_id_key(first[0])


def _origin(store: Store, origin) -> tuple[str, str]:
    if not origin or "/" not in origin:
        return "", ""
    node, client = origin.split("/", 1)
    return store.keys.node_channel(node), client


def _evalsha(pipe, script, keys, args) -> None:
    pipe.evalsha(script.sha, len(keys), *keys, *args)


def _or(value, default):
    # Lua arguments cannot be nil: an unknown position goes as `default`.
    return default if value is None else value


def _message_fields(envelope: Envelope, partition, offset) -> dict:
    return {
        "channel": envelope.channel, "type": envelope.type, "sender": envelope.sender or "",
        "ts": str(envelope.ts), "data": json.dumps(envelope.data, ensure_ascii=False),
        "partition": str(partition), "offset": str(offset),
    }
