"""What the task does with a batch that failed for a reason that is not transient
(tasks/redelivery.py: `Redelivery.isolate`, `pass_gate`), with a fake processor, task and broker: pure logic."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import redis
import sqlalchemy.exc
from celery.exceptions import Retry
from kombu.exceptions import OperationalError

from pipeline.core.messages import Envelope


class FakeProcessor:
    def __init__(self):
        self.letters = []
        self.fail = None  # raised by the next dead letter, when set

    def dead_letter_first(self, envelopes, error, attempts):
        if self.fail is not None:
            raise self.fail
        self.letters.append((envelopes[0].id, error, attempts))

    def run(self, envelopes, take_on=True):
        from tasks.processor import Outcome

        self.took_on = take_on
        return Outcome(delivered=len(envelopes), due=[envelope(7), envelope(9)])


class FakeTask:
    """Celery's bound task as `process_message` uses it: `retry` raises Retry and is recorded."""

    def __init__(self, retries=0):
        self.request = SimpleNamespace(retries=retries, id="task-1")
        self.retried = []  # (envelopes, max_retries)

    def retry(self, *, args, countdown, max_retries, exc):
        self.retried.append(([Envelope.from_wire(w) for w in args[0]], max_retries))
        raise Retry(exc=exc, when=countdown)


@pytest.fixture
def policy():
    """The task's `Redelivery` with a fake processor and broker; returns (it, fake processor, sent batches)."""
    from tasks.redelivery import Redelivery

    settings = SimpleNamespace(max_redeliveries=3, retry_max_delay=60.0, amqp_broker=False)
    fake, sent = FakeProcessor(), []
    return Redelivery(settings, lambda: fake, lambda envelopes, **options: sent.append(list(envelopes))), fake, sent


def envelope(n: int, **fields) -> Envelope:
    return Envelope(id=f"m-{n}", channel=f"c:{n % 2}", type="message", data={"n": n}, sender="x", ts=1,
                    partition=0, offset=n, prev=n - 2 if n >= 2 else None, **fields)


def test_after_a_worker_death_a_message_runs_without_taking_its_channels_parked_records_on(policy):
    # Each parked record due goes on in a task of its own: one that kills workers is isolated too.
    redelivery, fake, sent = policy
    assert redelivery.after_worker_loss(FakeTask(), [envelope(1)], deaths=1) == {
        "delivered": 1, "duplicate": 0, "skipped": 0, "dead": 0, "parked": 0, "handed_on": 2}
    assert fake.took_on is False and sent == [[envelope(7)], [envelope(9)]]


def test_a_batch_that_failed_is_split_into_one_task_a_message_and_nothing_is_dead_lettered(policy):
    redelivery, fake, sent = policy
    batch = [envelope(n) for n in range(4)]
    assert redelivery.isolate(FakeTask(), batch, ValueError("bad"), attempts=1) == {"split": 4}
    assert sent == [[e] for e in batch] and fake.letters == []


def test_a_message_that_failed_alone_is_dead_lettered_with_its_reason_and_passes_its_gate_without_its_data(
        policy):
    redelivery, fake, sent = policy
    alone = envelope(3, rules={"v": 1, "alert": ["a"]})
    failure = OverflowError("int too large to convert to float")
    assert redelivery.isolate(FakeTask(), [alone], failure, attempts=2) == {"dead": 1}
    assert fake.letters == [("m-3", "OverflowError: int too large to convert to float", 2)]
    [[passing]] = sent
    assert passing.skip and passing.data is None and passing.rules is None
    assert (passing.id, passing.channel, passing.offset, passing.prev) == ("m-3", "c:1", 3, 1)


def test_a_dead_lettered_message_that_cannot_even_pass_its_gate_is_retried_without_limit_never_dead_lettered(
        policy):
    redelivery, fake, sent = policy
    passing, task = envelope(5, skip=True), FakeTask(retries=8)  # past HERALD_RETRY_MAX
    with pytest.raises(Retry):  # acked, it would stall its channel until HERALD_ORDER_WAIT
        redelivery.isolate(task, [passing], RuntimeError("a bug"), attempts=9)
    assert task.retried == [([passing], math.inf)] and fake.letters == [] and sent == []


@pytest.mark.parametrize("failure", [RuntimeError("mark_failed: a bug"), redis.ResponseError("MISCONF disk full"),
                                     OperationalError("broker refused")])
def test_a_message_whose_dead_letter_fails_is_retried_as_it_came_whatever_the_error(policy, failure):
    redelivery, fake, sent = policy
    alone, task = envelope(3), FakeTask(retries=8)
    fake.fail = failure
    with pytest.raises(Retry):  # whatever the error: never the task left given up, acked
        redelivery.isolate(task, [alone], ValueError("its data"), attempts=9)
    assert task.retried == [([alone], math.inf)] and sent == []


def test_a_gate_pass_the_broker_refuses_is_retried_without_the_message_which_is_dead_lettered_once(
        policy, monkeypatch):
    redelivery, fake, _sent = policy

    def refused(envelopes, **options):
        raise OperationalError("broker refused")

    monkeypatch.setattr(redelivery, "send", refused)
    alone, task = envelope(3), FakeTask()
    with pytest.raises(Retry):
        redelivery.isolate(task, [alone], ValueError("its data"), attempts=1)
    [([onward], limit)] = task.retried  # the gate pass alone: run again, the message would be dead-lettered twice
    assert onward.skip and onward.data is None and onward.id == alone.id and limit == math.inf
    assert [letter[0] for letter in fake.letters] == ["m-3"]


