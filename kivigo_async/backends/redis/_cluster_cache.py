"""Client-side caching on a cluster: one broadcast-tracking listener per primary.

Why broadcast mode, one connection per primary
----------------------------------------------
Default (non-broadcast) tracking remembers the keys each *connection* read, so
every data connection of redis-py's per-node pools would have to turn tracking
on and redirect it, and a pooled connection that is dropped takes its tracked
keys with it. In broadcast mode the server reports *every* change to a key
(under the configured prefixes) on that node, whoever read it, so the data
connections stay untouched and one listener per primary is enough.

Each listener is a single RESP2 connection that asks for its own id, turns on
``CLIENT TRACKING ON REDIRECT <own id> BCAST [PREFIX p ...]`` and subscribes
to ``__redis__:invalidate``: tracking and delivery live and die together, so
"the listener is up" means exactly "changes on that node reach us".

When entries are dropped
------------------------
- one key, on each invalidation message (a write from anyone, an expiry, an
  eviction, a key migrated away);
- everything, on ``FLUSHALL`` / ``FLUSHDB`` (a message without keys);
- everything, whenever a listener is lost (changes on its node may be missed
  until it is back), comes up (a node we start listening to may have changed
  keys we hold, e.g. a replica just promoted), or is retired (its node is no
  longer a primary).

Reads of a node's keys are cached only while that node's listener is up. The
set of listeners follows redis-py's view of the layout: a primary without a
listener gets one as soon as a read finds it, or at the next periodic check.

Why a cached read can never keep a stale value
----------------------------------------------
A read is stored only if (1) the node that answered it had a live listener
when the read began, (2) no flush happened between :meth:`LocalCache.begin`
and :meth:`LocalCache.complete` (the epoch is unchanged) and (3) the key was
not invalidated in between. (1) means the server turned tracking on for our
listener before it ran our ``GET``, since we only send the ``GET`` after the
listener's ``SUBSCRIBE`` reply arrived. So any write the server runs after
our ``GET`` produces an invalidation message. The reply and the message
travel on different sockets and may reach us in either order: if the message
comes first, the key is marked dirty and the reply is not stored (3); if it
comes second, it drops the stored entry; if it never comes because the
listener died, the loss flushes the cache and bumps the epoch, so the reply
is either not stored (2) or dropped with everything else. Hits need no check:
an entry exists only while its node's listener has stayed up since the entry
was read.

Reads redirected elsewhere (``MOVED``, ``ASK``) are answered but not cached:
the node that answered is not the one whose listener was checked. A cached
value also never outlives the key's TTL on the server (``PTTL`` is read with
the value, in the same round trip, and counted from when the read was sent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from redis import exceptions as rx
from redis.asyncio.cluster import ClusterNode, PipelineCommand
from redis.crc import key_slot

from ._cache import ClientCache, LocalCache, heartbeat, ttl_reply
from ._mux import Arg, listener_backoff
from ._scan import decode_key
from .options import RedisOptions
from .standalone import _mux_for

if TYPE_CHECKING:
    from .cluster import RedisClusterBackend

__all__ = ["ClusterTracking"]

_log = logging.getLogger("kivigo_async.cache")
_CHANNEL = b"__redis__:invalidate"

#: Seconds between checks that every primary has a listener, and between
#: heartbeat PINGs on each listener: a listener whose peer vanished without a
#: word (a partition) is noticed within this plus ``read_timeout`` (or 5 s without one).
_TICK = 1.0

#: What a direct read may raise that the ordinary (retrying, re-routing) path
#: handles better: redis-py's errors, and redis-py finding a connection torn
#: down under it (an AttributeError raised inside redis-py).
_FALL_BACK = (rx.RedisError, rx.RedisClusterException, OSError, AttributeError)


def _slot(key: str) -> int | None:
    try:
        return key_slot(key.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:  # the ordinary path raises InvalidKeyError for it
        return None


class _Read(NamedTuple):
    served: bool  # answered by the node asked, with no redirection
    value: bytes | None
    ttl_ms: int | None  # the key's remaining TTL; None when it has none
    keep: bool  # the value may be cached


_NOT_SERVED = _Read(False, None, None, False)


class _Listener:
    """One node's tracking connection: invalidations in, liveness out."""

    def __init__(self, owner: ClusterTracking, name: str, options: RedisOptions) -> None:
        self.name = name
        self.live = False
        self.client_id: int | None = None
        self.settled = asyncio.Event()  # the first attempt to listen is over
        self._owner = owner
        self._prefixes: tuple[Arg, ...] = tuple(
            arg for prefix in owner.settings.prefixes for arg in ("PREFIX", prefix)
        )
        self.conn = _mux_for(
            options, node=name, select_db=False, on_push=self._on_message, on_lost=self._on_lost
        )
        # Bumped on every lost socket: a subscription that straddles a loss is void.
        self._generation = 0
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._read_timeout = options.read_timeout

    def __repr__(self) -> str:
        return f"<cache listener {self.name} live={self.live}>"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kivigo {self!r}")

    async def _run(self) -> None:
        attempt = 0
        while not self._closed:
            try:
                await self._listen()
                attempt = 0
                self.settled.set()
                await self._beat()
            except (rx.RedisError, OSError, ValueError) as exc:
                # A refusal (NOPERM, an old server) is worth one warning per streak of
                # failures; an outage is not (the data path reports those).
                warn = isinstance(exc, rx.ResponseError) and attempt == 0
                level = logging.WARNING if warn else logging.DEBUG
                _log.log(level, "client cache: no invalidations from %s yet: %s", self.name, exc)
            except Exception:
                _log.exception("client cache: the listener of %s failed", self.name)
            self.settled.set()
            self._down()
            self.conn.drop()
            attempt += 1
            await asyncio.sleep(listener_backoff(attempt))

    async def _listen(self) -> None:
        generation = self._generation
        self._lost.clear()
        client_id = int(await self.conn.execute("CLIENT", "ID"))
        # One write: tracking on (into this very connection), then subscribe. Nothing
        # is delivered until SUBSCRIBE runs, which is why we count as listening only
        # once its reply is here.
        track: tuple[Arg, ...] = ("CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", *self._prefixes)
        tracking, subscribed = await self.conn.execute_many([track, ("SUBSCRIBE", _CHANNEL)])
        if isinstance(tracking, Exception):
            raise rx.ResponseError(f"CLIENT TRACKING on {self.name}: {tracking}")
        if not (isinstance(subscribed, list) and subscribed and subscribed[0] == b"subscribe"):
            raise rx.ResponseError(f"unexpected reply to SUBSCRIBE from {self.name}: {subscribed!r}")
        if generation != self._generation or not self.conn.connected or self._closed:
            raise rx.ConnectionError(f"connection to {self.name} lost while subscribing")
        self.client_id = client_id
        self.live = True
        # Keys of this node may have changed while nobody listened (or it was not
        # ours to listen to: a replica just promoted); the flush also bumps the
        # epoch, so reads begun before now are not stored either.
        self._owner.cache.flush()

    async def _beat(self) -> None:
        while self.live:
            try:
                await asyncio.wait_for(self._lost.wait(), _TICK)
            except asyncio.TimeoutError:
                # Checked right before sending: PING on a closed socket would open
                # a new one, without tracking.
                if self.live:
                    await heartbeat(self.conn, self._read_timeout)

    def _on_message(self, message: list[Any]) -> None:
        if message[0] != b"message" or message[1] != _CHANNEL:
            return
        keys = message[2]
        cache = self._owner.cache
        if keys is None:  # FLUSHALL / FLUSHDB
            cache.flush()
            return
        if keys.__class__ is not list:
            # Not the server's (its messages name keys, or none): a PUBLISH by any
            # client allowed to, which may come from any node through the cluster
            # bus. Raised from here, it would end the listener: a flush per message.
            _log.debug("client cache: ignored a message from %s that names no keys", self.name)
            return
        for raw in keys:
            cache.invalidate(decode_key(raw))

    def _on_lost(self) -> None:
        self._generation += 1
        self._lost.set()
        self._down()

    def _down(self) -> None:
        if self.live:
            self.live = False
            self.client_id = None
            _log.debug("client cache: lost the invalidations of %s; dropping every entry", self.name)
            self._owner.cache.flush()

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        try:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        finally:
            # Even when this close is itself cancelled: a listener nobody holds any
            # more must not keep a tracking socket open.
            self._down()
            await self.conn.close()


