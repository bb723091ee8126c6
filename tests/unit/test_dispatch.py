"""How the bridge hands records over to the workers (end-to-end latency, docs/benchmarks.md):
pure logic, with a fake consumer and store."""

from __future__ import annotations

from pipeline.bridge.lost import TakenBound
from pipeline.bridge.records import OffsetGaps, pack_tasks


def test_a_poll_of_several_partitions_is_one_task_in_each_partitions_order():
    records = [(0, "a0"), (1, "b0"), (2, "c0"), (0, "a1")]
    assert list(pack_tasks(records, 100)) == [["a0", "a1", "b0", "c0"]]


def test_tasks_hold_at_most_a_batch_and_never_reorder_a_partition():
    records = [(p, f"{p}:{n}") for n in range(5) for p in (0, 1, 2)]  # 15 records, 5 per partition
    tasks = list(pack_tasks(records, 4))
    assert all(0 < len(task) <= 4 for task in tasks)
    flat = [record for task in tasks for record in task]
    assert sorted(flat) == sorted(r for _, r in records)
    for partition in (0, 1, 2):
        mine = [r for r in flat if r.startswith(f"{partition}:")]
        assert mine == [f"{partition}:{n}" for n in range(5)]


def test_pack_tasks_of_nothing_is_no_task():
    assert list(pack_tasks([], 100)) == []


def test_offsets_a_partition_skipped_within_an_assignment_are_named():
    gaps = OffsetGaps()
    assert gaps.see(6, 170) is None  # the first record of an assignment has nothing before it
    assert [gaps.see(6, o) for o in (171, 172, 173, 174)] == [None] * 4
    assert gaps.see(6, 177) == (175, 176)  # what bench/e2e.py saw stay `accepted`
    assert gaps.see(6, 178) is None and gaps.see(7, 40) is None  # partitions apart
    gaps.forget([6])
    assert gaps.see(6, 500) is None  # a new assignment resumes from its committed offset
    assert gaps.see(7, 42) == (41, 41)


def test_a_bound_counts_once_it_is_a_grace_old_and_only_a_higher_one_adds_to_it():
    # pipeline/bridge/lost.py: what a bound covers is lost only once its takers had time to record.
    now = [0.0]
    bound = TakenBound(grace=2.0, clock=lambda: now[0])
    bound.see(100.0)
    assert bound.settle() is None and bound.highest == 100.0
    now[0] = 1.0
    bound.see(99.0)  # lower: adds nothing
    bound.see(105.0)
    now[0] = 2.0
    assert bound.settle() == 100.0
    now[0] = 3.0
    assert bound.settle() == 105.0 and bound.highest == 105.0
