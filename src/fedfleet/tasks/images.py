"""``--task images``: each site's own labelled images, a folder per class, with a CNN or a small ResNet.

Each worker's ``--data PATH`` (and the coordinator's ``--test-data PATH``) is a folder with one subfolder
per class, named after the class, of PNG or JPEG files (torchvision's ImageFolder layout; files are found
at any depth under a class folder; names starting with ``.`` are skipped, e.g. macOS's ``._*`` files)::

    PATH/cat/0001.png
    PATH/dog/puppies/0002.jpg

The images are read with Pillow (its PNG and JPEG decoders only), converted to ``channels`` (1 grey, 2
grey and alpha, 3 RGB, 4 RGBA), resized to ``size`` × ``size`` (bilinear; the aspect ratio is not kept)
and held in memory as uint8: n × channels × size² bytes. There is no shared data set: a worker needs
``--data`` (``load_partition`` and ``load_test`` say so).

The classes are agreed federatedly before the first round. Each site describes its data (``describe``:
its class folders' names with their image counts, the number of images, and the smallest and largest
width and height of the files, never an image); the plan (``make_plan``) is the sorted union of the
class names; the task set up with it (``with_plan``) has one output per class, in that order. A site
lacking a class simply has no examples of it.

Models (task option ``model``): ``cnn``, the FedAvg paper's CNN adapted to the size and channels;
``resnet``, a ResNet-8 with GroupNorm (``image_models``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import numpy as np

from fedfleet.errors import TaskError
from fedfleet.options import Option
from fedfleet.partition import PartitionSpec
from fedfleet.tasks.base import Description, Plan
from fedfleet.tasks.torch_common import INSTALL_HINT
from fedfleet.tasks.torch_task import Examples, TorchTask, validation_split

if TYPE_CHECKING:
    import torch

MODELS = ("cnn", "resnet")
MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # Pillow's mode for each channel count
EXTENSIONS = (".png", ".jpg", ".jpeg")
MAX_CLASSES = 1000
MAX_NAME = 200  # characters in a class name
MAX_COUNT = 10**12  # images a description may report, in all or of one class
MAX_SIDE = 2**31 - 1  # pixels: the largest width or height a PNG can declare
DESCRIPTION_KEYS = ("images", "classes", "width", "height")
NO_SHARED_DATA = ("the 'images' task has no shared data set: each worker reads its site's own image folders "
                  "(fedfleet worker --data PATH)")


@dataclass(frozen=True, eq=False)
class Images:
    """A site's images, resized, with their classes by name (the run's class list is known only with the plan)."""

    pixels: np.ndarray  # n × channels × size × size, uint8
    labels: np.ndarray  # n, int64: indices into ``classes``
    classes: tuple[str, ...]  # this site's class folders' names, sorted
    widths: np.ndarray  # n: each file's width and height before resizing
    heights: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> Images:
        return Images(self.pixels[rows], self.labels[rows], self.classes, self.widths[rows], self.heights[rows])


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a class name, or None."""
    if not isinstance(name, str):
        return f"a class name is a string, not {type(name).__name__}"
    if not 1 <= len(name) <= MAX_NAME:
        return f"class name {_short(name)} is {len(name)} characters long: 1 to {MAX_NAME} are allowed"
    if not name.isprintable():
        return f"class name {_short(name)} holds control characters"
    return None


