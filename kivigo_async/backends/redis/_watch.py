"""Keyspace-notification subscribers behind ``watch()`` on the Redis backends.

Each watch gets its own connection per node (one for a standalone server or a
sentinel-managed primary, one per primary of a cluster), because a connection
in subscribed mode can run nothing else and because closing a watch must not
disturb anyone else's. On each connection, before subscribing:

1. unless ``configure_server=False``, ``CONFIG GET notify-keyspace-events``;
   when a flag we need is missing, ``CONFIG SET`` to the current flags *plus*
   the missing ones (flags someone else turned on are never turned off);
2. ``PSUBSCRIBE __keyspace@<db>__:<prefix, glob-escaped>*``.

A lost connection fails the stream with :class:`BackendUnavailableError`
rather than resubscribing: pub/sub keeps nothing for an absent subscriber, so
a silent reconnect would hide a gap. A heartbeat ``PING`` finds a server that
stopped answering (a partition, a frozen host) within about
:data:`_HEARTBEAT` + ``read_timeout`` seconds (without a ``read_timeout``,
the client cache's stall bound stands for it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from redis import exceptions as rx

from ...errors import BackendUnavailableError, InvalidKeyError, KivigoError, PermissionDeniedError
from ...watch import (
    ChangeEvent,
    ChangeFeed,
    ChangeStream,
    ChangeType,
    NotificationsDisabledError,
    _check_watch_args,
)
from ._cache import heartbeat
from ._errors import translate
from ._scan import decode_key, match_pattern
from .cluster import RedisClusterBackend
from .options import RedisOptions, join_addr
from .sentinel import RedisSentinelBackend
from .standalone import RedisBackend, _mux_for

__all__ = ["EVENT_TYPES", "NEEDED_FLAGS", "missing_flags", "watch_cluster", "watch_standalone"]

_log = logging.getLogger("kivigo_async.watch")

#: Keyspace events a watch needs: K (keyspace channels), g (generic: del,
#: rename...), $ (strings: set, incrby...), x (expired), e (evicted).
NEEDED_FLAGS = "Kg$xe"
# What "A" stands for in notify-keyspace-events (every class but K, E, n, m).
_ALL_CLASSES = "g$lshzxetd"

#: Keyspace event names -> change types; other events (a TTL set or removed,
#: changes to non-string types) are not reported.
_SET_EVENTS = b"set setrange incrby incrbyfloat append rename_to copy_to move_to restore".split()
EVENT_TYPES: dict[bytes, ChangeType] = {
    **dict.fromkeys(_SET_EVENTS, ChangeType.SET),
    **dict.fromkeys((b"del", b"rename_from", b"move_from", b"evicted"), ChangeType.DELETE),
    b"expired": ChangeType.EXPIRE,
}

# Seconds between PINGs on an idle subscription: a dead peer is otherwise only
# noticed by TCP keepalive, hours later, while the watch waits in silence.
_HEARTBEAT = 15.0


def missing_flags(current: str) -> str:
    """The flags of :data:`NEEDED_FLAGS` that ``current`` (a notify-keyspace-events value) lacks.

    Example:
        >>> missing_flags(""), missing_flags("AKE"), missing_flags("Ex")
        ('Kg$xe', '', 'Kg$e')
    """
    have = set(current)
    if "A" in have:
        have.update(_ALL_CLASSES)
    return "".join(flag for flag in NEEDED_FLAGS if flag not in have)


def _config_value(reply: Any) -> str:
    # RESP2: [name, value]; an empty list when the server does not know the setting.
    if isinstance(reply, list) and len(reply) >= 2:
        value = reply[1]
        return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def _refused(node: str, exc: Exception, step: str, current: str | None) -> NotificationsDisabledError:
    now = "unknown" if current is None else repr(current)
    return NotificationsDisabledError(
        f"watch on {node}: keyspace notifications are needed (notify-keyspace-events must include "
        f"{NEEDED_FLAGS!r}; it is {now}) but the server refused {step} ({exc}). "
        f"Set 'notify-keyspace-events {NEEDED_FLAGS}' (or 'KEA') in the server's configuration, "
        "then watch with configure_server=False; or allow this user CONFIG GET and CONFIG SET"
    )


class _Subscriber:
    """One subscribed connection to one node, feeding a shared :class:`ChangeFeed`."""

    def __init__(self, options: RedisOptions, db: int, prefix: str, owner: _RedisWatch) -> None:
        self.node = options.addr
        self._watch = owner
        self._head = f"__keyspace@{db}__:".encode()
        self.pattern = self._head + match_pattern(prefix).encode("utf-8", "surrogateescape")
        self.subscribed = False
        self.conn = _mux_for(options, select_db=False, on_push=self._on_message, on_lost=self._on_lost)
        self._read_timeout = options.read_timeout

    async def subscribe(self, configure_server: bool) -> None:
        conn, node = self.conn, self.node
        try:
            if configure_server:
                await self._configure()
            reply = await conn.execute("PSUBSCRIBE", self.pattern)
        except rx.ResponseError as exc:
            if str(exc).startswith("NOPERM"):
                raise PermissionDeniedError(
                    f"watch on {node}: this user may not subscribe to keyspace notifications ({exc}); "
                    "allow it the channels '__keyspace@*' (ACL '&__keyspace@*')"
                ) from exc
            raise translate(exc, "PSUBSCRIBE", None, node) from exc
        except (rx.RedisError, UnicodeEncodeError) as exc:
            raise translate(exc, "PSUBSCRIBE", None, node) from exc
        if not (isinstance(reply, list) and reply and reply[0] == b"psubscribe"):
            raise BackendUnavailableError(f"watch on {node}: unexpected reply to PSUBSCRIBE: {reply!r}")
        self.subscribed = True
        if not conn.connected:  # lost right after subscribing, before we could notice
            raise BackendUnavailableError(f"watch on {node}: the connection was lost while subscribing")

    async def _configure(self) -> None:
        current: str | None = None
        try:
            current = _config_value(await self.conn.execute("CONFIG", "GET", "notify-keyspace-events"))
            missing = missing_flags(current)
            if missing:
                await self.conn.execute("CONFIG", "SET", "notify-keyspace-events", current + missing)
                _log.info("%s: turned on keyspace events %r (were %r)", self.node, missing, current)
        except rx.ResponseError as exc:
            step = "CONFIG GET" if current is None else "CONFIG SET"
            raise _refused(self.node, exc, step, current) from exc

    async def ping(self) -> None:
        if self.conn.connected:
            # Bounded even with read_timeout=None: a silent server must end the watch.
            await heartbeat(self.conn, self._read_timeout)

    def _on_message(self, message: list[Any]) -> None:
        # [b"pmessage", pattern, channel, event]
        if len(message) != 4 or message[1] != self.pattern:
            return
        change = EVENT_TYPES.get(message[3])
        channel = message[2]
        if change is None or not isinstance(channel, bytes) or not channel.startswith(self._head):
            return
        self._watch.feed.put(ChangeEvent(change, decode_key(channel[len(self._head) :])))

    def _on_lost(self) -> None:
        if self.subscribed:
            self._watch.lost(self.node)


class _RedisWatch:
    """The subscribers of one watch, their heartbeat, and the feed they share."""

    def __init__(self, targets: Sequence[RedisOptions], db: int, prefix: str, max_pending: int) -> None:
        self.feed = ChangeFeed(max_pending=max_pending, halt=self._halt, release=self._release)
        self._subscribers = [_Subscriber(options, db, prefix, self) for options in targets]
        self._heartbeat: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"RedisWatch(nodes={[s.node for s in self._subscribers]!r})"

    async def start(self, configure_server: bool) -> ChangeFeed:
        try:
            # Every subscription settles before we decide: none is left running on failure.
            results = await asyncio.gather(
                *(s.subscribe(configure_server) for s in self._subscribers), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        except BaseException:
            await self.feed.aclose()
            raise
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat(), name=f"kivigo {self!r}")
        return self.feed

    def lost(self, node: str) -> None:
        self.feed.fail(
            BackendUnavailableError(
                f"watch on {node}: the subscription's connection was lost; changes made since may "
                "have been missed: resynchronise and watch again"
            )
        )

    async def _beat(self) -> None:
        while not self.feed.stopped:
            await asyncio.sleep(_HEARTBEAT)
            results = await asyncio.gather(*(s.ping() for s in self._subscribers), return_exceptions=True)
            for result in results:
                if isinstance(result, rx.RedisError):
                    # A stalled reply aborts the connection, whose loss fails the feed;
                    # anything else is worth a log line, not the end of the watch.
                    _log.debug("watch heartbeat: %s", result)
                elif isinstance(result, BaseException):
                    raise result

    def _halt(self) -> None:
        # Synchronous: drop the sockets at once, so nothing more is buffered.
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for subscriber in self._subscribers:
            subscriber.subscribed = False
            subscriber.conn.drop()

    async def _release(self) -> None:
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.cancel()
            # gather, not a suppressed await: a cancellation of *our* caller must propagate.
            [outcome] = await asyncio.gather(heartbeat, return_exceptions=True)
            if isinstance(outcome, Exception):
                _log.warning("watch heartbeat failed: %r", outcome)
        for subscriber in self._subscribers:
            await subscriber.conn.close()


def _check_prefix(prefix: str, max_pending: int) -> None:
    _check_watch_args(prefix, max_pending)
    try:
        prefix.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise InvalidKeyError(f"prefix {prefix!r} cannot be encoded as UTF-8 (a lone surrogate?)") from None


async def _open(
    targets: Sequence[RedisOptions], db: int, prefix: str, max_pending: int, configure_server: bool
) -> ChangeStream:
    return await _RedisWatch(targets, db, prefix, max_pending).start(configure_server)


async def _sentinel_primary(backend: RedisSentinelBackend) -> RedisOptions:
    service = backend.sentinel_options.service_name
    try:
        host, port = await backend.sentinel.discover_master(service)
    except rx.RedisError as exc:
        raise translate(exc, "SENTINEL GET-MASTER-ADDR-BY-NAME", None, repr(backend)) from exc
    return backend.options.replace(addr=join_addr(str(host), int(port)))


async def watch_standalone(
    backend: RedisBackend, prefix: str, max_pending: int, configure_server: bool
) -> ChangeStream:
    """:meth:`RedisBackend.watch`: one subscriber on the server (a sentinel backend's current primary)."""
    _check_prefix(prefix, max_pending)
    pool = getattr(backend, "_pool", None)
    if getattr(pool, "closed", False):
        raise BackendUnavailableError(f"watch on {backend.options.addr}: the client is closed")
    if isinstance(backend, RedisSentinelBackend):
        options = await _sentinel_primary(backend)
    else:
        options = backend.options
    return await _open([options], options.db, prefix, max_pending, configure_server)


async def watch_cluster(
    backend: RedisClusterBackend, prefix: str, max_pending: int, configure_server: bool
) -> ChangeStream:
    """:meth:`RedisClusterBackend.watch`: one subscriber per primary, each publishing its own keys."""
    _check_prefix(prefix, max_pending)
    primaries = await backend._primaries()
    if not primaries:
        raise KivigoError(f"watch on {backend!r}: the cluster has no primary")
    targets = [backend.options.node_options(str(node.name)) for node in primaries]
    return await _open(targets, 0, prefix, max_pending, configure_server)
