"""Per-round checkpoints of the global model as safetensors files, written atomically."""

from __future__ import annotations

import os
import re
from pathlib import Path

from fedfleet.errors import ProtocolError, StorageError
from fedfleet.protocol import codec
from fedfleet.storage.files import write_atomic
from fedfleet.types import Weights

_NAME = re.compile(r"^round-(\d{6})\.safetensors$")


class Checkpoints:
    """``DIR/round-000012.safetensors`` (the model) and, for strategies with state (momentum,
    moments), ``DIR/round-000012.state.safetensors``; the newest ``keep`` rounds are kept."""

    def __init__(self, directory: Path, keep: int = 3) -> None:
        self.directory = directory
        self.keep = keep

    def path(self, round: int) -> Path:
        return self.directory / f"round-{round:06d}.safetensors"

    def state_path(self, round: int) -> Path:
        return self.directory / f"round-{round:06d}.state.safetensors"

    def save(self, round: int, parts: list[bytes | memoryview],
             state: list[bytes | memoryview] | None = None) -> Path:
        """Write an encoded model (``codec.encode_parts``), and the strategy's state if it has one, as
        the checkpoint of ``round``. The state goes first: a model file without its state is never the
        newest checkpoint."""
        if state is not None:
            write_atomic(self.state_path(round), state)
        path = self.path(round)
        write_atomic(path, parts)
        for old in self.rounds()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)
            self.state_path(old).unlink(missing_ok=True)
        # A coordinator killed while writing a checkpoint leaves its temp file (write_atomic names it
        # after its pid); nothing else would ever remove it.
        mine = f".{os.getpid()}.tmp"
        for tmp in self.directory.glob(".round-*.tmp"):
            if not tmp.name.endswith(mine):
                tmp.unlink(missing_ok=True)
        return path

    def load_state(self, round: int) -> tuple[Weights, dict[str, str]] | None:
        """The strategy state saved with ``round``, or None if that round saved none."""
        path = self.state_path(round)
        if not path.exists():
            return None
        try:
            weights, meta = codec.decode(path.read_bytes())
        except (OSError, ProtocolError) as exc:
            raise StorageError(f"cannot read strategy state {path}: {exc}") from exc
        return {k: v.copy() for k, v in weights.items()}, meta

    def rounds(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := _NAME.match(p.name)))

    def load(self, round: int) -> tuple[Weights, dict[str, str]]:
        path = self.path(round)
        try:
            weights, meta = codec.decode(path.read_bytes())
        except (OSError, ProtocolError) as exc:
            raise StorageError(f"cannot read checkpoint {path}: {exc}") from exc
        return {k: v.copy() for k, v in weights.items()}, meta
