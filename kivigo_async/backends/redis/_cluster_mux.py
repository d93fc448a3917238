"""Cluster commands on one multiplexed connection per node.

redis-py's cluster client spends about 25 µs of CPU per command in a pipeline
(its Python packer, then an ``asyncio.timeout`` around each reply it reads),
and more for a single command (it parses the command's keys to find the slot,
takes a pooled connection, wraps the call in timeouts). Here a command goes to
its node's multiplexed connection (the standalone transport: hiredis parsing,
one deadline per connection, cancellation-safe), where the commands of all
tasks for that node leave together in one write. A batch's share for a node
leaves in one write and comes back as one list.

Redirections are followed as redis-py follows them: ``MOVED`` updates the
slot's owner (after a pause when two nodes send the command back and forth),
``ASK`` re-sends the command with ``ASKING`` in one write to the
node importing the slot, ``TRYAGAIN`` waits a little.

After a lost connection or a timeout the layout is learned anew (the node may
have failed over), so that the next call goes to the slot's new owner.
A single command is then retried up to ``max_retries`` times, as redis-py
retries it (a write may be applied twice). A batch read is sent once more,
since it applied nothing; a batch write is not, since it may have been
applied: its caller hears of the failure. The same goes for a batch write's
keys re-sent one by one after a redirection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import hiredis
from redis import exceptions as rx
from redis._parsers.base import BaseParser
from redis.asyncio.cluster import ClusterNode, NodesManager
from redis.cluster import get_node_name

from ._errors import is_dial_timeout
from ._mux import Arg, MuxConnection, backoff

__all__ = ["NodeConnections", "follow_moved", "reply_value"]

#: (command, slot) -> the node to send it to.
Route = Callable[[Sequence[Any]], ClusterNode]


async def follow_moved(
    nodes: NodesManager, error: rx.MovedError, refused_by: str, redirected_by: set[str], redirects: int
) -> None:
    """Make the node ``error`` names the slot's owner, after a pause if it is a bounce.

    ``redirected_by``: the nodes that answered ``MOVED`` or ``ASK`` earlier in
    this command (``redirects`` so far). A ``MOVED`` back to one of them means
    the two disagree on the slot: a migration's end (or its abort) has reached
    one and not yet the other, as with tooling that tells the source before the
    target. Followed at once, the redirections would run out in a millisecond;
    the pause gives the other node time to hear of it.
    """
    redirected_by.add(refused_by)
    if get_node_name(error.host, error.port) in redirected_by:
        await asyncio.sleep(min(0.05 * redirects, 0.25))
    await nodes.move_slot(error)


def reply_value(reply: Any) -> Any:
    """A reply as redis-py's pipeline gives it: a server error becomes its exception.

    The same classes redis-py raises (``MovedError``, ``AskError``,
    ``TryAgainError``, ``NoPermissionError``...), so redirections and error
    messages are handled as for any other pipeline.
    """
    if reply.__class__ is hiredis.ReplyError:
        return BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
    return reply


class NodeConnections:
    """One multiplexed connection per node name, opened on first use."""

    def __init__(
        self,
        connect: Callable[[str], MuxConnection],
        refresh: Callable[[], Awaitable[Collection[str]]],
        nodes: NodesManager,
        *,
        max_retries: int,
        max_redirects: int,
    ) -> None:
        self._connect = connect
        self._refresh = refresh  # learns the layout; returns the names of its nodes
        self._nodes = nodes
        self._max_retries = max_retries
        self._max_redirects = max_redirects
        self._conns: dict[str, MuxConnection] = {}
        self._retired: list[MuxConnection] = []  # may still wait for replies
        self._closed = False

    def _conn(self, name: str) -> MuxConnection:
        conn = self._conns.get(name)
        if conn is None:
            if self._closed:
                raise rx.ConnectionError(f"connection to {name} is closed")
            conn = self._conns[name] = self._connect(name)
        return conn

    async def command(self, args: tuple[Arg, ...], route: Route, *, retry: bool = True) -> Any:
        """The reply to the single-key command ``args``; a server error is raised.

        Redirections are followed (at most ``max_redirects``); after a lost
        connection, a timeout (a dial timeout too: the connection does not retry
        it) or ``CLUSTERDOWN`` the layout is learned again and the command
        retried, at most ``max_retries`` times: a node that stopped answering may
        have been replaced by its replica. With ``retry=False`` (a batch write's
        key, re-sent after a redirection) a lost connection or a timeout is
        raised once the layout is learned again, as for the batch itself: the
        write may have been applied.
        """
        nodes = self._nodes
        ask: str | None = None  # the node an ASK sent the command to
        redirected_by: set[str] = set()
        redirects = failures = 0
        while True:
            try:
                if ask is None:
                    name = route(args).name
                    reply = await self._conn(name).send_command(args)
                else:
                    name, ask = ask, None
                    reply = (await self._conn(name).execute_many([("ASKING",), args]))[1]
                if reply.__class__ is not hiredis.ReplyError:
                    return reply
                error = reply_value(reply)
                if isinstance(error, rx.ClusterDownError):
                    raise error
            except (rx.ConnectionError, rx.TimeoutError, rx.ClusterDownError, rx.SlotNotCoveredError) as exc:
                if self._closed or isinstance(exc, rx.AuthenticationError):
                    raise
                if isinstance(exc, rx.ClusterDownError):
                    await asyncio.sleep(0.25)  # a failover under way: give it a moment
                with contextlib.suppress(Exception):
                    await self._relearn()
                # CLUSTERDOWN and an uncovered slot applied nothing: those are retried always.
                lost = isinstance(exc, (rx.ConnectionError, rx.TimeoutError))
                if failures >= self._max_retries or (lost and not retry):
                    raise
                failures += 1
                await asyncio.sleep(backoff(failures))
                continue
            if not isinstance(error, (rx.AskError, rx.TryAgainError)):  # MovedError is an AskError
                raise error
            redirects += 1
            if redirects > self._max_redirects:  # before any pause: nothing follows it
                raise rx.ClusterError(f"gave up after following {self._max_redirects} redirections ({error})")
            if isinstance(error, rx.MovedError):
                await follow_moved(nodes, error, name, redirected_by, redirects)
            elif isinstance(error, rx.AskError):
                redirected_by.add(name)
                # By address: a node joining the cluster serves no slot yet, so the
                # layout does not list it while the first slot migrates to it.
                ask = get_node_name(error.host, error.port)
            else:
                # TRYAGAIN: the slot is moving and the keys are split between the two nodes.
                await asyncio.sleep(0.05 * redirects)

    async def send(self, commands: Sequence[tuple[Arg, ...]], route: Route, *, reads: bool) -> list[Any]:
        """The replies to ``commands`` in order, server errors as exception values.

        A lost connection or a timeout makes the layout be learned again (the
        node may have failed over); after a lost connection, ``reads`` (commands
        that change nothing) are sent a second time.
        """
        for attempt in range(2):
            try:
                return await self._send_once(commands, route)
            except rx.TimeoutError:
                # A node that stopped answering may have been replaced by now: the
                # next call must not go to it again. The call itself is not retried.
                if not self._closed:
                    with contextlib.suppress(Exception):
                        await self._relearn()
                raise
            except rx.ConnectionError as exc:
                if self._closed or isinstance(exc, rx.AuthenticationError):
                    raise
                try:
                    await self._relearn()
                except Exception:
                    raise exc from None  # the lost connection is the news, not the lookup after it
                # A dial timeout already waited dial_timeout: not twice.
                if attempt or not reads or is_dial_timeout(exc):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _relearn(self) -> None:
        """Learn the layout; connections to nodes no longer in it are retired."""
        nodes = await self._refresh()
        if self._closed:
            return
        self._retired = [conn for conn in self._retired if conn.draining]
        for name in [name for name in self._conns if name not in nodes]:
            conn = self._conns.pop(name)
            conn.retire()
            self._retired.append(conn)

    async def _send_once(self, commands: Sequence[tuple[Arg, ...]], route: Route) -> list[Any]:
        groups: dict[str, list[int]] = {}
        for index, args in enumerate(commands):
            groups.setdefault(route(args).name, []).append(index)
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
        conns = [*self._conns.values(), *self._retired]
        self._conns.clear()
        self._retired.clear()
        for conn in conns:
            await conn.close()