def test_a_split_the_broker_refuses_half_way_retries_the_messages_not_sent(policy, monkeypatch):
    redelivery, fake, sent = policy
    batch = [envelope(n) for n in range(4)]

    def refused_after_two(envelopes, **options):
        if len(sent) == 2:
            raise OperationalError("broker refused")
        sent.append(list(envelopes))

    monkeypatch.setattr(redelivery, "send", refused_after_two)
    task = FakeTask()
    with pytest.raises(Retry):
        redelivery.isolate(task, batch, ValueError("bad"), attempts=1)
    assert sent == [[batch[0]], [batch[1]]] and task.retried == [(batch[2:], math.inf)] and fake.letters == []


def test_after_the_last_retry_the_rest_of_the_batch_goes_on_behind_the_dead_letter(policy):
    redelivery, _fake, sent = policy
    batch = [envelope(n) for n in range(3)]
    redelivery.pass_gate(FakeTask(), batch)
    [[first, *rest]] = sent
    assert first.skip and first.data is None and rest == batch[1:]


def test_a_message_that_only_passes_its_gate_is_never_dead_lettered_again():
    from tasks.processor import Processor

    class Letters:
        def __init__(self):
            self.sent = []

        def send(self, **letter):
            self.sent.append(letter["envelope"].id)

    class Store:
        def mark_failed(self, envelope, error):
            pass

    letters = Letters()
    processor = Processor(None, Store(), None, letters)
    processor.dead_letter_first([envelope(1, skip=True), envelope(2)], "worker died 4 times", attempts=5)
    processor.dead_letter_first([envelope(3)], "worker died 4 times", attempts=5)
    assert letters.sent == ["m-3"]  # the first's letter, with its data, stays as it was


@pytest.mark.parametrize("failure", [
    redis.ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist"),
    redis.ResponseError("NOREPLICAS Not enough good replicas to write."),
    redis.ResponseError("BUSY Redis is busy running a script."),
    sqlalchemy.exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached"),
    sqlalchemy.exc.InterfaceError("SELECT 1", {}, Exception("connection already closed")),
])
def test_a_service_that_fails_whatever_its_error_is_retried_and_no_message_is_dead_lettered_for_it(failure):
    from tasks.processor import Processor, RetryLater

    class Store:
        def mark_processing(self, envelopes):
            raise failure

    class Letters:
        def send(self, **letter):
            raise AssertionError("dead-lettered for a service's fault")

    settings = SimpleNamespace(order_wait=30.0, message_types=())
    batch = [envelope(n) for n in range(3)]
    with pytest.raises(RetryLater) as pending:  # not isolated and dead-lettered, message by message
        Processor(settings, Store(), None, Letters()).run(batch)
    assert pending.value.remaining == batch and pending.value.cause is failure


@pytest.mark.parametrize("failure", [sqlalchemy.exc.TimeoutError("QueuePool limit reached"),
                                     sqlalchemy.exc.InterfaceError("INSERT", {}, Exception("closed"))])
def test_the_archive_reports_any_database_failure_as_transient(failure, monkeypatch):
    from pipeline.archive import Archive
    from pipeline.core.errors import TransientError

    archive = Archive("sqlite://", None)

    def failing():
        raise failure

    monkeypatch.setattr(archive.engine, "begin", failing)
    with pytest.raises(TransientError):
        archive.store([envelope(1)])
    with pytest.raises(TransientError):
        archive.record_offsets([("m-1", "1-0")])


def test_records_that_passed_their_gate_before_a_failure_are_never_dead_lettered(policy):
    from pipeline.store.gate import PassResult
    from tasks.processor import PassedGate, Processor

    class Store:
        def mark_processing(self, envelopes):
            return ["processing"] * len(envelopes)

        def deliver(self, envelopes):
            return [PassResult("delivered", f"{n}-0", False) if n < 2 else PassResult("parked", "", False)
                    for n in range(len(envelopes))]

    class Archive:
        def store(self, envelopes):
            pass

        def record_offsets(self, placed):
            raise ValueError("a bug after delivery")

    settings = SimpleNamespace(order_wait=30.0, message_types=())
    batch = [envelope(n) for n in range(3)]
    with pytest.raises(PassedGate) as failed:
        Processor(settings, Store(), Archive(), None).run(batch)
    assert failed.value.passed == {"m-0", "m-1"} and isinstance(failed.value.cause, ValueError)

    redelivery, fake, sent = policy
    task = FakeTask()
    # Delivered (a replay would deliver them twice) or parked (safe at its gate): none is dead-lettered.
    assert redelivery.isolate(task, batch, failed.value, attempts=1) == {"dead": 0, "handed_on": 0}
    assert fake.letters == [] and task.retried == [] and sent == []
    # Failing while it took parked records on: those go on, each alone, so that one at fault runs alone.
    due = [envelope(n) for n in (7, 9)]
    assert redelivery.isolate(task, batch, PassedGate({"m-0"}, ValueError("bug"), due), attempts=1) == {
        "dead": 0, "handed_on": 2}
    assert sent == [[due[0]], [due[1]]] and fake.letters == []
