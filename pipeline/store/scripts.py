"""Herald's Lua scripts (one a file in `lua/`) and the one way they are run.

A script's KEYS and ARGV are declared once, as two NamedTuples, one field a
slot in order. The source sent to Redis starts with locals named after those
fields (`local gate, history = unpack(KEYS, 1, 2)`), so no script addresses
an argument by its position and the argument order has one owner. A last
field typed as a list is a rest: a Lua table of every slot from there on.
A field that may be None (a trailing key only one deployment passes) is left
out of the call, and is nil in Lua. Each file's first two lines name the
slots (`header`); a unit test holds them to the NamedTuples.

Values a script shares with Python (the status rank, the accepted fields)
are generated into it as constants, never written in the file.

A `Runner` sends many calls in one round trip: on a single Redis a run of
calls to one script is one call of its batched form (`_many`); on a cluster,
which refuses scripts in its pipelines, one plain pipeline per node.
"""

from __future__ import annotations

import collections
import collections.abc
import hashlib
import typing
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any, Generic, NamedTuple, TypeVar

import redis
from redis.commands.core import Script as RedisScript

Client = redis.Redis | redis.RedisCluster
Pipeline = Any  # redis.client.Pipeline | redis.cluster.ClusterPipeline: what a client's pipeline() gives

K = TypeVar("K", bound=tuple[Any, ...])
A = TypeVar("A", bound=tuple[Any, ...])

_LISTS = (list, tuple, collections.abc.Sequence)


def lua_literal(value: object) -> str:
    """`value` (a str, a number, a list of them, a dict of them by identifier) written in Lua."""
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{name}={lua_literal(item)}" for name, item in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "{" + ", ".join(lua_literal(item) for item in value) + "}"
    raise TypeError(f"no Lua literal for {value!r}")


def _slots(fields: type[tuple[Any, ...]]) -> tuple[list[str], str | None]:
    """The named slots of a NamedTuple class, and the name of its rest field if any."""
    hints = typing.get_type_hints(fields)  # a NamedTuple's annotations are its fields, in order
    names = list(hints)
    if names and typing.get_origin(hints[names[-1]]) in _LISTS:
        return names[:-1], names[-1]
    return names, None


def prelude(table: str, fields: type[tuple[Any, ...]]) -> str:
    """The Lua lines that name `table`'s (KEYS or ARGV) slots after the fields of `fields`."""
    names, rest = _slots(fields)
    lines = []
    if names:
        lines.append(f"local {', '.join(names)} = unpack({table}, 1, {len(names)})")
    if rest is not None:
        if names:
            lines.append(f"local {rest} = {{}} for i = {len(names) + 1}, #{table} do "
                         f"{rest}[i - {len(names)}] = {table}[i] end")
        else:
            lines.append(f"local {rest} = {table}")
    return "".join(line + "\n" for line in lines)


def header(keys: type[tuple[Any, ...]], args: type[tuple[Any, ...]]) -> str:
    """The comment that opens a script's file: its KEYS and ARGV slots, a rest as `name...`."""
    def names(fields: type[tuple[Any, ...]]) -> str:
        named, rest = _slots(fields)
        return ", ".join(named + ([f"{rest}..."] if rest else []))
    return f"-- KEYS: {names(keys)}\n-- ARGV: {names(args)}\n"


def _flattener(fields: type[tuple[Any, ...]]) -> Callable[[tuple[Any, ...]], list[Any]]:
    """How a NamedTuple of `fields` becomes a call's KEYS or ARGV: its slots in order,
    a rest field's items in its place, a trailing None left out. Chosen once per
    script: this runs for every call of every message."""
    _named, rest = _slots(fields)
    if rest is not None:
        def with_rest(values: tuple[Any, ...]) -> list[Any]:
            flat = list(values[:-1])
            flat.extend(values[-1])
            return flat
        return with_rest

    def plain(values: tuple[Any, ...]) -> list[Any]:
        flat = list(values)
        while flat and flat[-1] is None:  # an absent trailing slot
            flat.pop()
        return flat
    return plain


