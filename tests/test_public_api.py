"""The public API is exactly what ``fedfleet.__all__`` lists; changing it is a deliberate act."""

from __future__ import annotations

import types

import fedfleet

EXPORTED = [
    "OPTIONS",
    "ConfigError",
    "CoordinatorUnreachable",
    "Dataset",
    "FedfleetError",
    "FitResult",
    "PartitionSpec",
    "ProtocolError",
    "RequestRejected",
    "RoundError",
    "RunConfig",
    "StorageError",
    "Task",
    "TaskError",
    "TrainParams",
    "TransportError",
    "Weights",
    "__version__",
    "load_task",
    "parse_partition",
    "split",
]


def isort_key(name: str) -> tuple[int, str]:
    """The order ruff's RUF022 keeps ``__all__`` in: CONSTANTS, then Classes, then the rest."""
    if name.isupper() and len(name) > 1:
        return 0, name
    if name[:1].isupper():
        return 1, name
    return 2, name


def test_all_is_pinned() -> None:
    assert fedfleet.__all__ == EXPORTED


def test_all_is_sorted_and_unique() -> None:
    assert fedfleet.__all__ == sorted(fedfleet.__all__, key=isort_key)
    assert len(set(fedfleet.__all__)) == len(fedfleet.__all__)


def test_every_exported_name_is_importable() -> None:
    namespace: dict[str, object] = {}
    exec("from fedfleet import *", namespace)
    for name in EXPORTED:
        assert name in namespace, name
        assert namespace[name] is getattr(fedfleet, name)


def test_every_public_attribute_is_exported() -> None:
    public = {name for name, value in vars(fedfleet).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert public == set(EXPORTED) - {"__version__"}


def test_exported_objects_come_from_fedfleet() -> None:
    for name in EXPORTED:
        value = getattr(fedfleet, name)
        module = getattr(value, "__module__", None)
        if module is not None and isinstance(value, type):
            assert module.startswith("fedfleet."), (name, module)


def test_errors_share_one_base() -> None:
    for name in ("ConfigError", "TaskError", "ProtocolError", "RequestRejected", "RoundError",
                 "StorageError", "TransportError", "CoordinatorUnreachable"):
        assert issubclass(getattr(fedfleet, name), fedfleet.FedfleetError), name
    assert issubclass(fedfleet.RequestRejected, fedfleet.ProtocolError)
    assert issubclass(fedfleet.CoordinatorUnreachable, fedfleet.TransportError)


def test_version_matches_the_package_metadata() -> None:
    from importlib.metadata import version

    assert fedfleet.__version__ == version("fedfleet")
