"""The logic of web/authorize.py without an endpoint: the answer cache, single-flight,
the bound on concurrent calls, the policy on failure, the signature and the answer's form.
The HTTP side is tested against a real endpoint in tests/integration/test_authorize.py."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time

import pytest

from pipeline.webhooks.signing import signature
from web.authorize import Answers, AuthorizeFailed, AuthorizeUnavailable, BadAnswer, Decider, SingleFlight, _allow


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_answers_expire_after_the_ttl_and_denials_are_kept_too():
    clock = Clock()
    answers = Answers(ttl=10, clock=clock)
    answers.put("a", True)
    answers.put("b", False)
    assert answers.get("a") is True and answers.get("b") is False
    clock.now += 9.9
    assert answers.get("b") is False
    clock.now += 0.2
    assert answers.get("a") is None and answers.get("b") is None
    assert len(answers) == 0  # expired entries go when read


def test_answers_with_ttl_zero_keep_nothing():
    answers = Answers(ttl=0)
    answers.put("a", True)
    assert answers.get("a") is None and len(answers) == 0


def test_answers_are_bounded_dropping_the_least_recently_used():
    answers = Answers(ttl=60, max_entries=3)
    for key in "abc":
        answers.put(key, True)
    assert answers.get("a") is True  # used: "b" is now the oldest
    answers.put("d", False)
    assert len(answers) == 3
    assert answers.get("b") is None
    assert [answers.get(k) for k in "acd"] == [True, True, False]


def test_single_flight_makes_one_call_for_concurrent_identical_questions():
    flights, release, calls = SingleFlight(), threading.Event(), []

    def call():
        calls.append(1)
        release.wait(5)
        return True

    results = []
    threads = [threading.Thread(target=lambda: results.append(flights.do("k", call, 5))) for _ in range(20)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # every thread is waiting on the first one's call
    release.set()
    for thread in threads:
        thread.join(5)
    assert calls == [1] and results == [True] * 20 and len(flights) == 0


def test_single_flight_hands_the_failure_to_every_waiter_and_forgets_the_key():
    flights, release = SingleFlight(), threading.Event()

    def call():
        release.wait(5)
        raise AuthorizeFailed("boom")

    errors = []

    def run():
        try:
            flights.do("k", call, 5)
        except AuthorizeFailed as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=run) for _ in range(5)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    release.set()
    for thread in threads:
        thread.join(5)
    assert len(errors) == 5 and "boom" in errors[0]
    assert flights.do("k", lambda: False, 1) is False  # a new call: failures are not remembered


def test_a_waiter_waits_no_longer_than_its_bound():
    flights, release = SingleFlight(), threading.Event()
    leader = threading.Thread(target=lambda: flights.do("k", lambda: release.wait(5), 5))
    leader.start()
    time.sleep(0.1)
    started = time.monotonic()
    with pytest.raises(AuthorizeFailed):
        flights.do("k", lambda: True, 0.2)
    assert time.monotonic() - started < 1
    release.set()
    leader.join(5)


def test_decider_caches_answers_and_denials_but_not_failures():
    asked = []

    def ask(user, op, channel, seconds):
        asked.append((user, op, channel))
        if channel == "broken":
            raise AuthorizeFailed("500")
        return channel == "yes"

    decider = Decider(ask, ttl=60, timeout=1, on_failure=False)
    for _ in range(3):
        assert decider.decide("u", "subscribe", "yes") is True
        assert decider.decide("u", "subscribe", "no") is False
        with pytest.raises(AuthorizeUnavailable):
            decider.decide("u", "subscribe", "broken")
    assert asked.count(("u", "subscribe", "yes")) == 1
    assert asked.count(("u", "subscribe", "no")) == 1
    assert asked.count(("u", "subscribe", "broken")) == 3
    # The key is the user, the op and the channel: another of any asks again.
    assert decider.decide("v", "subscribe", "yes") and decider.decide("u", "publish", "yes")
    assert len(asked) == 7


def test_no_answer_follows_the_policy_deny_as_unavailable_allow_as_allowed():
    def ask(user, op, channel, seconds):
        raise ValueError("not even an AuthorizeFailed")

    # Denied by the policy, the op is refused as an outage: a client retries it, its socket stays.
    with pytest.raises(AuthorizeUnavailable):
        Decider(ask, ttl=60, timeout=1, on_failure=False).decide("u", "subscribe", "c")
    assert Decider(ask, ttl=60, timeout=1, on_failure=True).decide("u", "subscribe", "c") is True


@pytest.mark.parametrize("on_failure", [False, True])
def test_an_answer_that_is_not_one_is_denied_whatever_the_policy(on_failure):
    # A 401 from a secret the endpoint does not share must not open every channel under ALLOW.
    def ask(user, op, channel, seconds):
        raise BadAnswer("status 401")

    assert Decider(ask, ttl=60, timeout=1, on_failure=on_failure).decide("u", "subscribe", "c") is False


def test_decider_bounds_concurrent_calls_and_the_excess_fails_within_the_timeout():
    release, running = threading.Event(), []

    def ask(user, op, channel, seconds):
        running.append(channel)
        release.wait(5)
        return True

    decider = Decider(ask, ttl=60, timeout=0.3, on_failure=False, max_calls=2)
    results = {}
    threads = [threading.Thread(target=lambda c=c: results.__setitem__(c, decider.decide("u", "subscribe", c)))
               for c in ("a", "b")]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    started = time.monotonic()
    with pytest.raises(AuthorizeUnavailable):  # no free call within 0.3 s: the policy (deny)
        decider.decide("u", "subscribe", "c")
    assert 0.2 < time.monotonic() - started < 1
    assert sorted(running) == ["a", "b"]
    release.set()
    for thread in threads:
        thread.join(5)
    assert results == {"a": True, "b": True}
    assert decider.decide("u", "subscribe", "c") is True  # a slot is free again


def test_decider_gives_ask_what_is_left_of_the_timeout():
    seen = []
    Decider(lambda *args: seen.append(args[3]) or True, ttl=0, timeout=0.5, on_failure=False).decide("u", "p", "c")
    assert 0.4 < seen[0] <= 0.5


def test_signature_is_hmac_sha256_over_timestamp_dot_body():
    body = b'{"user":"u","channel":"c","op":"subscribe"}'
    header = signature("k" * 32, body, 1700000000)
    expected = hmac.new(b"k" * 32, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"


@pytest.mark.parametrize("raw, allow", [(b'{"allow": true}', True), (b'{"allow":false,"why":"x"}', False)])
def test_an_answer_is_an_object_with_a_boolean_allow(raw, allow):
    assert _allow(raw) is allow


@pytest.mark.parametrize("raw", [b"yes", b"", b"[true]", b'{"allow": 1}', b'{"allow": "true"}', b"{}", b"\xff"])
def test_anything_else_is_a_failure(raw):
    with pytest.raises(AuthorizeFailed):
        _allow(raw)
