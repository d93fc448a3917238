"""A fault-injecting TCP proxy for tests: latency, stalls, drops, resets, black holes.

:class:`FaultProxy` listens on a loopback port and forwards every connection to
a target (a Redis server started by the test suite). Between the two it can
delay traffic, hold it back, throw it away, or cut connections, so a test can
show how a client behaves when the network misbehaves, without touching the
server process. It only ever listens on and connects to loopback addresses.

Example:
    ```python
    from kivigo_async import Client, OperationTimeoutError
    from kivigo_async.backends.redis import RedisBackend, RedisOptions
    from kivigo_async.testing.proxy import FaultProxy

    async with FaultProxy(server.host, server.port) as proxy:
        backend = RedisBackend(RedisOptions(addr=proxy.addr, read_timeout=0.5))
        async with Client(backend) as client:
            await client.set("k", 1)
            proxy.blackhole()  # the server stops answering, as far as the client can tell
            with pytest.raises(OperationTimeoutError):
                await client.get("k")
            proxy.heal()
            assert await client.get("k") == 1  # the client reconnected by itself
    ```
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections import deque
from types import TracebackType
from typing import Literal

__all__ = ["FaultProxy", "Mode"]

#: What the proxy does with traffic: forward it, hold it until healed, drop it,
#: or drop only the server's replies.
Mode = Literal["forward", "stall", "blackhole", "mute"]

_CHUNK = 65536


def _check_loopback(host: str, what: str) -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"FaultProxy {what} must be a loopback address, not {host!r}")


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN: SO_LINGER with a zero timeout."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One proxied connection: a client side, a server side and two pumps."""

    def __init__(self, proxy: FaultProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._proxy = proxy
        self._client = (reader, writer)
        self._server: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._closed = False
        self._reset = False

    async def run(self) -> None:
        proxy = self._proxy
        try:
            server = await asyncio.open_connection(proxy.target_host, proxy.target_port)
        except OSError:
            # The target is down: the client sees its connection reset, as if refused.
            _reset(self._client[1])
            return
        self._server = server
        if self._closed:
            # Dropped or reset while this side was still connecting: end it the same way.
            if self._reset:
                _reset(server[1])
            else:
                server[1].close()
            return
        (client_in, client_out), (server_in, server_out) = self._client, self._server
        pumps = [
            asyncio.ensure_future(self._pump(client_in, server_out, replies=False)),
            asyncio.ensure_future(self._pump(server_in, client_out, replies=True)),
        ]
        try:
            # Either side closing ends the link: Redis connections are never half-open.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.close()
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, replies: bool) -> None:
        """Move bytes one way, honouring latency, stalls and black holes; ``b""`` marks the end."""
        proxy = self._proxy
        loop = asyncio.get_running_loop()
        pending: deque[tuple[float, bytes]] = deque()
        ready = asyncio.Event()

        async def read() -> None:
            try:
                while True:
                    data = await source.read(_CHUNK)
                    if data and (proxy.mode == "blackhole" or (replies and proxy.mode == "mute")):
                        continue
                    pending.append((loop.time() + proxy.latency, data))
                    ready.set()
                    if not data:
                        return
            except OSError:
                pending.append((loop.time(), b""))
                ready.set()

        reader = asyncio.ensure_future(read())
        try:
            while True:
                while not pending:
                    ready.clear()
                    await ready.wait()
                due, data = pending[0]
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await proxy._flowing.wait()
                pending.popleft()
                if not data:
                    return  # the other side closed: so does this one (see run())
                sink.write(data)
                await sink.drain()
        except OSError:
            return
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    def close(self, *, reset: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self._reset = reset
        for side in (self._client, self._server):
            if side is None:
                continue
            writer = side[1]
            if reset:
                _reset(writer)
            else:
                writer.close()


class FaultProxy:
    """A TCP proxy between a client and a server, with faults switched on at will.

    Args:
        target_host: the server's address (loopback only).
        target_port: the server's port.
        host: the address to listen on (loopback only); any ``127.x.y.z`` works,
            which lets a test reach a TLS server under a name its certificate lacks.
        port: the port to listen on; ``0`` picks a free one.

    Faults, all switchable while connections are open:

    * :attr:`latency` -- seconds added to every chunk, each way (order is kept).
    * :meth:`stall` -- hold all traffic back (nothing is lost) until :meth:`heal`.
    * :meth:`blackhole` -- silently discard all traffic, connections stay open.
    * :meth:`mute` -- discard only the server's replies (commands still run).
    * :meth:`refuse` -- reset new connections at once, as a server that is down.
    * :meth:`drop_connections` / :meth:`reset_connections` -- close every open
      connection with a FIN or an RST.

    Example:
        ```python
        async with FaultProxy("127.0.0.1", server.port) as proxy:
            proxy.latency = 0.05
            ...
            await proxy.reset_connections()
        ```
    """

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0) -> None:
        _check_loopback(target_host, "target")
        _check_loopback(host, "host")
        self.target_host = target_host
        self.target_port = target_port
        self._host = host
        self._port = port
        self.latency = 0.0
        self._mode: Mode = "forward"
        self._refusing = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0

    def __repr__(self) -> str:
        return f"<FaultProxy {self._host}:{self._port} -> {self.target_host}:{self.target_port} {self._mode}>"

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The listening port (known once started)."""
        return self._port

    @property
    def addr(self) -> str:
        """``"host:port"`` to give a client instead of the server's address."""
        return f"{self._host}:{self._port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def connections(self) -> int:
        """Connections open through the proxy right now."""
        return len(self._links)

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> FaultProxy:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, self._host, self._port)
            self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and close every connection (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self._flowing.set()
        for link in list(self._links):
            link.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- faults ------------------------------------------------------------

    def stall(self) -> None:
        """Hold all traffic back, both ways, until :meth:`heal`; nothing is lost."""
        self._mode = "stall"
        self._flowing.clear()

    def blackhole(self) -> None:
        """Discard all traffic, both ways; connections stay open and new ones are accepted."""
        self._mode = "blackhole"
        self._flowing.set()

    def mute(self) -> None:
        """Discard the server's replies only: commands still reach the server and run.

        What a client sees when a reply is lost after the server acted on the
        command, e.g. an ``EXEC`` that was applied.
        """
        self._mode = "mute"
        self._flowing.set()

    def refuse(self) -> None:
        """Reset new connections as soon as they are accepted (until :meth:`heal`)."""
        self._refusing = True

    def heal(self) -> None:
        """Forward traffic again (what a stall held back is delivered); accept connections."""
        self._mode = "forward"
        self._refusing = False
        self._flowing.set()

    async def drop_connections(self) -> int:
        """Close every open connection cleanly (FIN), both sides; return how many."""
        return await self._cut(reset=False)

    async def reset_connections(self) -> int:
        """Abort every open connection (RST), both sides; return how many."""
        return await self._cut(reset=True)

    async def _cut(self, *, reset: bool) -> int:
        links = list(self._links)
        for link in links:
            link.close(reset=reset)
        await asyncio.sleep(0)  # let the transports report the loss to both ends
        return len(links)

    # -- internals ---------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._refusing:
            _reset(writer)
            return
        link = _Link(self, reader, writer)
        self._links.add(link)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await link.run()
        except asyncio.CancelledError:
            link.close()
        finally:
            self._links.discard(link)
            if task is not None:
                self._tasks.discard(task)