def _many(body: str) -> str:
    """A script that runs `body` once for each of many calls, each with its own KEYS and
    ARGV, and returns their replies in order: one call to Redis for a batch's calls.

    Its ARGV: the number of calls, each call's key and argument counts, then
    every call's arguments in order; its KEYS: every call's keys in order.
    A call per message made a batch spend more in sending, parsing and
    starting scripts than in them.
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


class Source(NamedTuple):
    """Lua source as Redis is sent it, and its SHA1 (what EVALSHA names it by)."""

    text: str
    sha: str


def _source(text: str) -> Source:
    return Source(text, hashlib.sha1(text.encode()).hexdigest())


class Script(Generic[K, A]):
    """One file of `lua/`, with the NamedTuples of its KEYS and ARGV and the constants
    generated into it; `batched` scripts also have a form that runs many calls at once.
    `uses` names files of `lua/lib/` (local functions two scripts share), put between
    the named slots and the script's own text."""

    def __init__(self, file: str, keys: type[K], args: type[A], *, batched: bool = False,
                 constants: Mapping[str, object] | None = None, uses: tuple[str, ...] = ()) -> None:
        self.file = file
        self.keys = keys
        self.args = args
        lua = resources.files("pipeline.store").joinpath("lua")
        self.text = lua.joinpath(file).read_text()
        shared = "".join(f"local {name} = {lua_literal(value)}\n" for name, value in (constants or {}).items())
        library = "".join(lua.joinpath("lib", name).read_text() for name in uses)
        body = prelude("KEYS", keys) + prelude("ARGV", args) + library + self.text
        self.source = _source(shared + body)
        # The constants outside the per-call function: made once a batch, not once a call.
        self.batched = _source(shared + _many(body)) if batched else None
        self._keys = _flattener(keys)
        self._args = _flattener(args)
        _EVERY.append(self)

    @property
    def sha(self) -> str:
        """The SHA1 of the source Redis runs (one call's form)."""
        return self.source.sha

    def __call__(self, keys: K, args: A) -> Call:
        """A call of this script with these slots, ready for `Runner.run`."""
        return Call(self, self._keys(keys), self._args(args))


# Every script made, loaded again all at once when Redis lost them (`Runner.pipelined`).
_EVERY: list[Script[Any, Any]] = []


class Call(NamedTuple):
    """A script with its flattened KEYS and ARGV."""

    script: Script[Any, Any]
    keys: list[str]
    args: list[Any]


