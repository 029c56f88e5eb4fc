"""``fedfleet simulate``: many clients trained by a pool of executors (local processes or Ray actors),
driven through the coordinator's own round engine, with no sockets (see ``simulate.run``)."""

from fedfleet.simulate.run import simulate

__all__ = ["simulate"]
