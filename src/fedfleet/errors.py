"""The one exception tree of fedfleet.

Every error fedfleet raises on purpose is a ``FedfleetError``; errors from libraries (sqlite3, httpx,
json, safetensors) are translated at the boundary with ``raise ... from exc``::

    FedfleetError
    ├── ConfigError          a run option or config file value is invalid
    ├── TaskError            a task cannot be loaded, or its data is missing or malformed
    ├── ProtocolError        a message on the wire is malformed (bad safetensors, bad JSON, bad size)
    │   ├── RequestRejected  a well-formed request the run cannot take now (stale, duplicate, unknown)
    │   └── AuthError        a missing or wrong token (401), or one used outside its scope (403)
    ├── RoundError           a round or the whole run cannot go on (below quorum, no workers)
    ├── StorageError         the data dir or its SQLite database cannot be read or written
    └── TransportError       a request did not get through (connection refused, reset, timed out)
        └── CoordinatorUnreachable  a worker retried with backoff for too long and gave up

HTTP handlers map each class to a status code (see ``coordinator.app``); the message always says
what was wrong, in words a user can act on.
"""

from __future__ import annotations


class FedfleetError(Exception):
    """Base class of every error fedfleet raises on purpose."""


class ConfigError(FedfleetError):
    """A run option or config file value is invalid; the message names the option."""

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class TaskError(FedfleetError):
    """A task cannot be found or loaded, or its data is missing or malformed."""


class ProtocolError(FedfleetError):
    """A message on the wire is malformed: not safetensors, bad JSON, wrong size (HTTP 400/413/422).

    ``reason`` is a short fixed word for metrics (``coordinator.metrics.REJECT_REASONS``) where the
    status alone does not tell the cases apart.
    """

    def __init__(self, message: str, *, status: int = 400, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class RequestRejected(ProtocolError):
    """A well-formed request the run cannot take now: stale or duplicate update, unknown worker, full."""

    def __init__(self, message: str, *, status: int = 409, round: int | None = None,
                 worker: str | None = None, reason: str | None = None) -> None:
        super().__init__(message, status=status, reason=reason)
        self.round = round
        self.worker = worker


class AuthError(ProtocolError):
    """A missing or wrong credential (401), or a valid one used outside its scope (403)."""


class RoundError(FedfleetError):
    """A round or the whole run cannot go on: too few workers, quorum missed too often."""

    def __init__(self, message: str, *, round: int | None = None) -> None:
        super().__init__(message)
        self.round = round


class StorageError(FedfleetError):
    """The data dir or its SQLite database cannot be read or written."""


class TransportError(FedfleetError):
    """A request did not get through: connection refused or reset, or it timed out. Worth a retry."""


class CoordinatorUnreachable(TransportError):
    """A worker could not reach the coordinator within its retry budget."""
