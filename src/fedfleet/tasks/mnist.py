"""MNIST and Fashion-MNIST: 28x28 greyscale images, 10 classes, with the models of the FedAvg paper.

Data: the four standard IDX files (``train-images-idx3-ubyte.gz`` ...), gzip-compressed or plain, in
a folder given by the task option ``data_dir``, else ``$FEDFLEET_MNIST_DIR`` /
``$FEDFLEET_FASHION_MNIST_DIR``, else ``~/.cache/fedfleet/mnist`` / ``.../fashion-mnist``. Training
never downloads them (``fedfleet data download`` does, as a step of its own: ``tasks/download.py``): a
missing file is a TaskError naming the folder, the files, where they come from and that command.
Every file's uncompressed bytes are checked against its published SHA-256, and parsed with numpy
from the IDX header (magic number, dimensions, big-endian values); nothing is unpickled.

The official 10k test split stays on the coordinator; workers split the 60k training images with
``fedfleet.partition.split``. For ``natural`` the label is the group and each worker gets ``shards``
(default 2) contiguous label-sorted shards drawn at random: the pathological non-IID split of
McMahan et al. (2017), where each worker holds a couple of digits.

Models (task option ``model``): ``cnn`` (default), the paper's CNN, conv5x5 32 → maxpool 2 → conv5x5
64 → maxpool 2 → dense 512 → 10, 1,663,370 parameters; ``mlp``, two hidden layers of 200 (199,210).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fedfleet.errors import TaskError
from fedfleet.options import Option
from fedfleet.partition import PartitionSpec, holdout_indices, split
from fedfleet.tasks import torch_common
from fedfleet.tasks.base import Dataset, FitResult, NoStats, TrainParams
from fedfleet.types import Weights

if TYPE_CHECKING:
    import torch

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
MODELS = ("cnn", "mlp")
EXAMPLES_SEED = 20_260_004  # fixed, so a capped training pool is the same on the coordinator and every worker


@dataclass(frozen=True, eq=False)  # hashed by identity: a key of load_images' cache
class Source:
    """Where a data set's files come from and what their uncompressed bytes hash to."""

    name: str
    env: str
    urls: tuple[str, ...]  # base URLs the files can be fetched from, by hand
    sha256: dict[str, str]


