"""Keyspace-notification subscribers behind ``watch()`` on the Redis backends.

Each watch gets its own connection per node (one for a standalone server or a
sentinel-managed primary, one per primary of a cluster), because a connection
in subscribed mode can run nothing else and because closing a watch must not
disturb anyone else's. On each connection, before subscribing:

1. unless ``configure_server=False``, ``CONFIG GET notify-keyspace-events``;
   when a flag we need is missing, ``CONFIG SET`` to the current flags *plus*
   the missing ones (flags someone else turned on are never turned off). Not
   atomic: a flag another client adds between the two is lost (the server has
   no command that adds flags, and scripts may not run ``CONFIG``);
2. the node's state, which the heartbeat compares later: on a cluster its own
   line of ``CLUSTER NODES`` (role, config epoch, slots, slots being moved),
   elsewhere its role and replication id from ``INFO replication``; when those
   are refused, the role ``HELLO`` reports;
3. ``PSUBSCRIBE __keyspace@<db>__:<prefix, glob-escaped>*``.

A lost connection fails the stream with :class:`BackendUnavailableError`
rather than resubscribing: pub/sub keeps nothing for an absent subscriber, so
a silent reconnect would hide a gap. A heartbeat ``PING`` finds a server that
stopped answering (a partition, a frozen host) within about
:data:`_HEARTBEAT` + ``read_timeout`` seconds (without a ``read_timeout``,
the client cache's stall bound stands for it).

The same heartbeat asks each node for its state again, and fails the stream
when it changed. A primary demoted to replica (a cluster's ``CLUSTER
FAILOVER``, a standalone ``REPLICAOF``) keeps its subscribers; what it
publishes then comes from replication (an expiry arrives as ``del``), and a
full resync replaces its data without a single event. Each key of a slot
moved by resharding is published as ``restore`` by the new owner and ``del``
by the old, on different connections, so in either order. Neither can be told
from real changes as they arrive; ending the watch afterwards tells the
consumer to resynchronise. On a subscribed RESP2 connection the server runs
only ``PING`` and subscription commands, so this second question goes on a
connection of its own, opened by the first heartbeat.

When the watch read ``notify-keyspace-events`` at subscribe, the heartbeat
reads it again, in the same write as the state: an operator or another tool
turning a needed flag off silences the subscription without closing it, and
the watch then fails with :class:`NotificationsDisabledError`. With
``configure_server=False`` no ``CONFIG`` command is sent, so nothing notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import hiredis
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
from . import _cache
from ._cache import heartbeat
from ._errors import translate
from ._mux import MuxConnection
from ._scan import decode_key, match_pattern
from .cluster import RedisClusterBackend
from .options import RedisOptions, join_addr
from .sentinel import RedisSentinelBackend
from .standalone import RedisBackend, _mux_for

__all__ = [
    "EVENT_TYPES",
    "NEEDED_FLAGS",
    "NodeState",
    "missing_flags",
    "node_state",
    "watch_cluster",
    "watch_standalone",
]

_log = logging.getLogger("kivigo_async.watch")

#: Keyspace events a watch needs: K (keyspace channels), g (generic: del,
#: rename...), $ (strings: set, incrby...), x (expired), e (evicted).
NEEDED_FLAGS = "Kg$xe"
# What "A" stands for in notify-keyspace-events (every class but K, E, n, m).
_ALL_CLASSES = "g$lshzxetd"

#: Keyspace event names -> change types. The generic ones (del, rename_*,
#: copy_to, move_*, restore, expired, evicted) come for keys of every type;
#: other events (a TTL set or removed, a change to the contents of a list,
#: hash, set...) are not reported.
_SET_EVENTS = b"set setrange incrby incrbyfloat append rename_to copy_to move_to restore".split()
EVENT_TYPES: dict[bytes, ChangeType] = {
    **dict.fromkeys(_SET_EVENTS, ChangeType.SET),
    **dict.fromkeys((b"del", b"rename_from", b"move_from", b"evicted"), ChangeType.DELETE),
    b"expired": ChangeType.EXPIRE,
}

# Seconds between PINGs on an idle subscription: a dead peer is otherwise only
# noticed by TCP keepalive, hours later, while the watch waits in silence.
_HEARTBEAT = 15.0

# What a node is asked about its state. CLUSTER NODES tells a cluster node's role
# and slots; HELLO (with the protocol the connection speaks already) tells the role
# only, but any user may run it, unlike ROLE (@admin @dangerous).
_CLUSTER_NODES = ("CLUSTER", "NODES")
# Elsewhere INFO replication tells the role and the replication id, which a
# server demoted and promoted again between two beats changes (its data may have
# been replaced by a full resync meanwhile); it is @dangerous, so HELLO stands in
# for users without it.
_INFO_REPLICATION = ("INFO", "replication")
_HELLO = ("HELLO", "2")
_CONFIG_GET = ("CONFIG", "GET", "notify-keyspace-events")
#: What each probe leaves unseen when the one before it was refused.
_MISSED = {
    _CLUSTER_NODES: "the slots this primary serves; resharding will not end the watch, a failover still will",
    _INFO_REPLICATION: (
        "its replication id; a demotion undone between two heartbeats will not end the watch, "
        "one that lasts still will"
    ),
}
_ROLES = {"master": "primary", "slave": "replica", "replica": "replica"}
#: Error replies that will not change from one beat to the next: the ACL refuses
#: the command, or the server does not know it (renamed away).
_REFUSALS = ("NOPERM", "ERR unknown command", "ERR unknown subcommand")

#: A node's state as the heartbeat compares it: its role ("primary" or
#: "replica"), then on a cluster its config epoch and slots.
NodeState = tuple[str, ...]


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


def node_state(probe: tuple[str, ...], reply: Any) -> NodeState | None:
    """The state in ``reply`` (to ``probe``), or ``None`` when the reply says nothing usable.

    Example:
        >>> node_state(("HELLO", "2"), [b"server", b"valkey", b"role", b"master", b"modules", []])
        ('primary',)
        >>> line = b"07c3 127.0.0.1:7000@17000 myself,master - 0 0 3 connected 0-5460 [93->-5cf2]"
        >>> node_state(("CLUSTER", "NODES"), line + b"\\n")
        ('primary', '3', '0-5460', '[93->-5cf2]')
        >>> node_state(("INFO", "replication"), b"role:master\\r\\nmaster_replid:9f1c\\r\\n")
        ('primary', '9f1c')
    """
    if probe == _CLUSTER_NODES:
        text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
        for line in text.splitlines():
            # id addr flags primary-id ping-sent pong-recv config-epoch link-state slot...
            fields = line.split()
            if len(fields) < 8 or "myself" not in fields[2].split(","):
                continue
            flags = fields[2].split(",")
            role = "primary" if "master" in flags else "replica" if "slave" in flags else None
            # The epoch moves when a slot is imported, even one that comes back before
            # the next heartbeat; a slot being moved shows as [slot->-id] / [slot-<-id].
            return None if role is None else (role, fields[6], *fields[8:])
        return None
    if probe == _INFO_REPLICATION:
        text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
        info = dict(line.partition(":")[::2] for line in text.splitlines() if ":" in line)
        role, replid = info.get("role", "").strip(), info.get("master_replid", "").strip()
        return (_ROLES[role], replid) if role in _ROLES and replid else None
    if isinstance(reply, list):
        # RESP2: name, value, name, value...
        value = dict(zip(reply[::2], reply[1::2], strict=False)).get(b"role")
        if isinstance(value, bytes) and value.decode(errors="replace") in _ROLES:
            return (_ROLES[value.decode()],)
    return None


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

    def __init__(
        self, options: RedisOptions, db: int, prefix: str, owner: _RedisWatch, *, cluster: bool
    ) -> None:
        self.node = options.addr
        self._watch = owner
        self._head = f"__keyspace@{db}__:".encode()
        self.pattern = self._head + match_pattern(prefix).encode("utf-8", "surrogateescape")
        self.subscribed = False
        self.conn = _mux_for(options, select_db=False, on_push=self._on_message, on_lost=self._on_lost)
        self._options = options
        self._read_timeout = options.read_timeout
        self._cluster = cluster
        self._probe: tuple[str, ...] | None = None  # None: only PING is left to the heartbeat
        self._state: NodeState = ()
        # Only once CONFIG GET answered at subscribe: told configure_server=False, the
        # watch sends no CONFIG at all (each refusal would land in the server's ACL LOG).
        self._config_check = False
        self.check: MuxConnection | None = None  # opened by the first heartbeat

    async def subscribe(self, configure_server: bool) -> None:
        conn, node = self.conn, self.node
        try:
            if configure_server:
                await self._configure()
            await self._learn_state()
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
            current = _config_value(await self.conn.execute(*_CONFIG_GET))
            self._config_check = True
            missing = missing_flags(current)
            if missing:
                await self.conn.execute("CONFIG", "SET", "notify-keyspace-events", current + missing)
                _log.info("%s: turned on keyspace events %r (were %r)", self.node, missing, current)
        except rx.ResponseError as exc:
            step = "CONFIG GET" if current is None else "CONFIG SET"
            raise _refused(self.node, exc, step, current) from exc

    async def _learn_state(self) -> None:
        # Asked on this connection, before PSUBSCRIBE: a change after this point, even
        # one before the subscription, differs from what the heartbeat will find.
        probes = (_CLUSTER_NODES, _HELLO) if self._cluster else (_INFO_REPLICATION, _HELLO)
        refused: list[str] = []
        for probe in probes:
            try:
                reply = await self.conn.execute(*probe)
            except rx.ResponseError as exc:
                refused.append(f"{' '.join(probe)}: {exc}")
                continue
            state = node_state(probe, reply)
            if state is None:
                refused.append(f"{' '.join(probe)}: unexpected reply")
                continue
            self._probe, self._state = probe, state
            break
        if self._probe is None:
            _log.warning(
                "watch on %s: cannot learn the server's role (%s); a failover that leaves the "
                "subscription's connection open will not end the watch",
                self.node,
                "; ".join(refused),
            )
        elif refused:
            _log.warning(
                "watch on %s: cannot learn %s (%s)", self.node, _MISSED[probes[0]], "; ".join(refused)
            )
        if self._cluster and self._state[:1] == ("replica",):
            raise BackendUnavailableError(
                f"watch on {self.node}: this node is no longer a primary (the cluster's layout "
                "changed while the watch started): watch again"
            )

    async def beat(self) -> None:
        """PING the subscription, then ask the node its state and ``notify-keyspace-events`` again.

        Raises :class:`BackendUnavailableError` when the state changed since the
        watch subscribed, :class:`NotificationsDisabledError` when a flag the
        watch needs was turned off; a refusal or an outage of the check is
        logged and left to the next beat (a lost subscription fails the watch by
        itself).
        """
        if not self.conn.connected:
            return
        # Bounded even with read_timeout=None: a silent server must end the watch.
        await heartbeat(self.conn, self._read_timeout)
        probe = self._probe
        commands = [c for c in (probe, _CONFIG_GET if self._config_check else None) if c is not None]
        if not commands or not self.conn.connected:
            return
        if self.check is None:
            self.check = _mux_for(self._options, select_db=False)
        check = self.check
        call = check.execute_many(commands)  # one write, one round trip, however many questions
        try:
            if self._read_timeout is None:
                replies = await asyncio.wait_for(call, _cache._STALL)
            else:
                replies = await call  # the connection aborts itself at read_timeout
        except asyncio.TimeoutError:
            check.drop()
            _log.debug("watch on %s: no reply to %s", self.node, " / ".join(" ".join(c) for c in commands))
            return
        answers = dict(zip(commands, replies, strict=True))
        # The setting first: a watch ended for a failover is usually watched again at
        # once, which (configure_server=True) turns the flags back on, with a log line
        # at INFO as the only trace of an operator's decision undone.
        if _CONFIG_GET in answers and self._answered(_CONFIG_GET, answers[_CONFIG_GET]):
            current = _config_value(answers[_CONFIG_GET])
            missing = missing_flags(current)
            if missing:
                # Events published before the setting changed are queued on the
                # subscription ahead of this PING's reply: they reach the feed before
                # the error does. After the change, nothing was published to lose. A
                # subscription lost meanwhile fails the watch by itself.
                with contextlib.suppress(rx.RedisError):
                    await heartbeat(self.conn, self._read_timeout)
                # Not turned back on, though configure_server=True let the watch turn
                # them on at subscribe: the changes made meanwhile are lost either way,
                # so the watch must end regardless, and a CONFIG SET from a background
                # task would undo an operator's decision (or race a tool that resets
                # the setting) with nobody watching. Turning them on again is left to
                # the next watch(), which the application starts knowingly.
                raise self._turned_off(current, missing)
        if probe is not None and self._answered(probe, answers[probe]):
            state = node_state(probe, answers[probe])
            if state is not None and state != self._state:
                raise self._changed(state)

    def _answered(self, command: tuple[str, ...], reply: Any) -> bool:
        """Whether ``reply`` answers ``command``; a lasting refusal stops asking it."""
        if not isinstance(reply, hiredis.ReplyError):
            return True
        what = " ".join(command)
        if not str(reply).startswith(_REFUSALS):
            # A passing state (LOADING, no room for a client): asked again next beat.
            _log.debug("watch on %s: %s failed for now: %s", self.node, what, reply)
            return False
        if command == _CONFIG_GET:
            self._config_check = False
            _log.warning(
                "watch on %s: CONFIG GET refused (%s); keyspace notifications turned off on the "
                "server will not end the watch from now on",
                self.node,
                reply,
            )
        else:
            self._probe = None
            _log.warning(
                "watch on %s: %s refused (%s); the heartbeat checks liveness only from now on",
                self.node,
                what,
                reply,
            )
        return False

    def _turned_off(self, current: str, missing: str) -> NotificationsDisabledError:
        return NotificationsDisabledError(
            f"watch on {self.node}: keyspace notifications were turned off after the watch subscribed "
            f"(notify-keyspace-events is {current!r}, lacking {missing!r} of {NEEDED_FLAGS!r}); changes "
            "made since were not published. Find out who turned them off before watching again "
            "(watch() with configure_server=True turns them back on); then resynchronise"
        )

    def _changed(self, state: NodeState) -> BackendUnavailableError:
        was = self._state
        if state[0] != was[0]:
            what = f"the server is a {state[0]} now, no longer a {was[0]} (a failover, or REPLICAOF)"
        elif self._probe == _INFO_REPLICATION:
            what = "the server's replication id changed (it was a replica in between, and may have resynced)"
        else:
            what = "the slots this primary serves changed (resharding)"
        return BackendUnavailableError(
            f"watch on {self.node}: {what}; changes made since may have been missed or misreported: "
            "resynchronise and watch again"
        )

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

    def __init__(
        self, targets: Sequence[RedisOptions], db: int, prefix: str, max_pending: int, *, cluster: bool
    ) -> None:
        self.feed = ChangeFeed(max_pending=max_pending, halt=self._halt, release=self._release)
        self._subscribers = [_Subscriber(options, db, prefix, self, cluster=cluster) for options in targets]
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
            results = await asyncio.gather(*(s.beat() for s in self._subscribers), return_exceptions=True)
            for result in results:
                if isinstance(result, (BackendUnavailableError, NotificationsDisabledError)):
                    self.feed.fail(result)  # halts the watch, this task included
                    return
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
            if subscriber.check is not None:
                subscriber.check.drop()

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
            if subscriber.check is not None:
                await subscriber.check.close()


def _check_prefix(prefix: str, max_pending: int) -> None:
    _check_watch_args(prefix, max_pending)
    try:
        prefix.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise InvalidKeyError(f"prefix {prefix!r} cannot be encoded as UTF-8 (a lone surrogate?)") from None


async def _open(
    targets: Sequence[RedisOptions],
    db: int,
    prefix: str,
    max_pending: int,
    configure_server: bool,
    *,
    cluster: bool = False,
) -> ChangeStream:
    return await _RedisWatch(targets, db, prefix, max_pending, cluster=cluster).start(configure_server)


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
    if _is_closed(backend):
        raise _closed_error(backend)
    if isinstance(backend, RedisSentinelBackend):
        try:
            options = await _sentinel_primary(backend)
        except KivigoError:
            if _is_closed(backend):  # the look-up failed because close() cut it short
                return _closed_meanwhile(backend, max_pending)
            raise
        if _is_closed(backend):
            return _closed_meanwhile(backend, max_pending)
    else:
        options = backend.options
    stream = await _open([options], options.db, prefix, max_pending, configure_server)
    if _is_closed(backend):
        # The subscriber's connection is its own, which close() does not know of.
        await stream.aclose()
        return _closed_meanwhile(backend, max_pending)
    return stream


def _is_closed(backend: RedisBackend) -> bool:
    return bool(getattr(getattr(backend, "_pool", None), "closed", False))


def _closed_error(backend: RedisBackend) -> BackendUnavailableError:
    return BackendUnavailableError(f"watch on {backend.options.addr}: the client is closed")


def _closed_meanwhile(backend: RedisBackend, max_pending: int) -> ChangeStream:
    """What watch() gives when the backend closed while it subscribed: a stream that fails so.

    Not an error raised: Client.watch() ends a loop quietly when its client closed
    meanwhile, and can tell so only from a stream it gets back.
    """
    feed = ChangeFeed(max_pending=max_pending)
    feed.fail(_closed_error(backend))
    return feed


async def watch_cluster(
    backend: RedisClusterBackend, prefix: str, max_pending: int, configure_server: bool
) -> ChangeStream:
    """:meth:`RedisClusterBackend.watch`: one subscriber per primary, each publishing its own keys."""
    _check_prefix(prefix, max_pending)
    primaries = await backend._primaries()
    if not primaries:
        raise KivigoError(f"watch on {backend!r}: the cluster has no primary")
    targets = [backend.options.node_options(str(node.name)) for node in primaries]
    return await _open(targets, 0, prefix, max_pending, configure_server, cluster=True)
