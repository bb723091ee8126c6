"""Bridging blocking C clients and gevent.

The web process runs under gevent (many WebSockets per process), but
confluent-kafka's calls block in C and never yield to the gevent hub. Its
blocking calls therefore run in native threads, and their results come back
to greenlets through a thread-safe hub watcher. In processes without gevent
the same API is plain threading.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

T = TypeVar("T")


class Pending(Protocol):
    """A future `ResultChannel.future` made: gevent's AsyncResult or a concurrent.futures.Future."""

    def set_exception(self, error: BaseException) -> None: ...


def gevent_active() -> bool:
    """True when this process has monkey-patched threading with gevent."""
    try:
        from gevent import monkey
    except ImportError:  # gevent is optional outside the web process
        return False
    return bool(monkey.is_module_patched("threading"))


def start_native_thread(target: Callable[[], object], name: str) -> None:
    """Start `target` in a real OS thread, even under gevent monkey-patching."""
    if gevent_active():
        from gevent import monkey

        monkey.get_original("_thread", "start_new_thread")(target, ())
    else:
        threading.Thread(target=target, name=name, daemon=True).start()


def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """Call a function that blocks in C without stalling the gevent hub."""
    if gevent_active():
        import gevent

        # Hand the exception back as a value: gevent's pool would print a
        # traceback for every one raised inside it.
        def call() -> tuple[bool, Any]:
            try:
                return False, fn(*args)
            except Exception as exc:  # re-raised in the caller's greenlet
                return True, exc

        failed, value = gevent.get_hub().threadpool.apply(call)
        if failed:
            raise value
        return cast(T, value)
    return fn(*args)


class ResultChannel:
    """Makes futures that a native thread can resolve and a greenlet or thread can wait on."""

    def __init__(self) -> None:
        self._green = gevent_active()
        self._done: collections.deque[tuple[Any, object, BaseException | None]] = collections.deque()
        if self._green:
            import gevent

            self._watcher = gevent.get_hub().loop.async_()
            self._watcher.start(self._drain)

    def future(self) -> Pending:
        """A new unresolved future, for `resolve` and `wait`."""
        if self._green:
            from gevent.event import AsyncResult

            return cast(Pending, AsyncResult())
        return concurrent.futures.Future[object]()

    def resolve(self, future: Pending, value: object = None, error: BaseException | None = None) -> None:
        """Resolve `future` from any thread."""
        if self._green:
            self._done.append((future, value, error))
            self._watcher.send()
        elif error is not None:
            future.set_exception(error)
        else:
            cast("concurrent.futures.Future[object]", future).set_result(value)

    def wait(self, future: Pending, timeout: float) -> Any:
        """The future's value; raises TimeoutError when it is not resolved in time."""
        if self._green:
            import gevent

            try:
                return cast(Any, future).get(timeout=timeout)
            except gevent.Timeout:
                raise TimeoutError from None
        try:
            return cast("concurrent.futures.Future[object]", future).result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError from None

    def _drain(self) -> None:
        # Runs in the hub's own thread, where touching AsyncResult is safe.
        while self._done:
            future, value, error = self._done.popleft()
            if error is not None:
                future.set_exception(error)
            else:
                future.set(value)