MNIST = Source(
    name="mnist",
    env="FEDFLEET_MNIST_DIR",
    urls=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    sha256={
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
)
FASHION_MNIST = Source(
    name="fashion-mnist",
    env="FEDFLEET_FASHION_MNIST_DIR",
    urls=("https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
          "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
    sha256={
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
)

# IDX type codes (third byte of the magic number) → big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(raw: bytes, name: str = "IDX data") -> np.ndarray:
    """The array in an IDX file's bytes (magic 0x0000TTDD, DD dimensions as big-endian uint32, values)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise TaskError(f"{name} is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise TaskError(f"{name}: IDX header cut short ({len(raw)} bytes, {ndim} dimensions declared)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + dtype.itemsize * int(np.prod(dims, dtype=object))
    if len(raw) != expected:
        raise TaskError(f"{name}: IDX dimensions {dims} need {expected} bytes, the file has {len(raw)}")
    values = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return values.astype(dtype.newbyteorder("="))


def read_idx_bytes(path: Path) -> bytes:
    """A file's bytes, gunzipped if its name ends in .gz."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise TaskError(f"cannot read {path}: {exc}") from exc


def data_dir(source: Source, override: str | os.PathLike[str] | None = None) -> Path:
    """The folder named by the option, else by the environment variable, else the default cache."""
    chosen = override or os.environ.get(source.env)
    return Path(chosen) if chosen else Path.home() / ".cache" / "fedfleet" / source.name


def find_files(source: Source, folder: Path) -> dict[str, Path]:
    """Each of the four files, gzipped or plain; TaskError saying what to put where if any is missing."""
    found: dict[str, Path] = {}
    for stem in FILES:
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                found[stem] = candidate
                break
    missing = [s for s in FILES if s not in found]
    if missing:
        raise TaskError(
            f"{source.name} data not found: {folder} lacks " + ", ".join(f"{s}.gz" for s in missing)
            + f". Put the files {', '.join(f'{s}.gz' for s in FILES)} (gzipped or not) in {folder}, "
            f"or point the task option data_dir or ${source.env} at the folder holding them. "
            f"`fedfleet data download {source.name} --to {folder}` fetches and verifies them from "
            f"{' or '.join(source.urls)} (training never downloads).")
    return found


@dataclass(frozen=True)
class Images:
    """A data set as uint8 images (n × 28 × 28) and int64 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def _checked(source: Source, stem: str, path: Path) -> np.ndarray:
    raw = read_idx_bytes(path)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != source.sha256[stem]:
        raise TaskError(f"{path} is not the official {source.name} {stem}: its uncompressed SHA-256 is "
                        f"{digest}, expected {source.sha256[stem]}. Replace it with the file from "
                        f"{source.urls[0]}{stem}.gz")
    return parse_idx(raw, str(path))


@functools.cache
def load_images(source: Source, folder: str) -> Images:
    """Read and verify the four files. Cached: every worker in a process shares one copy."""
    paths = find_files(source, Path(folder))
    arrays = {stem: _checked(source, stem, p) for stem, p in paths.items()}
    out = Images(arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"].astype(np.int64),
                 arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"].astype(np.int64))
    for x, y, split_name in ((out.train_x, out.train_y, "train"), (out.test_x, out.test_y, "t10k")):
        if x.shape[1:] != IMAGE_SHAPE or len(x) != len(y):
            raise TaskError(f"{source.name} {split_name} files hold {x.shape} images and {len(y)} labels")
    return out


def pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images → float32 rows of 784 values in [0, 1]."""
    return (images.reshape(len(images), -1).astype(np.float32) / np.float32(255.0))


def build_model(kind: str) -> torch.nn.Module:
    """A fresh ``cnn`` or ``mlp`` (PyTorch default initialisation) taking rows of 784 pixels."""
    torch = torch_common.require_torch(kind)
    from torch import nn

    if kind == "cnn":
        cnn = nn.Sequential(
            nn.Unflatten(1, (1, *IMAGE_SHAPE)),
            nn.Conv2d(1, 32, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 512), nn.ReLU(),
            nn.Linear(512, NUM_CLASSES),  # logits: the softmax is in the cross-entropy loss
        )
        # oneDNN's convolutions and pooling are 1.07x (training, batch 10) and 1.5x (evaluation) faster on
        # these CPUs with NHWC tensors (benchmarks/cnn_layout.py); the weights are the same values (and go
        # out C-ordered, weights_of).
        # (Module.to(memory_format=...) works but is missing from torch's type stubs.)
        nhwc: nn.Module = cnn.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return nhwc
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(IMAGE_SHAPE[0] * IMAGE_SHAPE[1], 200), nn.ReLU(),
            nn.Linear(200, 200), nn.ReLU(),
            nn.Linear(200, NUM_CLASSES),
        )
    raise TaskError(f"The 'model' task option must be one of {', '.join(MODELS)}. Got {kind!r} instead.")


def _positive_int(option: str, value: int | str | None) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise TaskError(f"The {option!r} task option must be an int >= 1. Got {value!r} instead.")
    return n


class MnistTask(NoStats):
    """Handwritten digits with the FedAvg paper's CNN or 2-layer MLP, in PyTorch."""

    name = "mnist"
    source: ClassVar[Source] = MNIST
    classes: ClassVar[tuple[str, ...]] = tuple(str(d) for d in range(NUM_CLASSES))  # label k is digit k
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("data_dir", str, None, "folder holding the four IDX files", optional=True,
               default_text="$FEDFLEET_MNIST_DIR or $FEDFLEET_FASHION_MNIST_DIR, else ~/.cache/fedfleet/TASK"),
        Option("model", str, "cnn", "the FedAvg paper's CNN or its 2-layer MLP (2 x 200)", choices=MODELS),
        Option("examples", int, None, "train on a fixed random subset of this many training images", low=1,
               optional=True, default_text="all 60000"),
        Option("shards", int, 2, "label-sorted shards each worker gets with --partition natural",
               low=1, high=60_000),
    )

    def __init__(self, data_dir: str | None = None, model: str = "cnn", examples: int | str | None = None,
                 shards: int | str = 2) -> None:
        torch_common.require_torch(self.name)
        # load_task checked these against OPTIONS already; code that calls the class itself may pass strings.
        if model not in MODELS:
            raise TaskError(f"The 'model' task option must be one of {', '.join(MODELS)}. Got {model!r} instead.")
        self.data_dir = data_dir
        self.model_kind = model
        self.examples = _positive_int("examples", examples)
        self.shards = _positive_int("shards", shards) or 2

    @functools.cached_property
    def _models(self) -> torch_common.ThreadModels:
        return torch_common.ThreadModels(lambda: build_model(self.model_kind))

    @property
    def model(self) -> torch.nn.Module:
        """This thread's own module (see ``ThreadModels``)."""
        return self._models.get()

    def _images(self) -> Images:
        return load_images(self.source, str(data_dir(self.source, self.data_dir)))

    def _pool(self) -> tuple[np.ndarray, np.ndarray]:
        """The training images (capped at ``examples``, a fixed random subset) and their labels."""
        img = self._images()
        if self.examples is None or self.examples >= len(img.train_y):
            return img.train_x, img.train_y
        keep = np.sort(np.random.default_rng(EXAMPLES_SEED).permutation(len(img.train_y))[: self.examples])
        return img.train_x[keep], img.train_y[keep]

    def train_pool(self) -> Dataset:
        x, y = self._pool()
        return Dataset(pixels(x), y)

    def load_test(self) -> Dataset:
        img = self._images()
        return Dataset(pixels(img.test_x), img.test_y)

    def load_server_val(self, spec: PartitionSpec, seed: int) -> Dataset:
        """The coordinator's validation set (``--server-val``): the pool's examples ``load_partition`` leaves out."""
        x, y = self._pool()
        keep = holdout_indices(y, spec.holdout, seed)
        return Dataset(pixels(x[keep]), y[keep])

    def load_partition(self, spec: PartitionSpec, index: int, count: int, seed: int) -> Dataset:
        x, y = self._pool()
        if spec.scheme == "natural":
            # Label-sorted shards, `shards` of them per worker, dealt out at random (McMahan et al. 2017).
            pieces = split(y, y, spec, count * self.shards, seed)
            deal = np.random.default_rng([seed, 0x5AAD]).permutation(len(pieces))
            part = np.sort(np.concatenate([pieces[j] for j in deal[index * self.shards:(index + 1) * self.shards]]))
        else:
            part = split(y, y, spec, count, seed)[index]
        return Dataset(pixels(x[part]), y[part])

    def init_weights(self, seed: int) -> Weights:
        torch = torch_common.require_torch(self.name)
        torch.manual_seed(seed)
        return torch_common.weights_of(build_model(self.model_kind))

    def fit(self, weights: Weights, data: Dataset, params: TrainParams) -> FitResult:
        return torch_common.fit(self.model, weights, data, params)

    def evaluate(self, weights: Weights, data: Dataset) -> dict[str, float]:
        return torch_common.evaluate(self.model, weights, data)

    def evaluate_confusion(self, weights: Weights, data: Dataset) -> tuple[dict[str, float], np.ndarray | None]:
        return torch_common.evaluate_confusion(self.model, weights, data)


class FashionMnistTask(MnistTask):
    """Zalando's Fashion-MNIST (clothing, 10 classes), same layout and models as MNIST."""

    name = "fashion-mnist"
    source = FASHION_MNIST
    # Label k's name, as Fashion-MNIST's README lists them.
    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
