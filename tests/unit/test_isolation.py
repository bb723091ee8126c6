"""What the task does with a batch that failed for a reason that is not transient
(tasks/__init__.py: `_isolate`, `_pass_gate`), with a fake processor and broker: pure logic."""

from __future__ import annotations

import pytest

from pipeline.messages import Envelope
from tests.harness import SECRET


class FakeProcessor:
    def __init__(self):
        self.letters = []

    def dead_letter_first(self, envelopes, error, attempts):
        self.letters.append((envelopes[0].id, error, attempts))


@pytest.fixture
def task_module(monkeypatch):
    """`tasks`, its processor and broker replaced; returns (module, fake processor, sent batches)."""
    monkeypatch.setenv("HERALD_SECRET_KEY", SECRET)  # `tasks` reads this process's settings on import
    import tasks

    fake, sent = FakeProcessor(), []
    monkeypatch.setattr(tasks, "_processor", fake)
    monkeypatch.setattr(tasks, "_send", lambda envelopes, **options: sent.append(list(envelopes)))
    return tasks, fake, sent


def envelope(n: int, **fields) -> Envelope:
    return Envelope(id=f"m-{n}", channel=f"c:{n % 2}", type="message", data={"n": n}, sender="x", ts=1,
                    partition=0, offset=n, prev=n - 2 if n >= 2 else None, **fields)


def test_a_batch_that_failed_is_split_into_one_task_a_message_and_nothing_is_dead_lettered(task_module):
    tasks, fake, sent = task_module
    batch = [envelope(n) for n in range(4)]
    assert tasks._isolate(batch, ValueError("bad"), attempts=1) == {"split": 4}
    assert sent == [[e] for e in batch] and fake.letters == []


def test_a_message_that_failed_alone_is_dead_lettered_with_its_reason_and_passes_its_gate_without_its_data(
        task_module):
    tasks, fake, sent = task_module
    alone = envelope(3, rules={"v": 1, "alert": ["a"]})
    assert tasks._isolate([alone], OverflowError("int too large to convert to float"), attempts=2) == {"dead": 1}
    assert fake.letters == [("m-3", "OverflowError: int too large to convert to float", 2)]
    [[passing]] = sent
    assert passing.skip and passing.data is None and passing.rules is None
    assert (passing.id, passing.channel, passing.offset, passing.prev) == ("m-3", "c:1", 3, 1)


def test_a_dead_lettered_message_that_cannot_even_pass_its_gate_is_not_dead_lettered_again(task_module):
    tasks, fake, sent = task_module
    passing = envelope(5, skip=True)
    assert tasks._isolate([passing], RuntimeError("a bug"), attempts=1) == {"dead": 0}
    assert fake.letters == [] and sent == []


def test_after_the_last_retry_the_rest_of_the_batch_goes_on_behind_the_dead_letter(task_module):
    tasks, _fake, sent = task_module
    batch = [envelope(n) for n in range(3)]
    tasks._pass_gate(batch)
    [[first, *rest]] = sent
    assert first.skip and first.data is None and rest == batch[1:]


def test_a_message_that_only_passes_its_gate_is_never_dead_lettered_again():
    from pipeline.processing import Processor

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