class ClusterTracking:
    """The listeners of one cluster backend, and the cached paths of its reads."""

    def __init__(self, backend: RedisClusterBackend, settings: ClientCache) -> None:
        self.settings = settings
        self.cache = LocalCache(settings)
        self._backend = backend
        self._listeners: dict[str, _Listener] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False

    # -- listeners ---------------------------------------------------------------

    def _started(self) -> bool:
        if self._supervisor is None:
            if self._closed:
                return False
            self.cache.enabled = True
            self._supervisor = asyncio.get_running_loop().create_task(
                self._supervise(), name="kivigo client cache supervisor"
            )
        return True

    async def start(self) -> None:
        """Listen to every known primary; wait (bounded) for the first attempts to settle."""
        if not self._started():
            return
        self._add_missing()
        options = self._backend.options
        bound = (options.dial_timeout or 5.0) * (options.max_retries + 1) + 2 * (options.read_timeout or 5.0)
        waits = [asyncio.ensure_future(listener.settled.wait()) for listener in self._listeners.values()]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=bound)
            for waiter in pending:
                waiter.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _primaries(self) -> set[str] | None:
        try:
            primaries = self._backend.cluster.get_primaries()
        except Exception:  # no layout yet
            return None
        return {str(node.name) for node in primaries} or None

    def _add(self, name: str) -> _Listener:
        listener = _Listener(self, name, self._backend.options.node_options(name))
        self._listeners[name] = listener
        listener.start()
        return listener

    def _add_missing(self) -> None:
        for name in self._primaries() or ():
            if name not in self._listeners:
                self._add(name)

    async def _supervise(self) -> None:
        while True:
            try:
                primaries = self._primaries()
                if primaries is not None:
                    for name in primaries - self._listeners.keys():
                        self._add(name)
                    for name in self._listeners.keys() - primaries:
                        # No longer a primary (failed over, or gone): its keys are now
                        # changed elsewhere. close() flushes if it was up.
                        await self._listeners.pop(name).close()
                await self._retire_demoted()
            except Exception:  # never let a surprise end the supervision
                _log.exception("client cache: checking the listeners failed")
            await asyncio.sleep(_TICK)

    async def _retire_demoted(self) -> None:
        """Retire the listeners of nodes that became replicas, and relearn the layout.

        After a failover that the data path has not noticed (every read a cache
        hit, say), redis-py still calls the demoted node a primary, so nothing
        else would ever listen to the promoted one. Writes there reach us only
        through replication to the old node, late or, if that link breaks,
        never. Asking each listened node its role once a tick closes that gap.
        """
        cluster = self._backend.cluster
        demoted: list[str] = []
        for name, listener in list(self._listeners.items()):
            node = cluster.get_node(node_name=name) if listener.live else None
            if node is None:
                continue
            try:
                async with self._backend._slot("ROLE"):
                    role = await node.execute_command("ROLE")
            except Exception:
                continue  # an outage: the listener's own loss handles it
            if role and role[0] not in (b"master", "master"):
                demoted.append(name)
        if not demoted:
            return
        for name in demoted:
            if name in self._listeners:
                listener = self._listeners.pop(name)
                _log.info("client cache: %s is no longer a primary; dropping every entry", name)
                await listener.close()
        await cluster.nodes_manager.initialize()

    async def close(self) -> None:
        self._closed = True
        self.cache.enabled = False
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
        listeners = list(self._listeners.values())
        self._listeners.clear()
        await asyncio.gather(*(listener.close() for listener in listeners), return_exceptions=True)
        self.cache.flush()

    def _owner(self, key: str) -> ClusterNode | None:
        """The primary owning ``key`` if its listener is up (a read of it may be cached)."""
        if not self._started() or not self.settings.caches(key):
            return None
        slot = _slot(key)
        if slot is None:
            return None
        try:
            node: ClusterNode = self._backend.cluster.nodes_manager.get_node_from_slot(slot)
        except Exception:  # slot not covered, or no layout yet: the ordinary path reports it
            return None
        listener = self._listeners.get(str(node.name))
        if listener is None:
            # A primary we have not seen yet (promoted, or given slots): listen to it now,
            # cache its keys once that is done.
            self._add(str(node.name))
            return None
        return node if listener.live else None

    def _owner_name(self, key: str) -> str | None:
        slot = _slot(key)
        if slot is None:
            return None
        try:
            return str(self._backend.cluster.nodes_manager.get_node_from_slot(slot).name)
        except Exception:
            return None

    # -- reads ---------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        cache = self.cache
        hit = cache.lookup(key)
        if hit is not None:
            return hit
        backend = self._backend
        node = self._owner(key)
        if node is None:
            value: bytes | None = await backend._exec("GET", key)
            return value
        epoch = cache.begin(key)
        sent_at = time.monotonic()
        read: _Read = _NOT_SERVED
        try:
            read = await backend._run("GET", key, lambda: self._read_from(node, key))
            if read.served:
                return read.value
            # Redirected or failed: the ordinary path follows redirections, re-reads
            # the layout and retries; its answer is not cached.
            value = await backend._exec("GET", key)
            return value
        finally:
            cache.complete(key, epoch, read.value if read.keep else None, read.ttl_ms, sent_at=sent_at)

    @staticmethod
    async def _read_from(node: ClusterNode, key: str) -> _Read:
        """``GET`` + ``PTTL`` on ``node`` only, in one round trip; redirections are not followed."""
        commands = [PipelineCommand(0, "GET", key), PipelineCommand(1, "PTTL", key)]
        try:
            await node.execute_pipeline(commands)
        except _FALL_BACK:
            return _NOT_SERVED
        value, pttl = commands[0].result, commands[1].result
        if isinstance(value, Exception):
            return _NOT_SERVED
        keep, ttl_ms = ttl_reply(pttl)
        return _Read(True, value, ttl_ms, keep)

    async def batch_get(self, keys: Sequence[str]) -> list[bytes | None]:
        """Hits from memory; the misses in one pipeline per node, cached when they may be."""
        out, misses = self.cache.lookup_many(keys)
        if misses:
            values = await self._fetch([keys[i] for i in misses])
            for index, value in zip(misses, values, strict=True):
                out[index] = value
        return out

    async def _fetch(self, keys: Sequence[str]) -> list[bytes | None]:
        backend = self._backend
        groups = backend._by_slot(keys)  # raises InvalidKeyError before anything starts
        commands: list[tuple[Any, ...]] = []
        reads: list[tuple[list[int], int]] = []  # (key positions, index of their MGET)
        # (key position, index of its PTTL, the node asked, epoch) per read that may be cached
        tracked: list[tuple[int, int, str, int]] = []
        served_by: list[str | None] = []
        results: list[Any] | None = None
        out: list[bytes | None] = [None] * len(keys)
        sent_at = time.monotonic()
        try:
            for idx in groups.values():
                reads.append((idx, len(commands)))
                # MGET even for one key, as the uncached read: a key holding another
                # type reads as missing instead of failing the batch with WRONGTYPE.
                commands.append(("MGET", *(keys[i] for i in idx)))
                node = self._owner(keys[idx[0]])  # one slot: one owner for the group
                if node is None:
                    continue
                for i in idx:
                    if self.settings.caches(keys[i]):
                        tracked.append((i, len(commands), str(node.name), self.cache.begin(keys[i])))
                        commands.append(("PTTL", keys[i]))
            results = await backend._pipeline("MGET", commands, served_by)
            for idx, at in reads:
                for i, value in zip(idx, results[at], strict=True):
                    out[i] = value
            return out
        finally:
            self._complete(keys, reads, tracked, served_by, results, out, sent_at)

    def _complete(
        self,
        keys: Sequence[str],
        reads: list[tuple[list[int], int]],
        tracked: list[tuple[int, int, str, int]],
        served_by: list[str | None],
        results: list[Any] | None,
        out: list[bytes | None],
        sent_at: float,
    ) -> None:
        read_of = {i: at for idx, at in reads for i in idx}
        for i, pttl_at, node, epoch in tracked:
            key = keys[i]
            keep, ttl_ms = (False, None) if results is None else ttl_reply(results[pttl_at])
            keep = (
                keep
                and served_by[read_of[i]] == node
                and served_by[pttl_at] == node
                # A retry after a connection error re-routes by the (maybe new) layout.
                and self._owner_name(key) == node
            )
            self.cache.complete(key, epoch, out[i] if keep else None, ttl_ms, sent_at=sent_at)

    # -- writes --------------------------------------------------------------------

    def written(self, keys: Sequence[str]) -> None:
        """Our own writes drop local copies at once (read-your-writes), before the message comes."""
        self.cache.invalidate_many(keys)
