"""PyTorch tasks: IDX loading and checks, weights <-> state_dict, the paper's models, local SGD, FedProx, a real run."""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FASHION_MNIST_ENV, MNIST_ENV, image_data_dir
from fedfleet.errors import TaskError
from fedfleet.partition import PartitionSpec
from fedfleet.tasks import load_task, torch_common
from fedfleet.tasks.base import Dataset, TrainParams
from fedfleet.tasks.mnist import (
    FASHION_MNIST,
    FILES,
    MNIST,
    FashionMnistTask,
    MnistTask,
    build_model,
    load_images,
    parse_idx,
    read_idx_bytes,
)
from fedfleet.tasks.songs_mlp import SongsMlpTask


def mnist_dir() -> Path:
    return image_data_dir(MNIST_ENV)


def idx_bytes(array: np.ndarray) -> bytes:
    """A hand-built IDX file: magic 0x0000TTDD, big-endian uint32 dimensions, big-endian values."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def subset(data: Dataset, n: int) -> Dataset:
    return Dataset(data.x[:n], data.y[:n])


@pytest.fixture(scope="module")
def mlp_task() -> MnistTask:
    return MnistTask(data_dir=str(mnist_dir()), model="mlp", examples="2000")


@pytest.fixture(scope="module")
def mnist_test(mlp_task: MnistTask) -> Dataset:
    return subset(mlp_task.load_test(), 2000)


def test_parse_idx_plain_and_gzipped(tmp_path: Path) -> None:
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([7, -2, 70000], dtype=np.int32)
    (tmp_path / "images").write_bytes(idx_bytes(images))
    (tmp_path / "labels.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    got_images = parse_idx(read_idx_bytes(tmp_path / "images"))
    got_labels = parse_idx(read_idx_bytes(tmp_path / "labels.gz"))
    assert got_images.dtype == np.uint8 and np.array_equal(got_images, images)
    assert got_labels.shape == (3,) and got_labels.tolist() == [7, -2, 70000]  # big-endian decoded
    floats = np.array([[0.5, -1.25]], dtype=np.float32)
    assert np.array_equal(parse_idx(idx_bytes(floats)), floats)


@pytest.mark.parametrize("raw,message", [
    (b"\x08\x03\x00\x00" + bytes(12), "bad magic number 08030000"),  # little-endian magic, as a wrong writer does
    (b"\x00\x00\x07\x01" + bytes(8), "bad magic number 00000701"),  # no such type code
    (b"PK\x03\x04rest", "bad magic number 504b0304"),
    (b"", "bad magic number (empty)"),
    (b"\x00\x00\x08\x03\x00\x00", "header cut short"),
    (idx_bytes(np.zeros((2, 3), dtype=np.uint8))[:-1], "need 18 bytes, the file has 17"),
])
def test_parse_idx_refuses_what_is_not_idx(raw: bytes, message: str) -> None:
    with pytest.raises(TaskError, match=r"not an IDX file|IDX") as err:
        parse_idx(raw, "f.idx")
    assert message in str(err.value) and "f.idx" in str(err.value)


def test_a_corrupt_gzip_is_a_task_error(tmp_path: Path) -> None:
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(TaskError, match=r"cannot read .*train-images-idx3-ubyte\.gz"):
        read_idx_bytes(bad)


def write_fake_set(folder: Path, stems: tuple[str, ...] = FILES) -> None:
    """Valid IDX files of the right kind, but not the official ones."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        arr = np.zeros((2, 28, 28), dtype=np.uint8) if "images" in stem else np.array([1, 2], dtype=np.uint8)
        (folder / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(arr)))