def _short(value: object) -> str:
    """``value``'s repr, cut short: what an untrusted description holds goes into messages only this long."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _is_int(value: object, low: int, high: int) -> bool:
    # bool is an int to Python, but true is not a count
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def read_folders(paths: Sequence[Path], channels: int, size: int) -> Images:
    """Every PNG and JPEG under the class folders of each of ``paths``, converted and resized; a class held
    in several of the folders is one class. TaskError naming the path: not a folder, no class subfolders,
    an empty class folder, a file Pillow cannot read, too many classes or a name that cannot be one."""
    found: list[tuple[str, Path]] = []
    for root in paths:
        for folder in _class_folders(root):
            found += [(folder.name, f) for f in _image_files(folder)]
    classes = tuple(sorted({name for name, _ in found}))
    if len(classes) > MAX_CLASSES:
        raise TaskError(f"{', '.join(str(p) for p in paths)} hold {len(classes)} class folders: at most "
                        f"{MAX_CLASSES} are allowed")
    index = {name: i for i, name in enumerate(classes)}
    read = [_read(path, channels, size) for _, path in found]
    return Images(pixels=np.stack([pixels for pixels, _, _ in read]),
                  labels=np.array([index[name] for name, _ in found], dtype=np.int64), classes=classes,
                  widths=np.array([w for _, w, _ in read], dtype=np.int64),
                  heights=np.array([h for _, _, h in read], dtype=np.int64))


def _class_folders(root: Path) -> list[Path]:
    expected = f"expected a folder with a subfolder of PNG or JPEG images per class ({root}/CLASS/IMAGE.png)"
    if not root.is_dir():
        raise TaskError(f"{root}: {'not a folder' if root.exists() else 'no such folder'}; {expected}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise TaskError(f"{root} has no class subfolders: {expected}")
    for folder in folders:
        problem = name_problem(folder.name)
        if problem is not None:
            raise TaskError(f"{folder}: {problem}")
    return folders


def _image_files(folder: Path) -> list[Path]:
    # os.walk does not follow links to folders (a link loop would never end); sorted, so that every
    # reading of a site lists its images in the same order and the validation split is reproducible.
    files = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(parent, n) for n in sorted(names)
                  if not n.startswith(".") and n.lower().endswith(EXTENSIONS)]
    if not files:
        raise TaskError(f"{folder} holds no PNG or JPEG images: expected the images of class {folder.name!r} "
                        f"in it ({', '.join('*' + e for e in EXTENSIONS)})")
    return files


def _read(path: Path, channels: int, size: int) -> tuple[np.ndarray, int, int]:
    """The image at ``path`` as uint8 (channels × size × size), and its width and height before resizing."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise TaskError(f"the 'images' task reads images with Pillow, which is not installed: {INSTALL_HINT}") \
            from exc
    try:
        with Image.open(path, formats=("PNG", "JPEG")) as img:
            width, height = img.size
            img.draft(None, (size, size))  # a JPEG decodes at 1/2, 1/4 or 1/8 scale when that is still large enough
            pixels = np.asarray(img.convert(MODES[channels]).resize((size, size), Image.Resampling.BILINEAR),
                                dtype=np.uint8)
    # OSError: not an image, or cut short; SyntaxError: a broken PNG chunk; ValueError and
    # DecompressionBombError (too many pixels to decode safely): what else Pillow raises on bad files.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TaskError(f"{path}: Pillow cannot read it as a PNG or JPEG image ({reason})") from exc
    # Pillow gives height × width (× channels); the models take channels × height × width.
    return (pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)), width, height


def check_classes(classes: object) -> str | None:
    """Why ``classes`` cannot be a plan's class list, or None."""
    if not isinstance(classes, list) or not 2 <= len(classes) <= MAX_CLASSES:
        return f"the plan's 'classes' must be a list of 2 to {MAX_CLASSES} class names, not {_short(classes)}"
    problem = next((p for p in map(name_problem, classes) if p is not None), None)
    if problem is None and len(set(classes)) != len(classes):
        problem = "the plan names a class twice"
    return problem


