"""The rule set in force: kept in Redis, replaced whole, picked up by every worker.

The set is one hash (`version`, `doc`), so a reader gets a whole version or
the one before it, never half of one. A replacement publishes a notice the
workers listen for; each also reads the version at most every
`VERSION_CHECK` seconds, at a batch's start, in case a notice was lost, and
compiles a new version once (docs/guide.md: "Rules").

A worker applies exactly the version it compiled, and says so
(`herald_rules_version`). A stored version it cannot compile (written by an
older Herald, or into Redis by hand: PUT refuses such sets) is logged once
and counted (`herald_rules_compile_failures_total`); the worker keeps the last
version it compiled. With none compiled yet it fails closed: its batches
raise RulesUnavailable, a transient error, and are retried as when Redis is
down, never run without the policy. Such a wait does not count against a message's
retries (`tasks.redelivery.Redelivery.await_rules`): none is dead-lettered for it, however long.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import redis
from prometheus_client import Counter, Gauge

from pipeline import rules
from pipeline.core.errors import TransientError

log = logging.getLogger("herald.rules")
VERSION_CHECK = 0.5  # seconds between version reads in a worker; a notice makes the next batch read at once
VERSION = Gauge("herald_rules_version", "Version of the rule set this process applies (compiled)",
                multiprocess_mode="max")
COMPILE_FAILURES = Counter("herald_rules_compile_failures_total",
                           "Stored rule set versions this process could not compile (it keeps the last it compiled)")

# KEYS: the rules hash. ARGV: normalised doc, notice channel, '1' to write only
# when no set is stored (HERALD_RULES_FILE at start-up). Returns the new
# version, or 0 when a set was there and ARGV[3] was '1'.
_PUT = """
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'doc', ARGV[1])
redis.call('PUBLISH', ARGV[2], version)
return version
"""


class RulesUnavailable(TransientError):
    """The stored rule set cannot be compiled and this process has compiled none: its
    messages wait (are retried) rather than pass without the policy."""


class RulesStore:
    """Reads and replaces the stored rule set, and keeps a worker's compiled set in force
    (the rules step, step.py, applies it)."""

    def __init__(self, store, settings):
        self.store = store
        self.settings = settings
        self._put = store.redis.register_script(_PUT)
        self._set: rules.RuleSet | None = None  # None: no rules (an empty set), or none compiled yet
        self._version: int | None = None  # the version compiled; None until one is
        self._refused: int | None = None  # the stored version that could not be compiled
        self._refusal = ""
        self._checked = 0.0
        self._notified = threading.Event()
        self._listener = None
        self._file_loaded = False

    # -- the stored set --------------------------------------------------------------
    def put(self, doc: dict, *, only_if_none: bool = False) -> int:
        """Replace the set with `doc` (validated, normal form) atomically; returns its version
        (0 when `only_if_none` and a set is stored)."""
        return int(self._put(keys=[self.store.keys.rules],
                             args=[json.dumps(doc, separators=(",", ":")), self.store.keys.rules_notice,
                                   "1" if only_if_none else "0"]))

    def get(self) -> tuple[int, dict]:
        """(version, doc) of the stored set; (0, no rules) when none is."""
        version, doc = self.store.redis.hmget(self.store.keys.rules, ["version", "doc"])
        if not version:
            return 0, {"rules": []}
        return int(version), json.loads(doc)

    def load_file(self) -> int:
        """Store HERALD_RULES_FILE's set when none is stored; returns the version stored (0: none).
        A bad file raises RulesError: the process must not run a policy it cannot read."""
        path = self.settings.rules_file
        if not path:
            return 0
        with open(path, "rb") as fh:
            text = fh.read()
        rule_set = rules.compile_text(text, "application/json" if path.endswith(".json") else "application/yaml",
                                      0, self.settings.rules_timezone)
        return self.put(rule_set.doc, only_if_none=True)

    # -- the set a worker has compiled ---------------------------------------------------
    def current(self) -> rules.RuleSet | None:
        """The compiled set in force (None when there are no rules), read again when a
        notice came or VERSION_CHECK passed; compiled once per version. Raises
        RulesUnavailable while the stored set cannot be compiled and none was before."""
        now = time.monotonic()
        if self._notified.is_set() or now - self._checked >= VERSION_CHECK:
            self._notified.clear()
            self._checked = now
            self._listen()
            if not self._file_loaded:
                self._load_file_once()
            version = int(self.store.redis.hget(self.store.keys.rules, "version") or 0)
            if version not in (self._version, self._refused):
                self._compile_stored()
        if self._version is None:
            raise RulesUnavailable(self._refusal)
        return self._set

    def _compile_stored(self) -> None:
        # One HMGET: a whole version, never half of one. The version is set only
        # once its set compiled: a worker never claims a version it does not apply.
        version, text = self.store.redis.hmget(self.store.keys.rules, ["version", "doc"])
        version = int(version or 0)
        try:
            rule_set = rules.compile_text(text or "{}", "application/json", version, self.settings.rules_timezone)
        except Exception as exc:
            # Not RulesError alone: any other error here would fail every batch
            # of this worker, none of them at fault, for as long as the set stays.
            error = str(exc) if isinstance(exc, rules.RulesError) else f"{type(exc).__name__}: {exc}"
            self._refused = version
            self._refusal = f"the stored rule set (version {version}) cannot be compiled: {error}"
            COMPILE_FAILURES.inc()
            log.error("rules not applied: the stored set cannot be compiled",
                      extra={"version": version, "applied_version": self._version, "error": error})
            return
        self._version, self._refused = version, None
        self._set = rule_set if len(rule_set) else None
        VERSION.set(version)
        log.info("rules applied", extra={"version": version, "rules": len(rule_set)})

    def _load_file_once(self) -> None:
        try:
            self.load_file()
        except redis.RedisError:
            raise  # transient: the file is read again at the next batch
        except Exception as exc:
            # Raised, it would fail every batch, none of them at fault (a file gone, a bug).
            log.error("HERALD_RULES_FILE refused", extra={"error": str(exc)})
        self._file_loaded = True

    def _listen(self) -> None:
        # A thread per process listening for notices; on a cluster, and while it
        # is down, the VERSION_CHECK reads alone pick a new version up.
        if self._listener is not None or self.store.cluster:
            return
        try:
            pubsub = self.store.redis.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(**{self.store.keys.rules_notice: lambda _message: self._notified.set()})
            self._listener = pubsub.run_in_thread(sleep_time=1.0, daemon=True,
                                                  exception_handler=self._listener_failed)
        except redis.RedisError as exc:
            log.warning("rules notices not received", extra={"error": str(exc)})

    def _listener_failed(self, exc, pubsub, thread) -> None:
        log.warning("rules notices not received", extra={"error": str(exc)})
        thread.stop()
        pubsub.close()
        self._listener = None