class Runner:
    """Runs scripts on one client: one call, or many in one round trip (`run`)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.cluster = isinstance(client, redis.RedisCluster)
        self._registered: dict[str, RedisScript] = {}

    def one(self, call: Call) -> Any:
        """Run one call and return its reply (loading the script if Redis lost it)."""
        script = self._registered.get(call.script.sha)
        if script is None:
            script = self._registered[call.script.sha] = self.client.register_script(call.script.source.text)
        return script(keys=call.keys, args=call.args)

    def run(self, calls: Sequence[Call]) -> list[Any]:
        """Run calls in one pipeline and return their replies, in order.

        A cluster pipeline refuses scripts: there the calls go in one plain
        pipeline per node, to the node of each call's slot (a channel's calls
        keep their order: they share a node). A slot that moved meanwhile is a
        ConnectionError, after the slot map is read again: the caller retries.
        """
        if not self.cluster:
            return self._run_batched(calls)
        cluster: Any = self.client  # redis-py's cluster client is untyped
        by_node: dict[str, list[int]] = collections.defaultdict(list)
        for index, call in enumerate(calls):
            by_node[cluster.get_node_from_key(call.keys[0]).name].append(index)
        replies: list[Any] = [None] * len(calls)
        for name, indexes in by_node.items():
            node = cluster.get_redis_connection(cluster.get_node(node_name=name))

            def add(pipe: Pipeline, group: list[int] = indexes) -> None:
                for index in group:
                    self.queue(pipe, calls[index])

            try:
                results = self.pipelined(node, add)
            except (redis.exceptions.MovedError, redis.exceptions.AskError, redis.exceptions.TryAgainError,
                    redis.exceptions.ClusterDownError) as exc:
                cluster.nodes_manager.initialize()
                raise redis.ConnectionError(f"Redis Cluster slots moved: {exc}") from exc
            for index, result in zip(indexes, results):
                replies[index] = result
        return replies

    def _run_batched(self, calls: Sequence[Call]) -> list[Any]:
        # A run of calls to the same script is one call of its batched form
        # (_many), in the order given: what each call does is unchanged.
        runs: list[list[Call]] = []
        for call in calls:
            if runs and runs[-1][0].script is call.script and call.script.batched is not None:
                runs[-1].append(call)
            else:
                runs.append([call])

        def add(pipe: Pipeline) -> None:
            for group in runs:
                script = group[0].script
                if len(group) == 1:
                    self.queue(pipe, group[0])
                    continue
                keys: list[str] = []
                counts: list[Any] = [len(group)]
                args: list[Any] = []
                for call in group:
                    keys += call.keys
                    args += call.args
                    counts += [len(call.keys), len(call.args)]
                assert script.batched is not None  # only a batched script's calls are grouped
                pipe.evalsha(script.batched.sha, len(keys), *keys, *counts, *args)

        replies: list[Any] = []
        for group, reply in zip(runs, self.pipelined(self.client, add)):
            replies += [reply] if len(group) == 1 else reply
        return replies

    def alongside(self, call: Call, queue: Callable[[Pipeline], None]) -> tuple[Any, list[Any]]:
        """Run `call` (by its source: EVAL) and the commands `queue(pipe)` adds to a pipeline,
        in one round trip on a single Redis; returns (the call's reply, the others' replies).
        A cluster pipeline runs no scripts: there the call goes apart, after them."""
        eval_args = (call.script.source.text, len(call.keys), *call.keys, *call.args)
        pipe = self.client.pipeline(transaction=False)
        queue(pipe)
        if not self.cluster:
            pipe.eval(*eval_args)
        replies = list(pipe.execute())
        return (self.client.eval(*eval_args) if self.cluster else replies.pop()), replies

    @staticmethod
    def queue(pipe: Pipeline, call: Call) -> None:
        """Add `call` to `pipe`, by its hash alone."""
        pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)

    @staticmethod
    def pipelined(client: Any, queue: Callable[[Pipeline], None]) -> list[Any]:
        """Run the commands `queue(pipe)` adds to a pipeline of `client` in one round
        trip and return their replies.

        Scripts go by their hash alone: redis-py's own pipelines first ask
        SCRIPT EXISTS, a second round trip every time. A Redis that lost them
        (a restart) answers NOSCRIPT; every script (each form) is loaded, so the
        next pipelines find theirs too, and the whole pipeline runs again,
        which its idempotent scripts allow.
        """
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            queue(pipe)
            try:
                return list(pipe.execute())
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                for script in _EVERY:
                    for source in (script.source, script.batched):
                        if source is not None:
                            client.script_load(source.text)
        raise AssertionError("unreachable")

    @property
    def publish_command(self) -> str:
        """The command that publishes a frame: sharded (SPUBLISH) on a cluster, so only the
        node of the channel's slot carries it."""
        return "SPUBLISH" if self.cluster else "PUBLISH"

    def publish(self, name: str, message: str, client: Any = None) -> Any:
        """Publish on a pub/sub channel built by Keys (with `publish_command`), through
        `client` (a pipeline) when given; returns PUBLISH's answer (the pipeline, pipelined)."""
        target = self.client if client is None else client
        return target.execute_command(self.publish_command, name, message)

    def mget(self, keys: list[str]) -> list[Any]:
        """GET of many keys in one call (spread over their nodes on a cluster)."""
        if isinstance(self.client, redis.RedisCluster):
            return list(self.client.mget_nonatomic(keys))
        return list(self.client.mget(keys))
