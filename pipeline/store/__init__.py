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
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import redis

from pipeline.core.errors import StartupError
from pipeline.core.ids import client_id
from pipeline.core.messages import MESSAGE_FIELDS, Envelope, decode, dumps_bytes, encode
from pipeline.core.redis_tls import redis_tls
from pipeline.store.keys import Keys

STATUS_RANK = {"accepted": 1, "processing": 2, "delivered": 3, "failed": 3, "rejected": 3}

# KEYS: msg hash, then the status pub/sub channel (on a single Redis; on a
# cluster it lives in another slot, and the caller publishes the frame).
# ARGV: status, rank, when the hash expires (Store.expires_at), status frame,
# origin pub/sub channel or '', origin client, force ('1' lets a replay
# restart a finished message), then field/value pairs to store. Returns {status now, '1' when it changed}.
_SET_STATUS = """
local current = redis.call('HGET', KEYS[1], 'status')
local rank = {accepted=1, processing=2, delivered=3, failed=3, rejected=3}
local new = tonumber(ARGV[2])
if current and ARGV[7] ~= '1' and (rank[current] or 0) >= new then
  if ARGV[1] == 'processing' and current == 'processing' then
    redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  end
  return {current, '0'}
end
if #ARGV > 7 then redis.call('HSET', KEYS[1], unpack(ARGV, 8)) end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
if ARGV[1] == 'processing' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
redis.call('EXPIREAT', KEYS[1], ARGV[3])
if ARGV[4] ~= '' and KEYS[2] then
  redis.call('PUBLISH', KEYS[2], ARGV[4])
  if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6] .. '\\n' .. ARGV[4]) end
end
return {ARGV[1], '1'}
"""

# Every record of a channel passes this gate in Kafka order, whatever its
# outcome: delivered, a duplicate of a message already handled (a retried POST
# writes a second record under the same id), or skipped (dead-lettered,
# rejected). A record waits until the gate reached its channel's previous
# offset, then moves the gate to its own (docs/design.md: "Order"). A forced record
# (its wait ran out) passes without its predecessor only when that one is
# not itself waiting in line (recently seen in the waiting set): so records
# forced together still pass one after the other, in order.
# KEYS: order gate, history stream, history epoch, waiting set (offsets scored
# by when they last waited), done marker, message pub/sub channel, status
# pub/sub channel: the channel's slot on a cluster. On a single Redis also the
# msg hash, in-flight index and in-flight envelopes, which on a cluster live
# in other slots: the caller updates them once the record passed.
# ARGV: kafka offset, previous offset of the channel or '', when the done
# marker and msg hash expire (Store.expires_at), history
# maxlen, message frame head, status frame, origin channel or '', origin client,
# force ('1' once the order wait ran out), message id, oldest id to keep ('' = no
# age limit), channel idle ttl, '1' to skip (let the gate pass without delivering),
# now (seconds), seconds after which a waiting record counts as stuck, the
# publish command (PUBLISH, or SPUBLISH on a cluster).
_PASS = """
local offset = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[1]) or '-1')
local whole = #KEYS > 7
local forced = '0'
if ARGV[2] ~= '' and last < tonumber(ARGV[2]) then
  local now = tonumber(ARGV[14])
  local queued = false
  if ARGV[9] == '1' then
    local seen = redis.call('ZSCORE', KEYS[4], ARGV[2])
    queued = seen and tonumber(seen) > now - tonumber(ARGV[15])
  end
  if ARGV[9] ~= '1' or queued then
    redis.call('ZADD', KEYS[4], now, ARGV[1])
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[12]))
    redis.call('EXPIRE', KEYS[4], ARGV[12])
    return {'wait', '', '0'}
  end
  forced = '1'
end
redis.call('ZREM', KEYS[4], ARGV[1])
if offset > last then redis.call('SET', KEYS[1], offset, 'EX', ARGV[12]) end
if whole then
  redis.call('ZREM', KEYS[9], ARGV[10])
  redis.call('HDEL', KEYS[10], ARGV[10])
end
local done = redis.call('GET', KEYS[5])
if done then return {'duplicate', done, forced} end
if ARGV[13] == '1' then return {'skipped', '', forced} end
local sid = redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], '*', 'f', ARGV[5])
if ARGV[11] ~= '' then redis.call('XTRIM', KEYS[2], 'MINID', ARGV[11]) end
-- An idle channel's keys expire (a message to each of many new channels
-- must not hold Redis memory for ever).
redis.call('EXPIRE', KEYS[2], ARGV[12])
redis.call('SET', KEYS[3], sid, 'NX')
redis.call('EXPIRE', KEYS[3], ARGV[12])
redis.call('SET', KEYS[5], sid, 'EXAT', ARGV[3])
if whole then
  redis.call('HSET', KEYS[8], 'status', 'delivered', 'stream_id', sid)
  redis.call('EXPIREAT', KEYS[8], ARGV[3])
end
redis.call(ARGV[16], KEYS[6], sid .. '\\n' .. ARGV[5] .. sid .. '"}')
redis.call(ARGV[16], KEYS[7], ARGV[6])
if ARGV[7] ~= '' then redis.call(ARGV[16], ARGV[7], ARGV[8] .. '\\n' .. ARGV[6]) end
return {'delivered', sid, forced}
"""

