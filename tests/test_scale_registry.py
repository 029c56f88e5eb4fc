"""The registry hands out free partitions from a heap (issue 16: no scan of every partition per
registration), with the same answers as before: the lowest free one, a freed one again, a dead
worker's when none is free, 409 when all are held by live workers. A real SQLite store."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fedfleet.coordinator.registry import Registry
from fedfleet.errors import RequestRejected
from fedfleet.storage.sqlite import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state.sqlite")


def test_workers_get_the_lowest_free_partition_and_a_freed_one_comes_back(store: Store) -> None:
    reg = Registry(store, partitions=5, worker_timeout=30.0, known=[])
    ws = [reg.register(None, f"w{i}") for i in range(4)]
    assert [w.partition for w in ws] == [0, 1, 2, 3]
    reg.remove(ws[1].worker_id)
    assert reg.register(None, "again").partition == 1
    assert reg.register(None, "last").partition == 4
    assert sorted(r.partition for r in store.workers()) == [0, 1, 2, 3, 4]


def test_when_none_is_free_the_longest_dead_workers_partition_is_taken_over(store: Store) -> None:
    reg = Registry(store, partitions=3, worker_timeout=30.0, known=[])
    ws = [reg.register(None, f"w{i}") for i in range(3)]
    with pytest.raises(RequestRejected, match="all 3 partitions are taken by live workers") as info:
        reg.register(None, "one too many")
    assert info.value.status == 409
    ws[2].last_seen = time.monotonic() - 100
    ws[0].last_seen = time.monotonic() - 60
    assert reg.register(None, "newcomer").partition == 2
    assert ws[2].worker_id not in reg.workers
    # A freed partition is handed out before any dead worker's.
    reg.remove(ws[1].worker_id)
    assert reg.register(None, "after a removal").partition == 1


def test_a_restarted_coordinator_knows_which_partitions_are_held(store: Store) -> None:
    first = Registry(store, partitions=4, worker_timeout=30.0, known=[])
    for name in ("a", "b", "c"):
        first.register(None, name)
    first.remove(next(w.worker_id for w in first.workers.values() if w.name == "b"))
    again = Registry(store, partitions=4, worker_timeout=30.0, known=store.workers())
    assert again.register(None, "d").partition == 1
    assert again.register(None, "e").partition == 3


def test_register_many_takes_the_lowest_free_partitions_and_refuses_too_many(store: Store) -> None:
    reg = Registry(store, partitions=6, worker_timeout=30.0, known=[])
    reg.register(None, "solo")
    added = reg.register_many(["x", "y", "z"])
    assert [w.partition for w in added] == [1, 2, 3]
    with pytest.raises(RequestRejected, match="3 workers asked to join but only 2 of the 6 partitions are free"):
        reg.register_many(["p", "q", "r"])
    assert reg.register(None, "next").partition == 4
    assert len(store.workers()) == 5
