"""Checkpoints, atomic writes and the SQLite store."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfleet.errors import StorageError
from fedfleet.protocol import codec
from fedfleet.storage.checkpoints import Checkpoints
from fedfleet.storage.files import write_atomic, write_text_atomic
from fedfleet.storage.records import RoundRecord, RoundTimings
from fedfleet.storage.sqlite import RunRow, Store, WorkerRow

# --- write_atomic --------------------------------------------------------------------------------


def test_write_atomic_writes_all_parts_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "file.bin"  # parents are created
    parts = [b"head", memoryview(b"-middle-"), bytearray(b"tail")]
    assert write_atomic(path, parts) == len(b"head-middle-tail")
    assert path.read_bytes() == b"head-middle-tail"
    assert os.listdir(path.parent) == ["file.bin"]


def test_write_atomic_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    write_text_atomic(path, "first version, longer")
    write_text_atomic(path, "second")
    assert path.read_text() == "second"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_atomic(path, [b"old contents"])

    def parts() -> Iterator[bytes]:
        yield b"new, half"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, parts())
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["model.safetensors"]


# --- checkpoints ---------------------------------------------------------------------------------

def model(round: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(round)
    return {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": np.arange(4, dtype=np.int64) * round,
            "s": np.array(round, dtype=np.float64)}


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    ckpt = Checkpoints(tmp_path / "checkpoints")
    assert ckpt.rounds() == []  # the folder does not exist yet
    weights = model(7)
    path = ckpt.save(7, codec.encode_parts(weights, {"round": "7"}))
    assert path == tmp_path / "checkpoints" / "round-000007.safetensors"
    loaded, meta = ckpt.load(7)
    assert meta == {"round": "7"}
    assert list(loaded) == list(weights)
    for name, array in weights.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        assert loaded[name].tobytes() == array.tobytes()
        assert loaded[name].flags.writeable  # a copy, not a view of the file's bytes


def test_only_the_newest_keep_checkpoints_are_kept(tmp_path: Path) -> None:
    ckpt = Checkpoints(tmp_path, keep=3)
    for r in (1, 2, 3, 4, 5):
        ckpt.save(r, codec.encode_parts(model(r)))
        assert ckpt.rounds() == list(range(max(1, r - 2), r + 1))
    assert sorted(os.listdir(tmp_path)) == [f"round-{r:06d}.safetensors" for r in (3, 4, 5)]
    for r in (3, 4, 5):
        assert ckpt.load(r)[0]["b"].tolist() == model(r)["b"].tolist()


def test_keep_one(tmp_path: Path) -> None:
    ckpt = Checkpoints(tmp_path, keep=1)
    for r in (10, 11, 12):
        ckpt.save(r, codec.encode_parts(model(r)))
    assert ckpt.rounds() == [12]


def test_rounds_ignores_other_files(tmp_path: Path) -> None:
    ckpt = Checkpoints(tmp_path)
    ckpt.save(2, codec.encode_parts(model(2)))
    for name in ("round-2.safetensors", "round-000003.safetensors.tmp", "notes.txt", ".round-000004.safetensors.1.tmp"):
        (tmp_path / name).write_bytes(b"x")
    assert ckpt.rounds() == [2]


def test_loading_a_missing_or_corrupt_checkpoint_raises_storage_error(tmp_path: Path) -> None:
    ckpt = Checkpoints(tmp_path)
    with pytest.raises(StorageError, match=r"round-000004\.safetensors"):
        ckpt.load(4)
    encoded = codec.encode(model(5))
    ckpt.path(5).write_bytes(encoded[:-3])
    with pytest.raises(StorageError, match=r"round-000005\.safetensors.*header describes"):
        ckpt.load(5)


# --- the SQLite store ----------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state" / "fedfleet.db")
    yield s
    s.close()


def test_run_lifecycle(store: Store) -> None:
    assert store.run() is None
    store.create_run("run-1", "rounds = 3\n")
    assert store.run() == RunRow("run-1", "rounds = 3\n", "waiting", "")
    store.set_state("running")
    assert store.run() == RunRow("run-1", "rounds = 3\n", "running", "")
    store.set_state("failed", "quorum missed 3 times")
    assert store.run() == RunRow("run-1", "rounds = 3\n", "failed", "quorum missed 3 times")


def test_creating_the_run_twice_raises_storage_error(store: Store) -> None:
    store.create_run("run-1", "")
    with pytest.raises(StorageError, match=r"UNIQUE|PRIMARY"):
        store.create_run("run-1", "")


def test_state_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    first = Store(path)
    first.create_run("r", "cfg")
    first.put_worker("w1", 0, "host-a")
    first.record_round(record(1), ["w1"])
    first.close()
    second = Store(path)
    try:
        assert second.run() == RunRow("r", "cfg", "waiting", "")
        assert [(w.worker_id, w.rounds_served) for w in second.workers()] == [("w1", 1)]
        assert [r.round for r in second.rounds()] == [1]
    finally:
        second.close()


def test_put_worker_and_evict(store: Store) -> None:
    store.put_worker("w-b", 1, "host-b")
    store.put_worker("w-a", 0, "host-a")
    rows = store.workers()
    assert [(w.worker_id, w.partition, w.name, w.rounds_served) for w in rows] == [
        ("w-a", 0, "host-a", 0), ("w-b", 1, "host-b", 0)]  # ordered by partition
    assert all(isinstance(w, WorkerRow) and w.registered > 0 for w in rows)

    # Re-registering updates the name only; the partition stays.
    store.put_worker("w-a", 5, "renamed")
    assert [(w.worker_id, w.partition, w.name) for w in store.workers()] == [
        ("w-a", 0, "renamed"), ("w-b", 1, "host-b")]

    # A second worker cannot take a partition that is held ...
    with pytest.raises(StorageError, match="UNIQUE"):
        store.put_worker("w-c", 1, "host-c")
    assert [w.worker_id for w in store.workers()] == ["w-a", "w-b"]  # rolled back
    # ... unless the dead holder is evicted in the same transaction.
    store.put_worker("w-c", 1, "host-c", evict="w-b")
    assert [(w.worker_id, w.partition) for w in store.workers()] == [("w-a", 0), ("w-c", 1)]


def test_record_update_again_replaces_it(store: Store) -> None:
    # A coordinator that restarts runs the same round and attempt again; an update recorded in its
    # earlier life is replaced, not counted twice.
    store.record_update(3, 0, "w1", 120, {"train_loss": 0.5})
    store.record_update(3, 1, "w1", 120, {})  # another attempt of the same round
    store.record_update(3, 0, "w2", 80, {})
    store.record_update(3, 0, "w1", 999, {})
    db = sqlite3.connect(store.path)
    try:
        rows = db.execute("SELECT round, attempt, worker_id, num_examples FROM updates ORDER BY 1, 2, 3").fetchall()
    finally:
        db.close()
    assert rows == [(3, 0, "w1", 999), (3, 0, "w2", 80), (3, 1, "w1", 120)]


def test_failed_write_raises_storage_error_and_store_stays_usable(store: Store) -> None:
    store.put_worker("w1", 0, "a")
    with pytest.raises(StorageError) as info:
        store.put_worker("w2", 0, "b")  # partition 0 is taken
    assert isinstance(info.value.__cause__, sqlite3.IntegrityError)
    store.put_worker("w2", 1, "b")  # the failed transaction was rolled back
    assert [(w.worker_id, w.partition) for w in store.workers()] == [("w1", 0), ("w2", 1)]


def record(round: int, **extra: Any) -> RoundRecord:
    timings = RoundTimings(wait_workers=0.1, open=2.0, aggregate=0.1, evaluate=0.2, checkpoint=0.1)
    return RoundRecord(**{"round": round, "attempts": 1, "sampled": 4, "participants": 3,
                          "accuracy": 0.5 + round / 100, "loss": 1.0 / round, "seconds": 2.5, "bytes_in": 1000,
                          "bytes_out": 4000, "model_version": round, "timings": timings, **extra})


def test_record_round_and_rounds(store: Store) -> None:
    store.put_worker("w1", 0, "a")
    store.put_worker("w2", 1, "b")
    store.put_worker("w3", 2, "c")
    store.record_round(record(2, worker_metrics={"train_loss": 0.7}), ["w1", "w2"])
    store.record_round(record(1), ["w1"])
    assert store.rounds() == [record(1), record(2, worker_metrics={"train_loss": 0.7})]  # ordered by round
    served = {w.worker_id: w.rounds_served for w in store.workers()}
    assert served == {"w1": 2, "w2": 1, "w3": 0}


def test_record_round_again_replaces_it(store: Store) -> None:
    store.record_round(record(1), [])
    store.record_round(record(1, attempts=2), [])
    assert store.rounds() == [record(1, attempts=2)]


def test_record_round_without_optional_metrics(store: Store) -> None:
    rec = record(1, accuracy=None, loss=None)
    store.record_round(rec, [])
    assert store.rounds() == [rec]


def test_unopenable_database_raises_storage_error(tmp_path: Path) -> None:
    folder = tmp_path / "is-a-directory"
    folder.mkdir()
    with pytest.raises(StorageError, match="cannot open state database"):
        Store(folder)


def test_updates_of_rounds_that_never_closed_are_forgotten_on_resume(store: Store) -> None:
    # Round 2 was at its second attempt when the coordinator died; its updates died with the running sum.
    store.record_update(1, 0, "a", 10, {})
    store.record_update(2, 0, "a", 10, {})
    store.record_update(2, 1, "b", 10, {})
    assert store.forget_updates_after(1) == 2
    rows = store._query("SELECT round, attempt, worker_id FROM updates")
    assert [tuple(r) for r in rows] == [(1, 0, "a")]


def test_updates_accepted_in_one_turn_of_the_event_loop_share_one_commit(store: Store) -> None:
    import asyncio

    from fedfleet.coordinator.intake import UpdateIntake
    from fedfleet.coordinator.metrics import CoordinatorMetrics
    from fedfleet.storage.sqlite import UpdateRow

    commits: list[int] = []
    real = store.record_updates

    def counted(rows: list[UpdateRow]) -> None:
        commits.append(len(rows))
        real(rows)

    store.record_updates = counted  # type: ignore[method-assign]
    intake = UpdateIntake(task=None, store=store, registry=None, metrics=CoordinatorMetrics(lambda: None),  # type: ignore[arg-type]
                          model_schema=lambda: (), notify=lambda: None, run_id="r", max_update_norm=None)

    async def accept(n: int) -> None:
        futures = [intake._record(UpdateRow(1, 0, f"w{i}", 10, {"loss": 0.5})) for i in range(n)]
        assert not any(f.done() for f in futures)  # not acknowledged before the commit
        await asyncio.gather(*futures)
        await intake._record(UpdateRow(2, 0, "late", 10, {}))

    asyncio.run(accept(5))
    assert commits == [5, 1]
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT COUNT(*) FROM updates").fetchone() == (6,)