# The `accepted` status of many messages at once (a batch POST): what
# _SET_STATUS does for each, with no frame to publish. One call for a batch:
# a call per message was a quarter of a batch POST's web CPU (py-spy); the
# batched _SET_STATUS (_many) with its 21 arguments a message cost 12% more
# web CPU a message than these 7 (38 against 43 us, same run).
# The accepted status holds no `data`: the rules (a `redact`) have not run
# yet, and GET would serve it as published (issue 19); the worker stores the
# data once the rules ran (mark_processing).
# KEYS: msg hashes. ARGV: for each message when its hash expires
# (Store.expires_at), then the values of ACCEPTED_FIELDS, in that order.
ACCEPTED_FIELDS = ("channel", "type", "sender", "ts", "partition", "offset")
_ACCEPT = """
local rank = {accepted=1, processing=2, delivered=3, failed=3, rejected=3}
local names = {%s}
for i, key in ipairs(KEYS) do
  local base = (i - 1) * (#names + 1)
  local current = redis.call('HGET', key, 'status')
  if not current or (rank[current] or 0) < 1 then
    for j, name in ipairs(names) do redis.call('HSET', key, name, ARGV[base + 1 + j]) end
    redis.call('HSET', key, 'status', 'accepted')
    redis.call('EXPIREAT', key, ARGV[base + 1])
  end
end
return #KEYS
""" % ", ".join(f"'{name}'" for name in ACCEPTED_FIELDS)


def _many(body: str) -> str:
    """A script that runs `body` once for each of many calls, each with its own KEYS and
    ARGV, and returns their replies in order: one call to Redis for a batch's calls.

    Its ARGV: the number of calls, each call's key and argument counts, then
    every call's arguments in order; its KEYS: every call's keys in order.
    A call per message made a batch spend more in sending, parsing and
    starting scripts than in them (py-spy: command packing alone was a tenth
    of a worker's CPU).
    """
    return ("local function run(KEYS, ARGV)\n" + body + "\nend\n"
            "local calls = tonumber(ARGV[1])\n"
            "local replies, k, a = {}, 0, 1 + 2 * calls\n"
            "for c = 1, calls do\n"
            "  local nk, na = tonumber(ARGV[2 * c]), tonumber(ARGV[2 * c + 1])\n"
            "  local keys, args = {}, {}\n"
            "  for i = 1, nk do keys[i] = KEYS[k + i] end\n"
            "  for i = 1, na do args[i] = ARGV[a + i] end\n"
            "  k, a = k + nk, a + na\n"
            "  local reply = run(keys, args)\n"
            "  if reply == nil then reply = false end\n"
            "  replies[c] = reply\n"
            "end\n"
            "return replies\n")

# What rules add to a batch's deliveries (alert frames, copies routed to
# other channels), for one target channel: messages appended to its history
# and published, exactly once, guarded by a marker per source message and
# target set in the same script (a task run again after a worker died between
# the delivery and this finds the markers, and adds nothing, not even an alert
# a second evaluation under a newer version would have made). Every key is
# the target channel's, so it runs in that channel's slot on a cluster; one
# call per channel and batch, not per message.
# KEYS: history stream, history epoch, message pub/sub channel, then one
# marker per source message (Keys.effect). ARGV: marker ttl, history maxlen,
# channel idle ttl, publish command, oldest id to keep ('' = no age limit), then per marker
# the number of frames it guards and their message frame heads. Returns how
# many it delivered.
_EMIT = """
local added, first, at = 0, nil, 6
for i = 4, #KEYS do
  local count = tonumber(ARGV[at])
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[1]) then
    for j = at + 1, at + count do
      local sid = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], '*', 'f', ARGV[j])
      redis.call(ARGV[4], KEYS[3], sid .. '\\n' .. ARGV[j] .. sid .. '"}')
      first = first or sid
      added = added + 1
    end
  end
  at = at + count + 1
end
if added == 0 then return 0 end
if ARGV[5] ~= '' then redis.call('XTRIM', KEYS[1], 'MINID', ARGV[5]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], first, 'NX')
redis.call('EXPIRE', KEYS[2], ARGV[3])
return added
"""

