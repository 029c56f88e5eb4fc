"""fedfleet: train one model across many machines without moving their data.

The public API is what this module exports; everything else may change between releases.
"""

from fedfleet.config import OPTIONS, RunConfig
from fedfleet.errors import (
    ConfigError,
    CoordinatorUnreachable,
    FedfleetError,
    ProtocolError,
    RequestRejected,
    RoundError,
    StorageError,
    TaskError,
    TransportError,
)
from fedfleet.partition import PartitionSpec, parse_partition, split
from fedfleet.tasks import Dataset, FitResult, Task, TrainParams, load_task
from fedfleet.types import Weights

__version__ = "0.1.0"

__all__ = [
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
