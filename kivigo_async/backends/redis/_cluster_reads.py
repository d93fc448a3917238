"""Batched cluster reads on one multiplexed connection per node.

redis-py's cluster pipeline spends about 25 µs of CPU per command (its Python
packer, then an ``asyncio.timeout`` around each reply it reads): a 1,000-key
``batch_get``, which needs one ``MGET`` per hash slot, is about 1,000
commands. Here each node's share leaves in one write on that node's
multiplexed connection (the standalone transport: hiredis parsing, one
deadline per connection, cancellation-safe), and comes back as one list.

Only reads go this way: a read that met a lost connection is safe to send
again, after learning the layout anew (the node may have failed over). Writes,
and reads while the client cache tracks keys (its invalidations are tied to
redis-py's connections), stay on redis-py's pipeline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import hiredis
from redis import exceptions as rx
from redis._parsers.base import BaseParser
from redis.asyncio.cluster import ClusterNode

from ._errors import is_dial_timeout
from ._mux import Arg, MuxConnection

__all__ = ["NodeReaders", "reply_value"]

#: (command, slot) -> the node to send it to.
Route = Callable[[Sequence[Any]], ClusterNode]


def reply_value(reply: Any) -> Any:
    """A reply as redis-py's pipeline gives it: a server error becomes its exception.

    The same classes redis-py raises (``MovedError``, ``AskError``,
    ``TryAgainError``, ``NoPermissionError``...), so redirections and error
    messages are handled as for any other pipeline.
    """
    if reply.__class__ is hiredis.ReplyError:
        return BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
    return reply


class NodeReaders:
    """One multiplexed connection per node name, opened on first use."""

    def __init__(
        self,
        connect: Callable[[str], MuxConnection],
        refresh: Callable[[], Awaitable[None]],
    ) -> None:
        self._connect = connect
        self._refresh = refresh
        self._conns: dict[str, MuxConnection] = {}
        self._closed = False

    def _conn(self, name: str) -> MuxConnection:
        conn = self._conns.get(name)
        if conn is None:
            if self._closed:
                raise rx.ConnectionError(f"connection to {name} is closed")
            conn = self._conns[name] = self._connect(name)
        return conn

    async def read(self, commands: Sequence[tuple[Arg, ...]], route: Route) -> list[Any]:
        """The replies to ``commands`` in order, server errors as exception values.

        A lost connection (not a timeout, not a refused login) is met once with
        a fresh layout and a second try: after a failover the slot has a new
        owner, and the read was not applied anywhere.
        """
        for attempt in range(2):
            try:
                return await self._read_once(commands, route)
            except rx.ConnectionError as exc:
                if attempt or self._closed or isinstance(exc, rx.AuthenticationError) or is_dial_timeout(exc):
                    raise
                await self._refresh()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read_once(self, commands: Sequence[tuple[Arg, ...]], route: Route) -> list[Any]:
        groups: dict[str, list[int]] = {}
        for index, args in enumerate(commands):
            name = route(args).name
            group = groups.get(name)
            if group is None:
                groups[name] = [index]
            else:
                group.append(index)
        sends = [
            self._conn(name).execute_many([commands[i] for i in group]) for name, group in groups.items()
        ]
        results: list[Any] = [None] * len(commands)
        # Each connection bounds its own wait (read_timeout); a cancelled caller
        # leaves its replies to be read and dropped, so the siblings need no care.
        for group, replies in zip(groups.values(), await asyncio.gather(*sends), strict=True):
            for index, reply in zip(group, replies, strict=True):
                results[index] = reply_value(reply)
        return results

    async def close(self) -> None:
        self._closed = True
        conns = list(self._conns.values())
        self._conns.clear()
        for conn in conns:
            await conn.close()
