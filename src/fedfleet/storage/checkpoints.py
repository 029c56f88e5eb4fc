"""Per-round checkpoints of the global model as safetensors files, written atomically."""

from __future__ import annotations

import re
from pathlib import Path

from fedfleet.errors import ProtocolError, StorageError
from fedfleet.protocol import codec
from fedfleet.storage.files import write_atomic
from fedfleet.types import Weights

_NAME = re.compile(r"^round-(\d{6})\.safetensors$")


class Checkpoints:
    """``DIR/round-000012.safetensors``; the newest ``keep`` are kept."""

    def __init__(self, directory: Path, keep: int = 3) -> None:
        self.directory = directory
        self.keep = keep

    def path(self, round: int) -> Path:
        return self.directory / f"round-{round:06d}.safetensors"

    def save(self, round: int, parts: list[bytes | memoryview]) -> Path:
        """Write an encoded model (``codec.encode_parts``) as the checkpoint of ``round``."""
        path = self.path(round)
        write_atomic(path, parts)
        for old in self.rounds()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)
        return path

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
