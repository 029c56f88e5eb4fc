"""``fedfleet data download``: the IDX files fetched over real HTTP (a server on 127.0.0.1 serving them,
as a mirror would), verified, written atomically, kept when already good; mirrors that refuse or serve
the wrong bytes are skipped, and when none serves a file the error names each.

The download itself is tested on a small data set the test makes (its own IDX files and their
SHA-256), so it always runs; the command, which knows only the real data sets, needs the real files
($FEDFLEET_MNIST_DIR) and is skipped, saying so, without them."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import MNIST_ENV, image_data_dir, run_fedfleet
from fedfleet.errors import TaskError
from fedfleet.tasks.download import download, verified
from fedfleet.tasks.mnist import FILES, MNIST, Source, load_images


def mnist_dir() -> Path:
    return image_data_dir(MNIST_ENV)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: magic 0x000008DD (unsigned bytes, DD dimensions), big-endian uint32 sizes, the bytes."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def make_tiny(folder: Path) -> Source:
    """Writes a 12-image data set of the MNIST layout (gzipped, as mirrors serve it) into ``folder`` and
    returns its Source, whose hashes are those of these files."""
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, 8, dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, 4, dtype=np.uint8)}
    folder.mkdir(parents=True, exist_ok=True)
    sha = {}
    for stem, array in arrays.items():
        raw = idx_bytes(array)
        (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        sha[stem] = hashlib.sha256(raw).hexdigest()
    return Source(name="tiny", env="FEDFLEET_TINY_DIR", urls=("https://tiny.invalid/",), sha256=sha)


class Mirror:
    """A static file server on 127.0.0.1 that records the paths asked for."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: object, **kw: object) -> None:
                super().__init__(*args, directory=str(root), **kw)  # type: ignore[arg-type]

            def do_GET(self) -> None:
                mirror.requests.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/data/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tiny(tmp_path: Path) -> Source:
    return make_tiny(tmp_path / "tiny-source")


@pytest.fixture
def good(tmp_path: Path, tiny: Source) -> Iterator[Mirror]:
    """Serves the tiny data set's files."""
    root = tmp_path / "good-root"
    (root / "data").mkdir(parents=True)
    for stem in FILES:
        (root / "data" / f"{stem}.gz").symlink_to(tmp_path / "tiny-source" / f"{stem}.gz")
    mirror = Mirror(root)
    yield mirror
    mirror.close()


@pytest.fixture
def real(tmp_path: Path) -> Iterator[Mirror]:
    """Serves the real MNIST files (skips without them)."""
    source = mnist_dir()
    root = tmp_path / "real-root"
    (root / "data").mkdir(parents=True)
    for stem in FILES:
        (root / "data" / f"{stem}.gz").symlink_to(source / f"{stem}.gz")
    mirror = Mirror(root)
    yield mirror
    mirror.close()


@pytest.fixture
def bad(tmp_path: Path) -> Iterator[Mirror]:
    """Serves a well-formed gzip of the wrong bytes for the test labels, and nothing else (404)."""
    root = tmp_path / "bad-root"
    (root / "data").mkdir(parents=True)
    (root / "data" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(8)))
    mirror = Mirror(root)
    yield mirror
    mirror.close()


def test_downloads_verifies_and_the_loader_reads_them(tmp_path: Path, tiny: Source, good: Mirror) -> None:
    folder = tmp_path / "mnist"
    seen = []
    got = download(tiny, folder, [good.url], on_file=seen.append)
    assert [f.stem for f in got] == list(FILES) and seen == got
    assert all(f.url == f"{good.url}{f.stem}.gz" and f.path == folder / f"{f.stem}.gz" for f in got)
    for stem in FILES:
        assert (folder / f"{stem}.gz").read_bytes() == (tmp_path / "tiny-source" / f"{stem}.gz").read_bytes()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temp files left
    images = load_images(tiny, str(folder))
    assert images.train_x.shape == (8, 28, 28) and len(images.test_y) == 4

    # Run again: everything verifies in place, nothing is fetched.
    asked = len(good.requests)
    again = download(tiny, folder, [good.url])
    assert [f.url for f in again] == [None] * 4 and len(good.requests) == asked