def test_sha256_mismatch_names_the_file(tmp_path: Path) -> None:
    write_fake_set(tmp_path)
    with pytest.raises(TaskError) as err:
        load_images(MNIST, str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in msg
    assert "SHA-256" in msg and MNIST.sha256["train-images-idx3-ubyte"] in msg


def test_missing_files_say_which_and_where(tmp_path: Path) -> None:
    write_fake_set(tmp_path, stems=("train-images-idx3-ubyte",))
    task = MnistTask(data_dir=str(tmp_path), model="mlp")
    with pytest.raises(TaskError) as err:
        task.load_test()
    msg = str(err.value)
    assert f"{tmp_path} lacks train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz." in msg
    assert f"in {tmp_path}" in msg and "FEDFLEET_MNIST_DIR" in msg and MNIST.urls[0] in msg
    assert f"`fedfleet data download mnist --to {tmp_path}` fetches and verifies them" in msg

    empty = tmp_path / "nothing-here"
    with pytest.raises(TaskError) as err:
        FashionMnistTask(data_dir=str(empty)).load_test()
    msg = str(err.value)
    assert f"{empty} lacks train-images-idx3-ubyte.gz" in msg
    assert "FEDFLEET_FASHION_MNIST_DIR" in msg and "zalandoresearch/fashion-mnist" in msg


def test_data_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDFLEET_FASHION_MNIST_DIR", str(tmp_path / "from-env"))
    with pytest.raises(TaskError, match="from-env lacks"):
        FashionMnistTask().load_test()


@pytest.mark.parametrize("source,env", [(MNIST, MNIST_ENV), (FASHION_MNIST, FASHION_MNIST_ENV)])
def test_the_shared_copies_verify_and_parse(source: object, env: str) -> None:
    images = load_images(source, str(image_data_dir(env)))  # type: ignore[arg-type]
    assert images.train_x.shape == (60000, 28, 28) and images.test_x.shape == (10000, 28, 28)
    assert images.train_x.dtype == np.uint8 and images.train_x.max() == 255
    assert np.bincount(images.train_y).tolist() == np.bincount(images.train_y, minlength=10).tolist()
    assert sorted(set(images.test_y.tolist())) == list(range(10))
    if source is MNIST:
        assert images.train_y[:5].tolist() == [5, 0, 4, 1, 9]  # the well-known first training labels
        assert np.bincount(images.test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    else:
        assert np.bincount(images.test_y).tolist() == [1000] * 10


def test_the_cnn_is_the_fedavg_papers() -> None:
    cnn = build_model("cnn")
    shapes = {k: tuple(v.shape) for k, v in torch_common.weights_of(cnn).items()}
    assert list(shapes.values()) == [(32, 1, 5, 5), (32,), (64, 32, 5, 5), (64,), (512, 3136), (512,), (10, 512),
                                     (10,)]
    assert torch_common.num_parameters(cnn) == 1_663_370
    assert cnn(torch.zeros(2, 784)).shape == (2, 10)
    # The CNN keeps its conv weights channels-last in memory; on the wire they are plain C-ordered
    # (O, I, H, W) arrays with the same values, and they load back into the same tensors.
    conv = cnn.state_dict()["4.weight"]
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    weights = torch_common.weights_of(cnn)
    assert all(v.flags.c_contiguous for v in weights.values())
    assert np.array_equal(weights["4.weight"], conv.contiguous().numpy())
    rng = np.random.default_rng(1)
    changed = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in weights.items()}
    torch_common.load_weights(cnn, changed)
    assert all(np.array_equal(v, changed[k]) for k, v in torch_common.weights_of(cnn).items())
    mlp = build_model("mlp")
    assert [tuple(v.shape) for v in torch_common.weights_of(mlp).values()] == [
        (200, 784), (200,), (200, 200), (200,), (10, 200), (10,)]
    assert torch_common.num_parameters(mlp) == 199_210
    with pytest.raises(TaskError, match=r"'model' task option must be one of cnn, mlp\. Got 'resnet'"):
        MnistTask(model="resnet")
    with pytest.raises(TaskError, match=r"'examples' task option must be an int >= 1\. Got '0'"):
        MnistTask(examples="0")


def test_weights_round_trip_through_state_dict_with_buffers() -> None:
    task = SongsMlpTask()
    model = task.model
    weights = task.init_weights(3)
    # Parameters and buffers (the standardisation), in the module's state_dict order, float32.
    assert list(weights) == list(model.state_dict()) == [
        "scaler.mean", "scaler.scale", "hidden1.weight", "hidden1.bias", "hidden2.weight", "hidden2.bias",
        "out.weight", "out.bias"]
    assert all(v.dtype == np.float32 for v in weights.values())
    rng = np.random.default_rng(0)
    changed = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in weights.items()}
    torch_common.load_weights(model, changed)
    back = torch_common.weights_of(model)
    assert list(back) == list(changed)
    for k in changed:
        assert np.array_equal(back[k], changed[k]), k
    back["out.bias"][0] += 1  # a copy, not a view of the model's tensors
    assert float(model.state_dict()["out.bias"][0]) == changed["out.bias"][0]
    # The same seed gives the same initial model; another seed does not.
    assert all(np.array_equal(a, b) for a, b in zip(weights.values(), task.init_weights(3).values(), strict=True))
    assert not np.array_equal(weights["out.weight"], task.init_weights(4)["out.weight"])

    with pytest.raises(TaskError, match=r"'out.bias' has shape \(4,\), the model needs \(3,\)"):
        torch_common.load_weights(model, {**changed, "out.bias": np.zeros(4, dtype=np.float32)})
    with pytest.raises(TaskError, match=r"missing \['out.bias'\], unexpected \['extra'\]"):
        torch_common.load_weights(model, {**{k: v for k, v in changed.items() if k != "out.bias"},
                                          "extra": np.zeros(1, dtype=np.float32)})


