"""A TCP gate in front of a fake server: passes bytes through, or refuses connections on demand.

"Refused" for real: the listening socket is closed and every open connection through the gate is
cut, so a client's pooled keep-alive connection cannot hide the outage. Reopening listens on the
same port again.
"""

from __future__ import annotations

import asyncio
import contextlib


class Gate:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``backend_port`` while open."""

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    async def open(self) -> int:
        """Listen (on the same port as before, after a refusal); returns the port."""
        self._server = await asyncio.start_server(
            self._link, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def refuse(self) -> None:
        """Close the listener and cut every connection: new connections are refused."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    async def close(self) -> None:
        await self.refuse()
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            back_reader, back_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError:
            writer.transport.abort()
            return
        self._links.update((writer, back_writer))
        for source, sink in ((reader, back_writer), (back_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pump(source, sink))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.transport.abort()
        self._links.discard(sink)
