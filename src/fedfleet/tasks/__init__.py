"""Built-in tasks and the loader for a user's own (``module.path:Class``)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from fedfleet.errors import TaskError
from fedfleet.tasks.base import Dataset, FitResult, NoStats, Task, TrainParams

BUILTIN = {
    "songs": "fedfleet.tasks.songs:SongsTask",
    "songs-mlp": "fedfleet.tasks.songs_mlp:SongsMlpTask",
    "mnist": "fedfleet.tasks.mnist:MnistTask",
    "fashion-mnist": "fedfleet.tasks.mnist:FashionMnistTask",
    "null": "fedfleet.tasks.null:NullTask",
}


def load_task(name: str, options: Mapping[str, str] | None = None) -> Task:
    """Instantiate the task called ``name`` with its string options; TaskError says what went wrong."""
    target = BUILTIN.get(name, name)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(f"unknown task {name!r}: use one of {', '.join(sorted(BUILTIN))}, "
                        "or module.path:Class for your own")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"cannot import task module {module_name!r}: {exc}") from exc
    cls = getattr(module, attr, None)
    if cls is None:
        raise TaskError(f"task module {module_name!r} has no attribute {attr!r}")
    try:
        task = cls(**dict(options or {}))
    except TypeError as exc:
        raise TaskError(f"task {name!r} does not accept options {dict(options or {})}: {exc}") from exc
    missing = [m for m in ("init_weights", "load_test", "load_partition", "fit", "evaluate")
               if not callable(getattr(task, m, None))]
    if missing:
        raise TaskError(f"task {name!r} lacks method(s) {', '.join(missing)}")
    return task  # type: ignore[no-any-return]


__all__ = ["BUILTIN", "Dataset", "FitResult", "NoStats", "Task", "TrainParams", "load_task"]