# A `rate` condition's window: the ids of the messages it counted, scored by
# when. A message counted before (its task ran again) is not counted twice.
# A full window (ARGV[5] ids) counts no more ids: a flood would otherwise
# hold up to a day's ids (`per` goes to 86,400 s; issue 19); past it every
# message counts as one more than the window holds, which is over any `max`
# below the cap.
# KEYS: the window. ARGV: now, window seconds, message id, '1' to count ('0'
# only reads: a dry run), the cap. Returns how many the window holds up to
# this message.
_RATE = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
local score = redis.call('ZSCORE', KEYS[1], ARGV[3])
if not score then
  local held = redis.call('ZCARD', KEYS[1])
  if ARGV[4] ~= '1' or held >= tonumber(ARGV[5]) then return held + 1 end
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000))
  score = now
end
return redis.call('ZCOUNT', KEYS[1], '-inf', score)
"""
# The most message ids a `rate` window holds (_RATE): a `max` above it is not
# enforced past it (docs/guide.md: "Rules").
RATE_WINDOW_CAP = 10_000

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

# The first answer of a claimed id replaces the claim, only while the claim is
# still this request's: one that lapsed (a Redis pool wait past its TTL) may
# be another request's by now, and its answer is not ours to overwrite.
# KEYS: claim. ARGV: the value this request claimed it with, the answer, when
# it expires (Store.expires_at). Returns 1 when written.
_ANSWER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EXAT', ARGV[3])
return 1
"""


# Open WebSockets per user and per address, counted across every web process:
# sorted sets of "node/client" scored by when the entry lapses, so the
# connections of a process that died stop counting after the presence TTL.
# One set per call (a user's and an address's sets may sit on different
# cluster nodes). KEYS: the set; ARGV: member, now, lapse, cap. Returns 1
# (and counts nothing) when the cap is reached.
_CLAIM_CONNECTION = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[2]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 1 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('PEXPIREAT', KEYS[1], math.floor(tonumber(ARGV[3]) * 1000))
return 0
"""


def connect(settings, pool_size: int = 4, *, url: str | None = None) -> redis.Redis | redis.RedisCluster:
    """A client of the main Redis (or of `url`), with bounded timeouts, so an
    outage fails fast instead of hanging, and TLS as configured for `rediss://`.

    Its pool blocks for a free connection (up to `HERALD_REDIS_POOL_WAIT`,
    30 s) when `pool_size` are in use: a burst of thousands of WebSocket
    connects and subscribes waits its turn instead of failing (issue 10: a
    busy pool is a wait, not an outage; an outage still fails within the
    connect and socket timeouts of the connection a caller gets). Long-lived
    services pass `HERALD_REDIS_POOL_SIZE`; the small default suits one-off clients.
    With `REDIS_CLUSTER` on, the main Redis is a `RedisCluster` client (one
    such pool per node); `url` (the Celery broker) never is.
    """
    address, tls = redis_tls(url or settings.redis_url, settings)
    options = dict(max_connections=pool_size, timeout=settings.redis_pool_wait, decode_responses=True,
                   socket_timeout=5,
                   socket_connect_timeout=3, **tls)
    if settings.redis_cluster and url in (None, settings.redis_url):
        return redis.RedisCluster.from_url(address, connection_pool_class=redis.BlockingConnectionPool,
                                           **options)
    pool = redis.BlockingConnectionPool.from_url(address, health_check_interval=15, **options)
    return redis.Redis(connection_pool=pool)


def check_at_start(settings) -> str | None:
    """Refuse to run on a Redis that does not answer or may evict Herald's keys.

    Pings the main Redis and a Redis Celery broker, so a wrong address or
    certificate stops the process in one line rather than in a retry loop.
    Then reads the main Redis' `maxmemory-policy`: any policy but `noeviction`
    may evict dedupe markers and idempotency claims, and a message would then
    be delivered twice (docs/operations.md: "Redis: TLS and eviction"). Raises StartupError unless
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


def eviction_policy(client: redis.Redis | redis.RedisCluster) -> str | None:
    """The server's `maxmemory-policy`, or None when it does not say; on a
    cluster, the first primary's that is not `noeviction`, if any.

    Managed Redis often refuses CONFIG; INFO's `maxmemory_policy` field says
    the same there.
    """
    if isinstance(client, redis.RedisCluster):
        policies = [eviction_policy(client.get_redis_connection(node)) for node in client.get_primaries()]
        evicting = [p for p in policies if p not in (None, "noeviction")]
        return evicting[0] if evicting else (None if None in policies else "noeviction")
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
    """The SPEC's `message` frame without its closing offset, which XADD assigns; its `id` is
    the id as its sender sent it (pipeline/core/ids.py)."""
    frame = {"op": "message", "channel": envelope.channel, "id": client_id(envelope.id), "type": envelope.type,
             "data": envelope.data, "sender": envelope.sender, "ts": envelope.ts}
    if envelope.rules and envelope.rules.get("tags"):
        frame["tags"] = envelope.rules["tags"]  # a rule's `tag` action
    return _dumps(frame)[:-1] + ',"offset":"'


