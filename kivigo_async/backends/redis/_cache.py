"""Client-side caching: a local LRU kept coherent by Redis' invalidation messages.

The server tracks the keys our multiplexed connection reads (``CLIENT TRACKING
ON REDIRECT <id>``) and publishes on ``__redis__:invalidate`` to a second
connection whenever one of them changes. Entries are dropped on each message;
the whole cache is dropped whenever either connection is lost or replaced,
because invalidations may have been missed in between.

The cluster backend shares :class:`ClientCache` and :class:`LocalCache` and
keeps them coherent its own way (see ``_cluster_cache``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import hiredis
from redis import exceptions as rx

from ...backend import stored_key
from ...errors import ConfigurationError
from ._mux import Arg, MuxConnection, Opener, OptionalCommand, listener_backoff

if TYPE_CHECKING:
    from .options import RedisOptions

__all__ = ["CacheStats", "ClientCache", "LocalCache"]

_log = logging.getLogger("kivigo_async.cache")
_CHANNEL = b"__redis__:invalidate"
#: Seconds between heartbeat PINGs on the invalidation connection: one whose peer
#: vanished without a word (a partition, a dropped NAT entry) is noticed within
#: this plus ``read_timeout`` (or :data:`_STALL` when there is none).
_TICK = 1.0
_STALL = 5.0
#: The server's refusal to redirect tracking to a connection it no longer has.
_NO_SUCH_LISTENER = "client ID you want redirect to does not exist"


@dataclass(frozen=True)
class ClientCache:
    """Client-side caching settings for :class:`~kivigo_async.backends.redis.RedisOptions`
    and :class:`~kivigo_async.backends.redis.RedisClusterOptions`.

    Attributes:
        max_entries: the most values kept; the least recently used go first.
        ttl: the longest a value is served from memory without asking the
            server again (seconds; ``None`` for no limit). Invalidation
            messages normally drop an entry much sooner; this bounds the damage
            if one is ever lost.
        max_value_size: values larger than this (bytes) are never cached.
        prefixes: when not empty, only keys starting with one of these
            (literal) prefixes are cached. On a cluster the server then also
            sends invalidations for those keys only (``BCAST PREFIX``), which
            matters when other keys change often. Prefixes must not overlap
            (``"user:"`` and ``"user:1"`` cannot both be given).

    Example:
        ```python
        from kivigo_async.backends.redis import ClientCache, RedisBackend, RedisOptions

        backend = RedisBackend(RedisOptions(addr="localhost:6379",
                                            client_cache=ClientCache(max_entries=10_000, ttl=60)))
        ```
    """

    max_entries: int = 10_000
    ttl: float | None = 60.0
    max_value_size: int = 64 * 1024
    prefixes: Sequence[str] = ()

    def __post_init__(self) -> None:
        entries = self.max_entries
        if not isinstance(entries, int) or isinstance(entries, bool) or entries < 1:
            raise ConfigurationError("client_cache max_entries must be a positive int")
        if self.ttl is not None and (
            not isinstance(self.ttl, (int, float)) or not math.isfinite(self.ttl) or self.ttl <= 0
        ):
            raise ConfigurationError("client_cache ttl must be a positive number of seconds or None")
        if (
            not isinstance(self.max_value_size, int)
            or isinstance(self.max_value_size, bool)
            or self.max_value_size < 0
        ):
            raise ConfigurationError("client_cache max_value_size must be a non-negative int")
        prefixes = self.prefixes
        if isinstance(prefixes, (str, bytes)) or not isinstance(prefixes, Sequence):
            raise ConfigurationError("client_cache prefixes must be a list of strings, e.g. ['user:']")
        for prefix in prefixes:
            if not isinstance(prefix, str) or not prefix:
                raise ConfigurationError(f"client_cache prefixes must be non-empty strings, not {prefix!r}")
            try:
                prefix.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                raise ConfigurationError(f"client_cache prefix {prefix!r} is not valid UTF-8") from None
        for i, a in enumerate(prefixes):
            for j, b in enumerate(prefixes):
                if i != j and b.startswith(a):
                    # The server refuses overlapping broadcast prefixes on one connection.
                    raise ConfigurationError(f"client_cache prefixes {a!r} and {b!r} overlap")
        object.__setattr__(self, "prefixes", tuple(prefixes))

    def caches(self, key: str) -> bool:
        """Whether ``key`` may be cached under these settings (its prefix is listed, if any are)."""
        prefixes = self.prefixes
        return not prefixes or key.startswith(tuple(prefixes))


@dataclass
class CacheStats:
    """Counters of a :class:`LocalCache` since it was created."""

    hits: int = 0
    misses: int = 0
    invalidations: int = 0
    flushes: int = 0


def ttl_reply(reply: Any) -> tuple[bool, int | None]:
    """(may be cached, remaining TTL in ms or ``None`` for none) from a ``PTTL`` reply read with a value."""
    if isinstance(reply, bool) or not isinstance(reply, int) or reply == -2:
        return False, None  # an error, or the key vanished between GET and PTTL
    return True, None if reply < 0 else reply


#: Called with the invalidated key, or ``None`` when everything was dropped.
InvalidationListener = Callable[["str | None"], None]


def _entry_key(key: str) -> str:
    # One entry for every spelling of a key (see stored_key): invalidations name
    # the stored form, and must reach a value read under the other.
    if key.isascii():  # most keys: spared the call below
        return key
    try:
        return stored_key(key)
    except UnicodeEncodeError:  # no key the server can hold: the command refuses it
        return key


class LocalCache:
    """The in-process side of client-side caching (one per backend).

    Reads that are in flight when their key is invalidated (or the cache is
    flushed) are not stored when they complete: their value may predate the
    change. Keys are kept in the form the server names them in invalidations.
    """

    def __init__(self, settings: ClientCache) -> None:
        self._settings = settings
        self._data: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._inflight: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._epoch = 0
        self._listeners: list[InvalidationListener] = []
        self.enabled = False
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._data)

    @property
    def settings(self) -> ClientCache:
        """The :class:`ClientCache` options this cache was built with."""
        return self._settings

    def __repr__(self) -> str:
        return f"LocalCache(entries={len(self._data)}, enabled={self.enabled}, stats={self.stats})"

    def add_listener(self, listener: InvalidationListener) -> Callable[[], None]:
        """Call ``listener`` on each invalidation; return a function that removes it."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    # -- reads -----------------------------------------------------------------

    def lookup(self, key: str) -> bytes | None:
        if not key.isascii():  # inline on the hit path: a call costs a fifth of a lookup
            key = _entry_key(key)
        entry = self._data.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        if entry[1] <= time.monotonic():
            del self._data[key]
            self.stats.misses += 1
            return None
        self._data.move_to_end(key)
        self.stats.hits += 1
        return entry[0]

    def lookup_many(self, keys: Sequence[str]) -> tuple[list[bytes | None], list[int]]:
        """The cached value of each key (``None`` when not cached), and the positions of those not cached."""
        found: list[bytes | None] = [None] * len(keys)
        misses: list[int] = []
        for index, key in enumerate(keys):
            hit = self.lookup(key)
            if hit is None:
                misses.append(index)
            else:
                found[index] = hit
        return found, misses

    def begin(self, key: str) -> int:
        key = _entry_key(key)
        self._inflight[key] = self._inflight.get(key, 0) + 1
        return self._epoch

    def complete(
        self,
        key: str,
        epoch: int,
        value: bytes | None,
        ttl_ms: int | None = None,
        *,
        sent_at: float | None = None,
    ) -> None:
        """End the read :meth:`begin` started; keep ``value`` if nothing invalidated it since.

        ``ttl_ms`` is the key's remaining time to live on the server, when the
        read asked for it, and ``sent_at`` the :func:`time.monotonic` time the
        read was sent: the entry then never outlives the key. The TTL counts
        from ``sent_at``, not from now, because the server measured it at some
        point after that; counted from now, a reply that sat in a socket or
        behind a busy event loop would keep the value past the key's expiry.
        """
        key = _entry_key(key)
        left = self._inflight[key] - 1
        clean = key not in self._dirty
        if left:
            self._inflight[key] = left
        else:
            del self._inflight[key]
            self._dirty.discard(key)
        if (
            clean
            and self.enabled
            and epoch == self._epoch
            and value is not None
            and len(value) <= self._settings.max_value_size
            and self._settings.caches(key)
        ):
            now = time.monotonic()
            ttl = self._settings.ttl
            deadline = math.inf if ttl is None else now + ttl
            if ttl_ms is not None:
                deadline = min(deadline, (now if sent_at is None else sent_at) + ttl_ms / 1000)
                if deadline <= now:  # the key expired on the server already
                    return
            self._data[key] = (value, deadline)
            self._data.move_to_end(key)
            if len(self._data) > self._settings.max_entries:
                self._data.popitem(last=False)

    # -- invalidation ------------------------------------------------------------

    def invalidate(self, key: str) -> None:
        key = _entry_key(key)
        self._data.pop(key, None)
        if key in self._inflight:
            self._dirty.add(key)
        self.stats.invalidations += 1
        self._notify(key)

    def invalidate_many(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.invalidate(key)

    def flush(self) -> None:
        self._data.clear()
        self._epoch += 1
        self.stats.flushes += 1
        self._notify(None)

    def _notify(self, key: str | None) -> None:
        for listener in list(self._listeners):
            try:
                listener(key)
            except Exception:
                _log.exception("a client cache listener failed")


async def heartbeat(conn: MuxConnection, read_timeout: float | None) -> None:
    """PING ``conn``; if no reply comes, the socket is closed (its on_lost runs).

    The connection aborts itself at ``read_timeout``; without one, after :data:`_STALL`.
    """
    if read_timeout is not None:
        await conn.execute("PING")
        return
    try:
        await asyncio.wait_for(conn.execute("PING"), _STALL)
    except asyncio.TimeoutError:
        conn.drop()


class Tracking:
    """Keeps the invalidation connection up and the data connection tracking into it."""

    def __init__(self, options: RedisOptions, opener: Opener, cache: LocalCache) -> None:
        self._cache = cache
        self._options = options
        auth = options._auth_command()
        self._conn = MuxConnection(
            opener,
            node=options.addr,
            handshake=[auth] if auth else [],
            dial_timeout=options.dial_timeout,
            read_timeout=options.read_timeout,
            max_retries=options.max_retries,
            on_push=self._on_message,
            on_lost=self._on_lost,
        )
        self._client_id: int | None = None
        # Bumped by every loss of the listener: a subscribe or a repair that saw it
        # change while it waited used a socket that is gone, and goes round again.
        self._losses = 0
        self._data: MuxConnection | None = None
        self._repair: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    def attach(self, data: MuxConnection) -> None:
        self._data = data

    def data_lost(self) -> None:
        """The data socket is gone and the server stopped tracking for it: drop everything."""
        self._cache.enabled = False
        self._cache.flush()

    async def data_handshake(self) -> Sequence[Sequence[Arg]]:
        """Extra handshake for every new data socket: point its tracking at our listener."""
        # A new data socket starts with no tracked keys: what we hold may miss invalidations.
        self._cache.flush()
        if self._repair is not None or self._lock.locked():
            # The listener is being reopened, which can take until a timeout: the calls
            # waiting for this socket must not wait for it too. The socket opens
            # untracked, the cache off, and the repair points it at the listener.
            self._cache.enabled = False
            self._start_repair()
            return []
        dial = self._options.dial_timeout
        budget = dial / 2 if dial else None
        losses = self._losses
        try:
            # Half the data socket's own dial_timeout at most: a listener that hangs
            # (its connect, or its SUBSCRIBE) costs the cache, not the calls waiting
            # for this socket.
            client_id = await asyncio.wait_for(self._listen(), budget)
        except (rx.RedisError, asyncio.TimeoutError) as exc:
            # The cache is an optimisation: without a listener (an ACL user with no
            # right to the channel, no room for one more client) the backend serves
            # every read from the server, and the repair loop keeps trying.
            self._cache.enabled = False
            why = str(exc) or f"no answer within {budget} s"
            _log.warning("client cache: no invalidation connection, reads go to the server: %s", why)
            self._start_repair()
            return []
        if self._losses != losses or self._client_id != client_id or not self._conn.connected:
            # The listener was lost after it answered (before Python 3.12, wait_for
            # runs _listen in a task: loop turns pass before we resume). A server that
            # has not seen the loss yet accepts tracking into its id, which then
            # delivers nothing. _on_lost started the repair, which points this socket
            # at the next listener once it is open.
            self._cache.enabled = False
            self._start_repair()
            return []
        self._cache.enabled = True
        # Optional: refused (an ACL user without CLIENT TRACKING, a listener the
        # server dropped before we heard of it), the socket still serves every call.
        track = ("CLIENT", "TRACKING", "ON", "REDIRECT", client_id)
        return [OptionalCommand(track, lambda error: self._tracking_refused(error, losses))]

    def _tracking_refused(self, error: str, losses: int) -> None:
        self._cache.enabled = False
        self._cache.flush()
        _log.warning("client cache: the server refused to track reads, they go to the server: %s", error)
        self._forget_dead_listener(error, losses)
        self._start_repair()

    def _forget_dead_listener(self, error: str, losses: int) -> None:
        # The server closed the listener and its FIN has not reached us (held up on
        # the way, or lost): tracking can never point at it, so reopen it now rather
        # than once the heartbeat gives up on it.
        if _NO_SUCH_LISTENER in error and self._losses == losses:
            self._conn.drop()

    async def _listen(self) -> int:
        async with self._lock:
            if self._client_id is not None and self._conn.connected:
                return self._client_id
            losses = self._losses
            # One write: the id must be that of the socket that subscribes (two calls
            # could each open a socket of their own if the first one closed between them).
            exchange = self._conn.execute_many([("CLIENT", "ID"), ("SUBSCRIBE", _CHANNEL)])
            # Without read_timeout nothing else bounds it, and this lock is held meanwhile.
            bound = _STALL if self._options.read_timeout is None else None
            try:
                id_reply, reply = await asyncio.wait_for(exchange, bound)
                for answer in (id_reply, reply):
                    if answer.__class__ is hiredis.ReplyError:
                        raise rx.ResponseError(str(answer))
                if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
                    raise rx.ResponseError(f"unexpected reply to SUBSCRIBE: {reply!r}")
                if self._losses != losses or not self._conn.connected:
                    # This socket was lost, or one before it in the same connect (reset
                    # during its login, then a retry subscribed): which one, the count
                    # cannot tell, so go round again.
                    raise rx.ConnectionError("the invalidation connection closed as it subscribed")
                client_id = int(id_reply)
            except BaseException as exc:
                # Whatever failed once the exchange was sent, the socket may be
                # subscribed (cut short, or CLIENT ID refused and SUBSCRIBE not): CLIENT
                # ID would be refused on it for good, and nothing else would close it
                # (the heartbeat leaves a socket without an id alone). Closed, it runs
                # _on_lost, which repairs.
                self._conn.drop()
                if isinstance(exc, asyncio.TimeoutError):
                    raise rx.TimeoutError(f"no reply to SUBSCRIBE within {_STALL} s") from None
                raise
            self._client_id = client_id
            if self._heartbeat is None and not self._closed:
                self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
            return client_id

    async def _beat(self) -> None:
        # Nothing else would notice a silent listener: cache hits send nothing.
        # A stall ends the socket, and _on_lost drops the cache and repairs it.
        stall = self._options.read_timeout
        while not self._closed:
            await asyncio.sleep(_TICK)
            # Checked right before sending: a PING on a closed socket would open
            # a new one, not subscribed. The repair loop reopens it instead.
            if self._client_id is None or not self._conn.connected:
                continue
            try:
                await heartbeat(self._conn, stall)
            except rx.RedisError as exc:  # the socket is gone: _on_lost has run
                _log.debug("client cache: heartbeat on the invalidation connection failed: %s", exc)

    def _on_message(self, message: list[Any]) -> None:
        if message[1] != _CHANNEL:
            return
        keys = message[2]
        if keys is None:  # FLUSHDB / FLUSHALL, or the server's tracking table overflowed
            self._cache.flush()
            return
        if keys.__class__ is not list:
            # Not the server's (its messages name keys, or none): a PUBLISH by any
            # client allowed to. Raised from here, it would end the connection, a
            # flush and a reconnect per message.
            _log.debug("client cache: ignored a message on __redis__:invalidate that names no keys")
            return
        for raw in keys:
            self._cache.invalidate(raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw)

    def _on_lost(self) -> None:
        self._client_id = None
        self._losses += 1
        self._cache.enabled = False
        self._cache.flush()
        self._start_repair()

    def _start_repair(self) -> None:
        if self._closed or self._repair is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # the loop is gone: nothing left to repair
            return
        self._repair = loop.create_task(self._repair_loop())

    async def _repair_loop(self) -> None:
        # The data socket still tracks into the dead listener's id: re-point it,
        # with backoff while the server is away.
        attempt = 0
        try:
            while not self._closed:
                try:
                    losses = self._losses
                    client_id = await self._listen()
                    data = self._data
                    if data is None or not data.connected:
                        # Down, or being opened: a socket whose handshake found no
                        # listener tracks nothing, so the cache waits until a connected
                        # data socket has been pointed at this listener.
                        raise rx.ConnectionError("the data connection is not open")
                    opened = data.opened
                    try:
                        await data.execute("CLIENT", "TRACKING", "ON", "REDIRECT", client_id)
                    except rx.ResponseError as exc:
                        self._forget_dead_listener(str(exc), losses)
                        raise
                    if self._losses != losses or not self._conn.connected:
                        # The listener went too, after this loop had started (its
                        # _on_lost left the repair to us): tracking points at nothing.
                        raise rx.ConnectionError("the invalidation connection closed during the repair")
                    if data.opened != opened or not data.connected:
                        # The socket told to track is gone; its successor opened
                        # untracked while this repair ran.
                        raise rx.ConnectionError("the data connection was replaced during the repair")
                    self._cache.flush()
                    self._cache.enabled = True
                    return
                except rx.RedisError as exc:
                    attempt += 1
                    _log.debug("client cache: invalidation connection not restored yet: %s", exc)
                    await asyncio.sleep(listener_backoff(attempt))
        finally:
            self._repair = None

    async def close(self) -> None:
        self._closed = True
        self._cache.enabled = False
        tasks = [t for t in (self._repair, self._heartbeat) if t is not None]
        for task in tasks:
            task.cancel()
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:  # cancelled while the tasks wind down: the socket is still closed
            self._heartbeat = None
            await self._conn.close()
