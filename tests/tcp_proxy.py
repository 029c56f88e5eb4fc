"""A TCP proxy on 127.0.0.1 that breaks connections on purpose, for tests of interrupted transfers.

``CutProxy(port, down=[N], up=[M])`` forwards to ``127.0.0.1:port``. The first connection to carry N
bytes from the server to the client is closed right after those N bytes (both ways), and so is the
first to carry M bytes from the client to the server; each cut happens once (a list gives several,
in order). Bytes are counted per connection, so small control calls on other connections do not
trigger a cut meant for a model transfer. Real sockets, no mocks.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class CutProxy:
    def __init__(self, port: int, down: list[int] | None = None, up: list[int] | None = None,
                 record: bool = False) -> None:
        self.target = ("127.0.0.1", port)
        # With ``record``: every byte each connection sent towards the server, one bytearray per connection.
        self._record = record
        self.up: list[bytearray] = []
        self._cuts = {"down": list(down or []), "up": list(up or [])}
        self.cuts_done = {"down": 0, "up": 0}
        self.cut_bytes = 0  # bytes forwarded on connections that were then cut
        self.forwarded = {"down": 0, "up": 0}  # bytes forwarded in all, each way
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def sent(self) -> list[bytes]:
        """(``record``) What each connection sent to the server, in the order the connections opened."""
        with self._lock:
            return [bytes(b) for b in self.up]

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            _kill(s)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            record = bytearray() if self._record else None
            with self._lock:
                self._socks += [client, server]
                if record is not None:
                    self.up.append(record)
            pair = (client, server)
            threading.Thread(target=self._pump, args=(client, server, "up", pair, record), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down", pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str,
              pair: tuple[socket.socket, socket.socket], record: bytearray | None = None) -> None:
        seen = 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                with self._lock:
                    cuts = self._cuts[direction]
                    limit = cuts[0] if cuts else None
                    if limit is not None and seen + len(data) >= limit:
                        cuts.pop(0)
                        self.cuts_done[direction] += 1
                        self.cut_bytes += limit
                    else:
                        limit = None
                if record is not None:
                    with self._lock:
                        record += data if limit is None else data[: limit - seen]
                if limit is not None:
                    dst.sendall(data[: limit - seen])
                    self._count(direction, limit - seen)
                    for s in pair:
                        _kill(s)
                    return
                dst.sendall(data)
                self._count(direction, len(data))
                seen += len(data)
        except OSError:
            for s in pair:
                _kill(s)


    def _count(self, direction: str, n: int) -> None:
        with self._lock:
            self.forwarded[direction] += n


def _kill(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()