# JSON as message frames carry it: compact, UTF-8 left as it is. One encoder
# made once: json.dumps with any option makes a new one at every call (a
# twentieth of a worker's CPU went to making them, py-spy).
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def status_frame(envelope: Envelope, status: str) -> str:
    """The SPEC's `status` frame (channel and id are ASCII by their patterns), with the id as
    its sender sent it."""
    return _dumps({"op": "status", "channel": envelope.channel, "id": client_id(envelope.id), "status": status})


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

    def __init__(self, client: redis.Redis | redis.RedisCluster, settings):
        self.redis = client
        self.settings = settings
        self.cluster = isinstance(client, redis.RedisCluster)
        self.keys = Keys(settings.redis_prefix, self.cluster)
        self._set_status = client.register_script(_SET_STATUS)
        self._pass = client.register_script(_PASS)
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)
        self._claim_connection = client.register_script(_CLAIM_CONNECTION)
        self._emit = client.register_script(_EMIT)
        self._rate = client.register_script(_RATE)
        self._accept = client.register_script(_ACCEPT)
        self._answer = client.register_script(_ANSWER)
        # Each script's calls, many at once (_run_scripts on a single Redis).
        self._batched = {script.sha: client.register_script(_many(script.script))
                         for script in (self._set_status, self._pass, self._emit, self._answer)}
        # What a Redis that lost its scripts (a restart) is given again (_pipelined).
        self._scripts = (self._set_status, self._pass, self._claim, self._release, self._claim_connection,
                         self._emit, self._rate, self._accept, self._answer, *self._batched.values())

    def expires_at(self, envelope: Envelope) -> int:
        """When a message's status, dedupe marker and idempotency answer expire (Unix seconds):
        HERALD_STATUS_TTL after it was published, all three together, so that once its id
        may be published again nothing of the earlier message is left to make the new one
        a duplicate (docs/design.md: "Message ids"). A message handled later than that (a replay)
        keeps them HERALD_STATUS_TTL from now."""
        ttl = self.settings.status_ttl
        now = int(time.time())
        at = int(envelope.ts) // 1000 + ttl
        return at if at > now else now + ttl

    def publish(self, name: str, message: str, client=None) -> None:
        """Publish on a pub/sub channel built by Keys: sharded (SPUBLISH) on a
        cluster, so only the node of the channel's slot carries it."""
        client = self.redis if client is None else client
        (client.spublish if self.cluster else client.publish)(name, message)

    def mget(self, keys: list[str]) -> list:
        """GET of many keys in one call (spread over their nodes on a cluster)."""
        return self.redis.mget_nonatomic(keys) if self.cluster else self.redis.mget(keys)

    def _run_scripts(self, calls: list[tuple]) -> list:
        """Run (script, keys, args) calls in one pipeline and return their replies, in order.

        A cluster pipeline refuses scripts: there the calls go in one plain
        pipeline per node, to the node of each call's slot (a channel's calls
        keep their order: they share a node). A slot that moved meanwhile is a
        ConnectionError, after the slot map is read again: the caller retries.
        """
        def queue(indexes):
            def add(pipe):
                for index in indexes:
                    script, keys, args = calls[index]
                    _evalsha(pipe, script, keys, args)
            return add

        if not self.cluster:
            return self._run_batched(calls)
        by_node: dict[str, list[int]] = collections.defaultdict(list)
        for index, (_script, keys, _args) in enumerate(calls):
            by_node[self.redis.get_node_from_key(keys[0]).name].append(index)
        replies: list = [None] * len(calls)
        for name, indexes in by_node.items():
            node = self.redis.get_redis_connection(self.redis.get_node(node_name=name))
            try:
                results = self._pipelined(node, queue(indexes))
            except (redis.exceptions.MovedError, redis.exceptions.AskError, redis.exceptions.TryAgainError,
                    redis.exceptions.ClusterDownError) as exc:
                self.redis.nodes_manager.initialize()
                raise redis.ConnectionError(f"Redis Cluster slots moved: {exc}") from exc
            for index, result in zip(indexes, results):
                replies[index] = result
        return replies

    def _run_batched(self, calls: list[tuple]) -> list:
        # A run of calls to the same script is one call of its batched form
        # (_many), in the order given: what each call does is unchanged.
        runs: list[tuple] = []  # (script, [calls])
        for call in calls:
            if runs and runs[-1][0] is call[0] and call[0].sha in self._batched:
                runs[-1][1].append(call)
            else:
                runs.append((call[0], [call]))

        def add(pipe):
            for script, group in runs:
                if len(group) == 1:
                    _evalsha(pipe, script, group[0][1], group[0][2])
                    continue
                keys, counts, args = [], [len(group)], []
                for _script, call_keys, call_args in group:
                    keys += call_keys
                    args += call_args
                    counts += [len(call_keys), len(call_args)]
                _evalsha(pipe, self._batched[script.sha], keys, counts + args)

        replies = []
        for (_script, group), reply in zip(runs, self._pipelined(self.redis, add)):
            replies += [reply] if len(group) == 1 else reply
        return replies

    def _pipelined(self, client, queue) -> list:
        """Run the commands `queue(pipe)` adds to a pipeline of `client` in one round
        trip and return their replies.

        Scripts go by their hash alone (`_evalsha`): redis-py's own pipelines
        first ask SCRIPT EXISTS, a second round trip every time. A Redis that
        lost them (a restart) answers NOSCRIPT; they are loaded and the whole
        pipeline runs again, which its idempotent scripts allow.
        """
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            queue(pipe)
            try:
                return pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                for script in self._scripts:
                    client.script_load(script.script)
        raise AssertionError("unreachable")

    def set_status(self, envelope: Envelope, status: str, *, fields=None, origin=None, force=False) -> str:
        """Move a message's status forward (never back) and push the change; returns the status now."""
        now, changed = self._set_status(**self._status_call(envelope, status, fields, origin, force))
        if changed == "1" and self.cluster:
            self._publish_status(envelope, status, origin, self.redis)
        return now

    def _status_call(self, envelope, status, fields=None, origin=None, force=False) -> dict:
        flat = []
        for name, value in (fields or {}).items():
            flat += [name, value if isinstance(value, (str, bytes)) else json.dumps(value)]
        frame = status_frame(envelope, status) if status != "accepted" else ""
        keys = [self.keys.message(envelope.id)]
        node, client = "", ""
        if not self.cluster:  # on a cluster the frames are published apart (_publish_status)
            keys.append(self.keys.status_channel(envelope.channel))
            node, client = _origin(self, origin)
        return {"keys": keys, "args": [status, STATUS_RANK[status], self.expires_at(envelope), frame, node, client,
                                       "1" if force else "0", *flat]}

    def _publish_status(self, envelope: Envelope, status: str, origin, client, *, channel: bool = True) -> None:
        # On a cluster a message's status and its channel's pub/sub channel sit
        # in different slots: the frames follow the status change, not in one
        # script with it (a process that dies in between loses them; the
        # status itself is kept).
        if status == "accepted":
            return
        frame = status_frame(envelope, status)
        if channel:
            self.publish(self.keys.status_channel(envelope.channel), frame, client)
        node, target = _origin(self, origin)
        if node:
            self.publish(node, f"{target}\n{frame}", client)

    def record_accepted(self, accepted: list[tuple[Envelope, int, int]],
                        answers: dict[str, tuple[str, str]]) -> None:
        """Note records Kafka acknowledged, (envelope, partition, offset) each, unless a worker
        already moved them further, and keep the first answer of each claimed id (`answers`:
        global id to (its claim, the answer)) as long as its status (`expires_at`), in place
        of the claim only while the claim is still this request's. One round trip for them
        all on a single Redis. The `accepted` status has no frame to publish, and no data."""
        expiry = {envelope.id: self.expires_at(envelope) for envelope, _partition, _offset in accepted}
        answer_calls = [(self._answer, [self.keys.idempotency(msg_id)], [claim, value, expiry[msg_id]])
                        for msg_id, (claim, value) in answers.items()]
        if self.cluster:
            # Each hash has a slot of its own: a call each, spread over the nodes.
            calls = []
            for envelope, partition, offset in accepted:
                fields = _message_fields(envelope, partition, offset)
                call = self._status_call(envelope, "accepted", {name: fields[name] for name in ACCEPTED_FIELDS})
                calls.append((self._set_status, call["keys"], call["args"]))
            self._run_scripts(calls + answer_calls)
            return
        keys, args = [], []
        for envelope, partition, offset in accepted:
            keys.append(self.keys.message(envelope.id))
            fields = _message_fields(envelope, partition, offset)
            args += [expiry[envelope.id], *(fields[name] for name in ACCEPTED_FIELDS)]
        self._run_scripts([(self._accept, keys, args), *answer_calls])

    def mark_processing(self, envelopes: list[Envelope]) -> list[str]:
        """Workers took these messages; returns each one's status now (a finished one stays finished)."""
        calls = []
        for envelope in envelopes:
            fields = _message_fields(envelope, _or(envelope.partition, ""), _or(envelope.offset, ""))
            call = self._status_call(envelope, "processing", fields, envelope.origin)
            calls.append((self._set_status, call["keys"], call["args"]))
        replies = self._run_scripts(calls)
        if self.cluster and any(changed == "1" for _status, changed in replies):
            pipe = self.redis.pipeline(transaction=False)
            for envelope, (_status, changed) in zip(envelopes, replies):
                if changed == "1":
                    self._publish_status(envelope, "processing", envelope.origin, pipe)
            pipe.execute()
        return [status for status, _changed in replies]

    def mark_rejected(self, rejected: list[tuple[Envelope, str]]) -> None:
        """Record messages a rule blocked, (envelope, rule) each, as `rejected` naming the rule,
        in one round trip; each still has to pass its channel's order gate (`skip`)."""
        calls = []
        for envelope, rule in rejected:
            fields = _message_fields(envelope, _or(envelope.partition, ""), _or(envelope.offset, ""))
            # A blocked message's data is not served (a moderation `block` would
            # hide nothing otherwise); the alert, if any, carries it.
            fields.update(data="null", error=f"blocked by rule {rule}", rule=rule)
            call = self._status_call(envelope, "rejected", fields, envelope.origin)
            calls.append((self._set_status, call["keys"], call["args"]))
        replies = self._run_scripts(calls)
        if self.cluster and any(changed == "1" for _status, changed in replies):
            pipe = self.redis.pipeline(transaction=False)
            for (envelope, _rule), (_status, changed) in zip(rejected, replies):
                if changed == "1":
                    self._publish_status(envelope, "rejected", envelope.origin, pipe)
            pipe.execute()

    def deliver(self, envelopes: list[Envelope], *, force: bool = False) -> list[tuple[str, str, str]]:
        """Pass each record through its channel's order gate, in order, and deliver it once.

        Returns per record ('delivered'|'duplicate'|'skipped'|'wait', stream id,
        '1' when it passed without its predecessor, else '0'): 'wait' while the
        channel's previous record is not handled; records flagged `skip`
        (dead-lettered, rejected) only move the gate on.
        One round trip for the batch (two on a cluster, see _after_pass).
        """
        now = time.time()
        keys = self.keys
        calls = []
        for envelope in envelopes:
            channel, skipped = envelope.channel, envelope.skip
            node, client = _origin(self, envelope.origin) if not self.cluster else ("", "")
            maxlen, max_age = self.settings.retention(channel)
            oldest = f"{int((now - max_age) * 1000)}-0" if max_age else ""
            script_keys = [keys.gate(channel), keys.history(channel), keys.epoch(channel), keys.waiting(channel),
                           keys.done(envelope.id, channel), keys.message_channel(channel),
                           keys.status_channel(channel)]
            if not self.cluster:
                script_keys += [keys.message(envelope.id), keys.in_flight_index, keys.in_flight_envelopes]
            args = [_or(envelope.offset, -1), _or(envelope.prev, ""), self.expires_at(envelope),
                    maxlen, "" if skipped else message_frame_head(envelope),
                    "" if skipped else status_frame(envelope, "delivered"), node, client,
                    "1" if force or envelope.force_order else "0", envelope.id, oldest,
                    self.settings.channel_idle_ttl, "1" if skipped else "0", now,
                    max(1.0, self.settings.order_wait), "SPUBLISH" if self.cluster else "PUBLISH"]
            calls.append((self._pass, script_keys, args))
        results = [tuple(result) for result in self._run_scripts(calls)]
        if self.cluster:
            self._after_pass(envelopes, results)
        self._rule_effects(envelopes, results)
        return results

    def _rule_effects(self, envelopes: list[Envelope], results: list[tuple[str, str, str]]) -> None:
        # A rule's alert and route, once the record passed its gate, whatever
        # its outcome: a duplicate or skipped record may be the second run of a
        # task whose worker died before this step; each effect's marker keeps
        # it to once (_EMIT).
        by_channel: dict[str, tuple[list[str], list]] = {}  # target: (markers, [count, heads...] each)

        def emit(channel: str, effect: str, msg_id: str, heads: list[str]) -> None:
            markers, args = by_channel.setdefault(channel, ([], []))
            markers.append(self.keys.effect(effect, msg_id, channel))
            args += [len(heads), *heads]

        alerts = self.settings.rules_alert_channel
        alert_head = f'{{"op":"message","channel":{_dumps(alerts)},"id":'
        for envelope, (result, _sid, _forced) in zip(envelopes, results):
            decision = envelope.rules
            if result == "wait" or not decision or not ("alert" in decision or "route" in decision):
                continue
            if "alert" in decision:
                # What every alert of this message repeats is encoded once.
                message = _dumps({name: getattr(envelope, name) for name in MESSAGE_FIELDS}
                                 | {"id": client_id(envelope.id)})
                tail = (f'"matched":{_dumps(decision.get("matched", []))},"message":{message}}},'
                        f'"sender":"herald","ts":{int(time.time() * 1000)},"offset":"')
                emit(alerts, "alerts", envelope.id, [
                    f'{alert_head}{_dumps(f"{envelope.id}:alert:{rule}")},"type":"rule.alert",'
                    f'"data":{{"rule":{_dumps(rule)},'
                    f'"blocked":{"true" if decision.get("block") == rule else "false"},{tail}'
                    for rule in decision["alert"]])
            if not decision.get("block"):
                for _rule, target in decision.get("route", ()):
                    emit(target, "route", envelope.id, [message_frame_head(replace(envelope, channel=target))])
        if by_channel:
            self._run_scripts([self._emit_call(channel, markers, args)
                               for channel, (markers, args) in by_channel.items()])

    def _emit_call(self, channel: str, markers: list[str], frames: list) -> tuple:
        maxlen, max_age = self.settings.retention(channel)
        oldest = f"{int((time.time() - max_age) * 1000)}-0" if max_age else ""
        keys = [self.keys.history(channel), self.keys.epoch(channel), self.keys.message_channel(channel), *markers]
        return (self._emit, keys, [self.settings.status_ttl, maxlen, self.settings.channel_idle_ttl,
                                   "SPUBLISH" if self.cluster else "PUBLISH", oldest, *frames])

    def count_in_window(self, key: str, per: float, member: str, *, record: bool = True) -> int:
        """How many messages a `rate` window of `per` seconds at `key` holds up to `member`,
        counting `member` in (once) unless `record` is false; past RATE_WINDOW_CAP ids, one
        more than the cap."""
        return int(self._rate(keys=[key], args=[time.time(), per, member, "1" if record else "0",
                                                RATE_WINDOW_CAP]))

    def _after_pass(self, envelopes: list[Envelope], results: list[tuple[str, str, str]]) -> None:
        # On a cluster, what the delivery script cannot reach from the
        # channel's slot: the message's status, the in-flight index, and the
        # publisher's own status frame. A duplicate writes the status too, so
        # a worker that died right after delivering leaves no message stuck
        # in `processing` once its task runs again.
        passed = [e.id for e, (result, _sid, _forced) in zip(envelopes, results) if result != "wait"]
        if not passed:
            return

        calls = []
        pipe = self.redis.pipeline(transaction=False)
        for envelope, (result, sid, _forced) in zip(envelopes, results):
            if result in ("delivered", "duplicate"):
                call = self._status_call(envelope, "delivered", {"stream_id": sid})
                calls.append((self._set_status, call["keys"], call["args"]))
            if result == "delivered":
                self._publish_status(envelope, "delivered", envelope.origin, pipe, channel=False)
        pipe.zrem(self.keys.in_flight_index, *passed)
        pipe.hdel(self.keys.in_flight_envelopes, *passed)
        self._run_scripts(calls)
        pipe.execute()

    def mark_failed(self, envelope: Envelope, error: str, status: str = "failed") -> None:
        """Record a dead-lettered (or rejected) message; it still has to pass its
        channel's order gate (`deliver(..., skip=...)`) for the channel to move on."""
        self.set_status(envelope, status, fields={"error": error}, origin=envelope.origin)

    def get_message(self, msg_id: str) -> dict | None:
        """The stored message with its status (by global id), or None."""
        return message_from(msg_id, self.redis.hgetall(self.keys.message(msg_id)))

    # KEYS: history stream. ARGV: first id ('-' or '(<id>'), most entries, byte
    # budget. Returns {entries, more}: entries in order, until their 'f' fields
    # pass the budget (at least one, so paging always moves on); `more` is 1
    # when the stream holds more after the last. Read a chunk at a time in
    # Redis: the reply and the page built from it stay near the budget (review M3).
    _HISTORY_PAGE = """
local start, most, budget = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local page, used = {}, 0
while true do
  local want = math.min(most + 1 - #page, 64)
  local chunk = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', want)
  for _, entry in ipairs(chunk) do
    local size = string.len(entry[2][2])
    if #page == most or (#page > 0 and used + size > budget) then return {page, 1} end
    page[#page + 1] = entry
    used = used + size
  end
  if #chunk < want then return {page, 0} end
  start = '(' .. chunk[#chunk][1]
end
"""

    def history(self, channel: str, since: str | None, limit: int) -> dict:
        """Messages after `since` (exclusive), oldest first, and whether nothing was lost.

        A page holds at most `limit` messages and stops once they pass
        HERALD_HISTORY_PAGE_BYTES (at least one message); `next` continues it.
        """
        stream = self.keys.history(channel)
        read = (self._HISTORY_PAGE, 1, stream, f"({since}" if since else "-", limit, self.settings.history_page_bytes)
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.keys.epoch(channel))
        if not self.cluster:  # redis-py's cluster pipeline runs no scripts
            pipe.eval(*read)
        pipe.xinfo_stream(stream) if since else pipe.exists(stream)
        try:
            replies = pipe.execute()
            entries, more = self.redis.eval(*read) if self.cluster else replies.pop(1)
            epoch, info = replies
        except redis.ResponseError:  # no such stream: nothing retained
            epoch, entries, more, info = None, [], 0, None
        recovered = True
        if since == "0-0":
            # "From the start" (a client that had seen nothing yet): nothing is
            # missing while the first message ever added is still retained.
            first = (info or {}).get("first-entry")
            recovered = bool(epoch) and bool(first) and first[0] == epoch
        elif since:
            recovered = bool(epoch) and bool(info) and _nothing_trimmed_after(since, epoch, info)
        messages = [json.loads(fields[1] + sid + '"}') for sid, fields in entries]
        return {"messages": messages, "next": entries[-1][0] if more and entries else None, "recovered": recovered}

    def last_id(self, channel: str) -> str | None:
        """The newest history entry's id, or None."""
        return self.last_ids([channel])[0]

    def last_ids(self, channels: list[str]) -> list[str | None]:
        """`last_id` of many channels in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for channel in channels:
            pipe.xrevrange(self.keys.history(channel), count=1)
        return [newest[0][0] if newest else None for newest in pipe.execute()]

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

    # Connection caps across the cluster.
    def claim_connection(self, member: str, user: str, address: str) -> str | None:
        """Count a new WebSocket; returns "user" or "address" (and counts nothing) when that cap is reached."""
        return self.claim_connections([(member, user, address)])[0]

    def claim_connections(self, claims: list[tuple[str, str, str]]) -> list[str | None]:
        """`claim_connection` for many (member, user, address) at once, in one round trip
        (a burst of WebSocket connects, web/hub/batch.py); claims count in list order."""
        now = time.time()
        lapse = now + self.settings.presence_ttl
        calls = []
        for member, user, address in claims:
            calls.append((self._claim_connection, [self.keys.user_connections(user)],
                          [member, now, lapse, self.settings.ws_max_per_user]))
            calls.append((self._claim_connection, [self.keys.address_connections(address)],
                          [member, now, lapse, self.settings.ws_max_per_ip]))
        replies = self._run_scripts(calls)
        results, undo = [], []
        for (member, user, address), over_user, over_address in zip(claims, replies[::2], replies[1::2]):
            # Each cap is one script (the two sets may sit on different cluster
            # nodes): a claim refused by one is taken back from the other.
            if over_user:
                results.append("user")
                if not over_address:
                    undo.append((self.keys.address_connections(address), member))
            elif over_address:
                results.append("address")
                undo.append((self.keys.user_connections(user), member))
            else:
                results.append(None)
        for key, member in undo:
            self.redis.zrem(key, member)
        return results

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
        "ts": str(envelope.ts), "data": dumps_bytes(envelope.data),
        "partition": str(partition), "offset": str(offset),
    }


def message_from(msg_id: str, raw: dict) -> dict | None:
    """A message's status hash (`msg_id` is its global id) as `GET /api/v1/messages/{id}`
    answers it, or None when empty: `data` is null until a worker took it (and for good
    once a rule blocked it)."""
    if not raw:
        return None
    out = {"id": client_id(msg_id)}
    for name in ("channel", "type", "sender", "status", "error"):
        out[name] = raw.get(name)
    if raw.get("rule"):
        out["rule"] = raw["rule"]  # the rule that blocked it (docs/guide.md: "Rules")
    for name in ("ts", "attempts", "partition", "offset"):
        out[name] = int(raw[name]) if raw.get(name, "").lstrip("-").isdigit() else None
    out["attempts"] = out["attempts"] or 0
    out["data"] = json.loads(raw["data"]) if "data" in raw else None
    out["stream_id"] = raw.get("stream_id")
    return out