class ImagesTask(TorchTask):
    """Image classification on each site's folders of PNG and JPEG files, with the classes agreed federatedly."""

    name = "images"
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("model", str, "cnn", "the FedAvg paper's CNN adapted to the image size and channels, or a "
               "ResNet-8 with GroupNorm", choices=MODELS),
        Option("channels", int, 3, "channels the images are converted to: 1 grey, 2 grey and alpha, 3 RGB, 4 RGBA",
               low=1, high=4),
        Option("size", int, 28, "the side in pixels the images are resized to (size x size)", low=8, high=512),
    )

    def __init__(self, model: str = "cnn", channels: int | str = 3, size: int | str = 28, *,
                 classes: Sequence[str] = ()) -> None:
        super().__init__()
        # load_task checked the options already; code that calls the class itself may pass strings, or bad values.
        kind, depth, side = (o.check(v, "task option") for o, v in zip(self.OPTIONS, (model, channels, size),
                                                                        strict=True))
        self.model_kind: str = kind
        self.channels: int = depth
        self.size: int = side
        self.classes = tuple(classes)  # the plan's, in the order of the model's outputs; empty until with_plan

    def build_model(self) -> torch.nn.Module:
        from fedfleet.tasks import image_models

        if not self.classes:
            raise TaskError("the 'images' task's model has an output per class, and the classes are agreed from "
                            "the sites' descriptions first: use the task with_plan returns")
        if self.model_kind == "resnet":
            return image_models.small_resnet(self.channels, len(self.classes))
        return image_models.paper_cnn(self.channels, self.size, len(self.classes))

    # --- data -------------------------------------------------------------------------------------------------
    def load_site(self, paths: Sequence[Path], val_fraction: float, seed: int) -> tuple[Images, Images | None]:
        images = read_folders([Path(p) for p in paths], self.channels, self.size)
        train, val = validation_split(len(images), val_fraction, seed)
        return (images, None) if val is None else (images.take(train), images.take(val))

    def load_partition(self, spec: PartitionSpec, index: int, count: int, seed: int) -> NoReturn:
        raise TaskError(NO_SHARED_DATA)

    def load_test(self) -> NoReturn:
        raise TaskError(f"{NO_SHARED_DATA}; the coordinator's held-out images are --test-data PATH")

    def torch_dataset(self, data: Any) -> Examples:
        """``data`` (``Images``) with each image's class as its index in the plan's class list."""
        import torch
        from torch.utils.data import TensorDataset

        if not isinstance(data, Images):
            raise TaskError(f"the 'images' task trains on the images its load_site read, not {type(data).__name__}")
        plan = {name: i for i, name in enumerate(self.classes)}
        unknown = [name for name in data.classes if name not in plan]
        if unknown:
            raise TaskError(f"these images include the class {unknown[0]!r}, which is not one of the run's "
                            f"{len(plan)} classes (agreed from the sites' descriptions): "
                            f"{', '.join(self.classes) if len(plan) <= 20 else 'see its plan'}")
        targets = np.array([plan[name] for name in data.classes], dtype=np.int64)[data.labels]
        dataset: Examples = TensorDataset(torch.from_numpy(data.pixels), torch.from_numpy(targets))
        return dataset

    def label_counts(self, data: Any) -> list[int] | None:
        """``data``'s images per class of the plan, in its order (a site lacking a class has 0 of it)."""
        if not isinstance(data, Images) or not self.classes:
            return None
        index = {name: i for i, name in enumerate(self.classes)}
        out = [0] * len(self.classes)
        for name, n in zip(data.classes, np.bincount(data.labels, minlength=len(data.classes)), strict=True):
            if name in index:
                out[index[name]] += int(n)
        return out

    # --- the plan ---------------------------------------------------------------------------------------------
    def describe(self, data: Any) -> Description:
        if not isinstance(data, Images) or len(data) == 0:
            raise TaskError("the 'images' task describes images its load_site read, at least one")
        counts = np.bincount(data.labels, minlength=len(data.classes))
        return {"images": len(data),
                "classes": {name: int(n) for name, n in zip(data.classes, counts, strict=True)},
                "width": [int(data.widths.min()), int(data.widths.max())],
                "height": [int(data.heights.min()), int(data.heights.max())]}

    def check_description(self, description: Mapping[str, Any], reference: Mapping[str, Any] | None) -> str | None:
        """What is malformed or out of range in ``description``, or None. ``reference`` is not needed: sites
        may hold different classes (one lacking a class has no examples of it) and images of any size."""
        if not isinstance(description, Mapping):
            return f"a description is a JSON object, not {type(description).__name__}"
        missing = [k for k in DESCRIPTION_KEYS if k not in description]
        extra = [k for k in description if k not in DESCRIPTION_KEYS]
        if missing or extra:
            return (f"a description has the keys {', '.join(DESCRIPTION_KEYS)}; this one "
                    + (f"lacks {', '.join(missing)}" if missing else "")
                    + (" and " if missing and extra else "")
                    + (f"has {len(extra)} others: {_short(extra[:5])}" if extra else ""))
        images, classes = description["images"], description["classes"]
        if not _is_int(images, 1, MAX_COUNT):
            return f"'images' must be an integer from 1 to {MAX_COUNT}, not {_short(images)}"
        if not isinstance(classes, Mapping) or not 1 <= len(classes) <= MAX_CLASSES:
            return f"'classes' must map 1 to {MAX_CLASSES} class names to their image counts, not {_short(classes)}"
        for name, count in classes.items():
            problem = name_problem(name)
            if problem is not None:
                return problem
            if not _is_int(count, 0, MAX_COUNT):
                return (f"the count of class {_short(name)} must be an integer from 0 to {MAX_COUNT}, "
                        f"not {_short(count)}")
        if sum(classes.values()) != images:
            return f"the class counts add up to {sum(classes.values())}, not the {images} images it reports"
        for key in ("width", "height"):
            low_high = description[key]
            if not isinstance(low_high, list | tuple) or len(low_high) != 2 \
                    or not all(_is_int(v, 1, MAX_SIDE) for v in low_high) or low_high[0] > low_high[1]:
                return f"'{key}' must be [smallest, largest], pixels from 1 to {MAX_SIDE}, not {_short(low_high)}"
        return None

    def check_against_plan(self, description: Mapping[str, Any], plan: Mapping[str, Any]) -> str | None:
        """Why a site that describes its images after the plan was agreed cannot train on it: a class the
        plan has no output for (the model's shape is fixed by then)."""
        known = set(plan.get("classes") or ())
        new = sorted(name for name in description.get("classes", {}) if name not in known)
        if new:
            return (f"class {new[0]!r} is not one of the run's {len(known)} classes (agreed from the sites' "
                    f"descriptions): {', '.join(sorted(known)) if len(known) <= 20 else 'see GET /v1/plan'}")
        return None

    def make_plan(self, descriptions: Sequence[Mapping[str, Any]]) -> Plan:
        classes = sorted({name for d in descriptions for name in d["classes"]})
        if len(classes) < 2:
            raise TaskError(f"the sites hold {len(classes)} class{'' if len(classes) == 1 else 'es'} between them "
                            f"({', '.join(map(_short, classes)) or 'none'}): a classifier needs at least two")
        if len(classes) > MAX_CLASSES:
            raise TaskError(f"the sites hold {len(classes)} classes between them: at most {MAX_CLASSES} are allowed")
        return {"classes": classes}

    def with_plan(self, plan: Mapping[str, Any]) -> ImagesTask:
        classes = plan.get("classes") if isinstance(plan, Mapping) else None
        problem = check_classes(classes)
        if problem is not None:
            raise TaskError(f"the 'images' task cannot use this plan: {problem}")
        return type(self)(self.model_kind, self.channels, self.size, classes=list(classes or ()))