def test_a_corrupt_file_in_place_is_fetched_again(tmp_path: Path, tiny: Source, good: Mirror) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"cut short")  # e.g. an interrupted copy by hand
    assert verified(tiny, folder, "train-labels-idx1-ubyte") is None
    got = {f.stem: f for f in download(tiny, folder, [good.url])}
    assert got["train-labels-idx1-ubyte"].url is not None
    assert verified(tiny, folder, "train-labels-idx1-ubyte") == folder / "train-labels-idx1-ubyte.gz"


def test_a_mirror_with_wrong_or_missing_files_is_skipped(tmp_path: Path, tiny: Source, bad: Mirror,
                                                         good: Mirror) -> None:
    got = download(tiny, tmp_path / "mnist", [bad.url, good.url])
    assert all(f.url is not None and f.url.startswith(good.url) for f in got)
    assert len(bad.requests) == 4  # each file was asked of the bad mirror first


def test_no_mirror_serving_a_file_is_an_error_naming_each(tmp_path: Path, tiny: Source, bad: Mirror) -> None:
    folder = tmp_path / "mnist"
    with pytest.raises(TaskError) as err:
        download(tiny, folder, [bad.url, "http://127.0.0.1:9/none/"], timeout=5)
    msg = str(err.value)
    assert msg.startswith("could not download tiny train-images-idx3-ubyte.gz: ")
    assert f"{bad.url}train-images-idx3-ubyte.gz: HTTP 404" in msg
    assert "http://127.0.0.1:9/none/train-images-idx3-ubyte.gz: " in msg and str(folder) in msg
    assert list(folder.iterdir()) == []  # nothing half-written

    # The labels file the bad mirror does serve hashes wrong: named with both digests.
    for stem in FILES[:3]:
        (folder / f"{stem}.gz").symlink_to(tmp_path / "tiny-source" / f"{stem}.gz")
    with pytest.raises(TaskError, match=r"t10k-labels-idx1-ubyte.gz: its uncompressed SHA-256 is [0-9a-f]{64}, "
                                        + f"expected {tiny.sha256['t10k-labels-idx1-ubyte']}"):
        download(tiny, folder, [bad.url])
    assert not (folder / "t10k-labels-idx1-ubyte.gz").exists()


def test_the_command(tmp_path: Path, real: Mirror, bad: Mirror) -> None:
    good = real
    folder = tmp_path / "mnist"
    r = run_fedfleet("data", "download", "mnist", "--to", str(folder), "--mirror", good.url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(f"downloaded from {good.url}") == 4 and f"all files verified in {folder}" in r.stdout
    r = run_fedfleet("data", "download", "mnist", "--to", str(folder), "--mirror", bad.url)
    assert r.returncode == 0 and r.stdout.count("kept: verified") == 4 and bad.requests == []

    # The folder defaults to where the task looks: $FEDFLEET_MNIST_DIR here.
    env_dir = tmp_path / "from-env"
    r = run_fedfleet("data", "download", "mnist", "--mirror", good.url, env={"FEDFLEET_MNIST_DIR": str(env_dir)})
    assert r.returncode == 0 and verified(MNIST, env_dir, "t10k-labels-idx1-ubyte")

    r = run_fedfleet("data", "download", "mnist", "--to", str(tmp_path / "x"), "--mirror", bad.url)
    assert r.returncode == 1 and "fedfleet: error: could not download mnist train-images-idx3-ubyte.gz" in r.stderr
    r = run_fedfleet("data", "download", "mnist", "--mirror", "ftp://example.org/")
    assert r.returncode == 2 and "--mirror: must be an http:// or https:// URL" in r.stderr
    r = run_fedfleet("data", "download", "cifar10")
    assert r.returncode == 2 and "invalid choice: 'cifar10'" in r.stderr
