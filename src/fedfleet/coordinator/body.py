"""Reading a request body as it streams in: exact-size reads, and reads straight into a buffer.

Reading into a preallocated buffer avoids collecting chunks and joining them (two extra copies of a
model per upload) and lets the coordinator reject a bad header before the tensor bytes arrive.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fedfleet.errors import ProtocolError


class BodyReader:
    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._left = memoryview(b"")
        self.received = 0

    async def _next(self) -> bool:
        async for chunk in self._chunks:
            if chunk:
                self._left = memoryview(chunk)
                self.received += len(chunk)
                return True
        return False

    async def read_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or fewer if the body ends first."""
        out = bytearray()
        while len(out) < n:
            if not self._left and not await self._next():
                break
            take = self._left[: n - len(out)]
            out += take
            self._left = self._left[len(take):]
        return bytes(out)

    async def readinto(self, target: memoryview) -> int:
        """Fill ``target`` from the body; returns how many bytes were written (less at end of body)."""
        pos = 0
        while pos < len(target):
            if not self._left and not await self._next():
                break
            take = min(len(self._left), len(target) - pos)
            target[pos:pos + take] = self._left[:take]
            self._left = self._left[take:]
            pos += take
        return pos

    async def expect_end(self, limit: int) -> None:
        """Raise 413 if any bytes remain in the body (more than its header described)."""
        extra = len(self._left)
        while extra == 0 and await self._next():
            extra = len(self._left)
        if extra:
            raise ProtocolError(f"body is longer than its safetensors header describes "
                                f"(limit {limit} bytes)", status=413)