def test_local_fit_learns_and_is_reproducible(mlp_task: MnistTask, mnist_test: Dataset) -> None:
    pool = mlp_task.train_pool()
    assert len(pool) == 2000 and pool.x.shape == (2000, 784) and pool.x.dtype == np.float32
    assert pool.x.min() == 0.0 and pool.x.max() == 1.0
    init = mlp_task.init_weights(0)
    before = mlp_task.evaluate(init, mnist_test)
    params = TrainParams(local_epochs=2, batch_size=20, lr=0.1, seed=11)
    result = mlp_task.fit(init, pool, params)
    after = mlp_task.evaluate(result.weights, mnist_test)
    assert before["accuracy"] < 0.2
    assert after["accuracy"] > 0.8 and after["loss"] < before["loss"] - 1.0, (before, after)
    assert result.num_examples == 2000 and 0.7 < result.metrics["train_accuracy"] <= 1.0
    assert list(result.weights) == list(init) and all(v.dtype == np.float32 for v in result.weights.values())
    again = mlp_task.fit(init, pool, params)  # same weights, data and seed: the same model, bit for bit
    assert all(np.array_equal(again.weights[k], result.weights[k]) for k in init)
    other = mlp_task.fit(init, pool, TrainParams(2, 20, 0.1, seed=12))
    assert not np.array_equal(other.weights["0.weight"], result.weights["0.weight"])


def test_logical_workers_train_side_by_side_in_threads(mlp_task: MnistTask) -> None:
    # `fedfleet worker --clients K` runs K workers as threads sharing one task object: each must get
    # exactly what it would have got alone (a shared torch module once broke this mid-backward).
    pool = mlp_task.train_pool()
    init = mlp_task.init_weights(0)
    parts = [Dataset(pool.x[i::4], pool.y[i::4]) for i in range(4)]
    params = [TrainParams(local_epochs=2, batch_size=10, lr=0.05, seed=i) for i in range(4)]
    alone = [mlp_task.fit(init, d, p).weights for d, p in zip(parts, params, strict=True)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool_:
        together = list(pool_.map(lambda i: mlp_task.fit(init, parts[i], params[i]).weights, range(4)))
    for a, t in zip(alone, together, strict=True):
        assert all(np.array_equal(a[k], t[k]) for k in init)


def test_the_coordinator_may_evaluate_on_more_threads(mnist_test: Dataset) -> None:
    # Workers train on one thread each; the coordinator, evaluating while they wait, uses its cores.
    task = MnistTask(data_dir=str(mnist_dir()), model="cnn")
    weights, test = task.init_weights(3), subset(mnist_test, 300)
    assert torch.get_num_threads() == 1
    one = task.evaluate(weights, test)
    try:
        torch_common.use_threads(2)
        assert torch.get_num_threads() == 2
        MnistTask(data_dir=str(mnist_dir()), model="mlp")  # a task loaded later keeps the setting
        assert torch.get_num_threads() == 2
        two = task.evaluate(weights, test)
    finally:
        torch_common.use_threads(1)
    assert torch.get_num_threads() == 1
    assert one["accuracy"] == two["accuracy"] and one["loss"] == pytest.approx(two["loss"], rel=1e-5)


def test_usable_cpus_heeds_a_containers_cpu_quota(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    assert torch_common.usable_cpus(tmp_path / "no-cgroup") == cores
    v2 = tmp_path / "v2"
    v2.mkdir()
    for text, expected in (("max 100000", cores), ("50000 100000", 1), (f"{cores * 100000 - 50000} 100000", cores),
                           (f"{cores * 300000} 100000", cores), ("garbage", cores)):
        (v2 / "cpu.max").write_text(text + "\n")
        assert torch_common.usable_cpus(v2) == expected, text
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    for quota, expected in (("-1", cores), ("100000", 1), ("150000", min(2, cores))):
        (v1 / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
        assert torch_common.usable_cpus(v1) == expected, quota


def test_cnn_fit_improves_accuracy(mnist_test: Dataset) -> None:
    task = MnistTask(data_dir=str(mnist_dir()), model="cnn", examples="600")
    init = task.init_weights(1)
    test = subset(mnist_test, 500)
    before = task.evaluate(init, test)["accuracy"]
    trained = task.fit(init, task.train_pool(), TrainParams(1, 10, 0.05, seed=1)).weights
    after = task.evaluate(trained, test)["accuracy"]
    assert after > before + 0.3 and after > 0.4, (before, after)  # from chance, in 60 steps


def test_fedprox_term_pulls_toward_the_global_weights(mlp_task: MnistTask) -> None:
    pool = subset(mlp_task.train_pool(), 500)
    start = mlp_task.init_weights(2)

    def drift(mu: float) -> float:
        w = mlp_task.fit(start, pool, TrainParams(3, 10, 0.1, seed=5, prox_mu=mu)).weights
        return float(np.sqrt(sum(np.square(w[k] - start[k]).sum() for k in start)))

    plain, mild, strong = drift(0.0), drift(0.1), drift(2.0)
    assert strong < mild < plain
    assert strong < 0.5 * plain, (plain, mild, strong)


def test_the_fedprox_gradient_is_the_terms() -> None:
    """``add_prox_gradient`` is the update autograd gives μ/2·‖w − w_global‖² added to the loss."""
    import torch.nn.functional as F

    model = SongsMlpTask().model
    start = torch_common.weights_of(model)
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((64, len(start["scaler.mean"]))).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, 64))
    anchors = [torch.from_numpy(start[n]) for n, p in model.named_parameters() if p.requires_grad]
    mu = 0.5

    def batches(order: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.from_numpy(order)
        return [(x[idx[i:i + 8]], y[idx[i:i + 8]]) for i in range(0, 64, 8)]

    def with_term(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prox = sum((p - a).square().sum() for p, a in zip(
            (p for p in model.parameters() if p.requires_grad), anchors, strict=True))
        return F.cross_entropy(out, target) + 0.5 * mu * prox

    def fit(prox_mu: float, loss: torch_common.LossFn) -> dict[str, np.ndarray]:
        params = TrainParams(3, 8, 0.2, seed=4, prox_mu=prox_mu)
        return torch_common.train(model, start, params, 64, batches, loss, torch_common.accuracy).weights

    given, autograd, plain = fit(mu, F.cross_entropy), fit(0.0, with_term), fit(0.0, F.cross_entropy)
    for name in start:
        np.testing.assert_allclose(given[name], autograd[name], atol=1e-6, err_msg=name)
    assert max(float(np.abs(plain[k] - given[k]).max()) for k in start) > 1e-3  # the term does move them
    assert np.array_equal(given["scaler.mean"], start["scaler.mean"])  # buffers: no term, no step


def test_partitions_of_the_training_pool(mlp_task: MnistTask) -> None:
    pool = mlp_task.train_pool()
    for spec in (PartitionSpec("iid"), PartitionSpec("natural"), PartitionSpec("dirichlet", 0.3)):
        parts = [mlp_task.load_partition(spec, i, 10, seed=4) for i in range(10)]
        assert sum(len(p) for p in parts) == len(pool)
        assert sorted(np.concatenate([p.y for p in parts]).tolist()) == sorted(pool.y.tolist())
        labels = [len(np.unique(p.y)) for p in parts]
        if spec.scheme == "iid":
            assert min(labels) == 10
        if spec.scheme == "natural":  # two label-sorted shards each: a couple of digits per worker
            assert max(labels) <= 4 and np.mean(labels) <= 3, labels
    one = MnistTask(data_dir=str(mnist_dir()), model="mlp", examples="2000", shards="1")
    labels = [len(np.unique(one.load_partition(PartitionSpec("natural"), i, 10, 4).y)) for i in range(10)]
    assert max(labels) <= 3 and np.mean(labels) <= 2.5, labels  # one shard: one digit or two, rarely three
    # Every worker computes the same split on its own.
    assert np.array_equal(mlp_task.load_partition(PartitionSpec("natural"), 3, 10, 4).x,
                          MnistTask(data_dir=str(mnist_dir()), model="mlp", examples="2000")
                          .load_partition(PartitionSpec("natural"), 3, 10, 4).x)


def test_songs_mlp_shares_the_songs_split_and_learns() -> None:
    task = SongsMlpTask()
    assert isinstance(load_task("songs-mlp"), SongsMlpTask)
    songs = load_task("songs")
    for a, b in ((task.load_test(), songs.load_test()),
                 (task.load_partition(PartitionSpec("natural"), 2, 5, 9),
                  songs.load_partition(PartitionSpec("natural"), 2, 5, 9))):
        assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    pool, test = task.train_pool(), task.load_test()
    weights = task.apply_stats(task.init_weights(0), task.local_stats(pool))
    assert np.allclose(weights["scaler.mean"], pool.x.mean(axis=0), rtol=1e-5)
    trained = task.fit(weights, pool, TrainParams(1, 32, 0.1, seed=0)).weights
    assert np.array_equal(trained["scaler.mean"], weights["scaler.mean"])  # buffers are not trained
    acc = task.evaluate(trained, test)["accuracy"]
    majority = np.bincount(test.y).max() / len(test)
    assert acc > majority + 0.2, acc
    proba = task.predict_proba(trained, test.x[:5])
    assert proba.shape == (5, 3) and np.allclose(proba.sum(axis=1), 1.0)


def test_core_works_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # import torch now raises ImportError
        "import fedfleet, fedfleet.cli, fedfleet.tasks.mnist, fedfleet.tasks.songs_mlp\n"
        "from fedfleet.tasks import load_task\n"
        "from fedfleet.tasks.base import TrainParams\n"
        "songs = load_task('songs')\n"
        "songs.fit(songs.init_weights(0), songs.load_test(), TrainParams(1, 32, 0.05, 0))\n"
        "for name in ('mnist', 'fashion-mnist', 'songs-mlp'):\n"
        "    try:\n"
        "        load_task(name)\n"
        "    except fedfleet.FedfleetError as exc:\n"
        "        print(exc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"the {name!r} task needs PyTorch, which is not installed: pip install 'fedfleet[torch]'"
        for name in ("mnist", "fashion-mnist", "songs-mlp")]


def test_federated_mnist_run(tmp_path: Path) -> None:
    out = tmp_path / "mnist"
    r = subprocess.run([sys.executable, "-m", "fedfleet", "run", "--task", "mnist", "--task-option", "model=mlp",
                        "--task-option", "examples=3000", "--task-option", f"data_dir={mnist_dir()}",
                        "--workers", "3", "--rounds", "3", "--lr", "0.1", "--batch-size", "10", "--local-epochs", "2",
                        "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["state"] == "finished" and summary["task"] == "mnist" and summary["rounds"] == 3
    assert summary["final_accuracy"] > 0.75, summary["final_accuracy"]  # chance is 0.1
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["participants"] for rec in rounds] == [3, 3, 3]
    assert rounds[0]["accuracy"] < rounds[-1]["accuracy"]
