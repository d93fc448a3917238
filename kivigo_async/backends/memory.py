"""An in-process backend: a dict with TTLs and transactions.

:class:`MemoryBackend` implements every capability protocol and passes the
same conformance suite as the Redis backends, so code tested against it
behaves the same in production. It is not shared between processes.

Example:
    >>> import asyncio
    >>> from kivigo_async import Client
    >>> from kivigo_async.backends.memory import MemoryBackend
    >>> async def main() -> int:
    ...     async with Client(MemoryBackend()) as client:
    ...         await client.set("answer", 42)
    ...         return await client.get("answer", int)
    >>> asyncio.run(main())
    42
"""

from __future__ import annotations

import asyncio
import heapq
import operator
import time
from collections.abc import AsyncIterator, Callable, Sequence

from ..backend import BackendTransaction, TxOp, stored_bytes, stored_key
from ..errors import (
    BackendUnavailableError,
    ConfigurationError,
    InvalidArgumentError,
    InvalidKeyError,
    KeyNotFoundError,
    TransactionConflictError,
)
from ..watch import DEFAULT_MAX_PENDING, ChangeEvent, ChangeFeed, ChangeStream, ChangeType, _check_watch_args

__all__ = ["MemoryBackend"]

# Entries are (value, deadline); deadline is a time.monotonic() instant or None.
_Entry = tuple[bytes, "float | None"]

# How many keys a scan yields between two trips through the event loop, so that
# listing a huge keyspace does not starve other tasks.
_SCAN_CHUNK = 1000

_INT64_MAX = 2**63 - 1
# A TTL no deadline can overflow: it needs no look at the clock.
_SAFE_TTL_MS = 2**62


def _canonical(key: str) -> str:
    """The key as Redis stores and lists it (:func:`stored_key`).

    Refuses a key Redis could not store either: one that is not UTF-8 (a lone surrogate).
    """
    if key.isascii():  # most keys: spared the call below
        return key
    try:
        return stored_key(key)
    except UnicodeEncodeError:
        raise InvalidKeyError(f"key {key!r} cannot be encoded as UTF-8 (a lone surrogate?)") from None


def _check_ttl_ms(ttl_ms: int | None) -> None:
    """Refuse what Redis refuses ("invalid expire time"): the client never sends it."""
    if ttl_ms is None:
        return
    if type(ttl_ms) is not int or ttl_ms <= 0:
        raise InvalidArgumentError(f"ttl_ms must be a positive int or None, not {ttl_ms!r}")
    # Redis keeps the deadline as milliseconds since the epoch in a signed 64-bit int.
    if ttl_ms > _SAFE_TTL_MS and ttl_ms > _INT64_MAX - int(time.time() * 1000):
        raise InvalidArgumentError(
            f"ttl_ms {ttl_ms!r} is too large: its deadline would be past 2**63 - 1 ms since the epoch"
        )


def _stored_value(value: bytes) -> bytes:
    """``value`` as exact bytes: a copy of a buffer the caller may change after the call."""
    if type(value) is bytes:  # immutable: kept as it is
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise InvalidArgumentError(f"values must be bytes, not {type(value).__name__}")


def _prefix_test(prefix: str) -> Callable[[str], bool]:
    """Whether a stored key starts with ``prefix``, comparing bytes as Redis does.

    Code points and bytes agree unless the prefix ends partway through a UTF-8
    sequence (escaped bytes, U+DC80..U+DCFF), which a key may complete: ``"\\udcc3"``
    is a prefix of ``"é"`` (bytes C3 A9) on Redis.
    """
    prefix = _canonical(prefix)
    try:
        prefix.encode()
    except UnicodeEncodeError:
        raw = stored_bytes(prefix)
        return lambda key: stored_bytes(key).startswith(raw)
    return operator.methodcaller("startswith", prefix)


class MemoryBackend:
    """A TTL-aware in-memory backend.

    Expired keys are dropped when they are read or scanned, and by a sweep that
    runs every ``sweep_every`` writes, so memory does not grow with keys that
    expire without ever being read again.

    Values are kept as ``bytes``: a ``bytearray`` or ``memoryview`` is copied
    when written, so changing it afterwards does not change the stored value,
    and a value of any other type raises
    :class:`~kivigo_async.errors.InvalidArgumentError`.

    Example:
        >>> backend = MemoryBackend()
        >>> backend
        MemoryBackend(keys=0)
    """

    def __init__(self, *, sweep_every: int = 10_000) -> None:
        if not isinstance(sweep_every, int) or isinstance(sweep_every, bool) or sweep_every < 1:
            raise ConfigurationError(f"sweep_every must be a positive int, not {sweep_every!r}")
        self._data: dict[str, _Entry] = {}
        self._watchers: dict[str, set[_MemoryTransaction]] = {}
        self._writes = 0
        self._sweep_every = sweep_every
        self._closed = False
        # Watches (feed -> prefix). While there is one, a timer removes each key
        # when its TTL runs out, so that watchers see the expiry on time.
        self._feeds: dict[ChangeFeed, Callable[[str], bool]] = {}
        self._deadlines: list[tuple[float, str]] = []  # a heap; stale entries are skipped
        self._expiry_timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"MemoryBackend(keys={len(self._data)})"

    # -- internals -------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailableError("the memory backend is closed")

    # The helpers below take canonical keys (_canonical): the public methods make them.

    def _live(self, key: str) -> _Entry | None:
        entry = self._data.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= time.monotonic():
            del self._data[key]
            if self._feeds:
                self._emit(ChangeType.EXPIRE, key)
            return None
        return entry

    def _touch(self, key: str) -> None:
        # WATCH semantics: any write to a watched key dooms the transactions watching it.
        if self._watchers:
            for tx in self._watchers.get(key, ()):
                tx.dirty = True

    def _write(self, key: str, value: bytes, ttl_ms: int | None, *, changed: bool = True) -> None:
        # changed=False: only the TTL changed, which watchers are not told (as on Redis).
        if self._feeds:
            # As on Redis, writing over a key whose TTL ran out reports its expiry
            # first, even when the expiry timer has not run yet.
            self._live(key)
        deadline = None if ttl_ms is None else time.monotonic() + ttl_ms / 1000
        self._data[key] = (value, deadline)
        self._touch(key)
        if self._feeds:
            if deadline is not None:
                self._track_deadline(deadline, key)
            if changed:
                self._emit(ChangeType.SET, key)
        self._writes += 1
        if self._writes >= self._sweep_every:
            self._sweep()

    def _remove(self, key: str) -> bool:
        if self._live(key) is None:
            return False
        del self._data[key]
        self._touch(key)
        if self._feeds:
            self._emit(ChangeType.DELETE, key)
        return True

    def _sweep(self) -> None:
        self._writes = 0
        now = time.monotonic()
        expired = [k for k, (_, d) in self._data.items() if d is not None and d <= now]
        for k in expired:
            del self._data[k]
            if self._feeds:
                self._emit(ChangeType.EXPIRE, k)

    # -- watches -----------------------------------------------------------

    def _emit(self, change: ChangeType, key: str) -> None:
        event = ChangeEvent(change, key)
        # A copy: an overflowing feed unregisters itself from inside put().
        for feed, matches in tuple(self._feeds.items()):
            if matches(key):
                feed.put(event)

    def _track_deadline(self, deadline: float, key: str) -> None:
        heap = self._deadlines
        if len(heap) > 2 * len(self._data) + 1000:
            # Mostly stale entries (keys rewritten or deleted): start again from the data.
            heap[:] = [(d, k) for k, (_, d) in self._data.items() if d is not None]
            heapq.heapify(heap)
        else:
            heapq.heappush(heap, (deadline, key))
        if heap[0][0] == deadline:
            self._arm_expiry()

    def _arm_expiry(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        if self._deadlines and self._feeds:
            delay = max(0.0, self._deadlines[0][0] - time.monotonic())
            self._expiry_timer = asyncio.get_running_loop().call_later(delay, self._expire_due)

    def _expire_due(self) -> None:
        self._expiry_timer = None
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, key = heapq.heappop(self._deadlines)
            self._live(key)  # removes it (and tells watchers) if its TTL is still up
        self._arm_expiry()

    def _unwatch(self, feed: ChangeFeed) -> None:
        self._feeds.pop(feed, None)
        if not self._feeds:
            if self._expiry_timer is not None:
                self._expiry_timer.cancel()
                self._expiry_timer = None
            self._deadlines = []

    # -- AsyncBackend ----------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        self._check_open()
        entry = self._live(_canonical(key))
        return None if entry is None else entry[0]

    async def set(self, key: str, value: bytes, ttl_ms: int | None = None) -> None:
        self._check_open()
        _check_ttl_ms(ttl_ms)
        value = _stored_value(value)
        self._write(_canonical(key), value, ttl_ms)

    async def delete(self, key: str) -> bool:
        self._check_open()
        return self._remove(_canonical(key))

    async def scan(self, prefix: str) -> AsyncIterator[str]:
        self._check_open()
        matches = _prefix_test(prefix)
        # A snapshot, because the dict may change while the caller awaits between keys.
        keys = list(filter(matches, self._data))
        for i, key in enumerate(keys, 1):
            # As on Redis, whose next page fails once the backend is closed.
            self._check_open()
            if self._live(key) is not None:
                yield key
            if i % _SCAN_CHUNK == 0:
                await asyncio.sleep(0)

    async def close(self) -> None:
        self._closed = True
        for feed in list(self._feeds):
            feed.end()
        for txs in self._watchers.values():
            for tx in txs:
                tx.dirty = True
        self._watchers.clear()

    # -- BatchBackend ----------------------------------------------------

    async def batch_get(self, keys: Sequence[str]) -> list[bytes | None]:
        self._check_open()
        out: list[bytes | None] = []
        for key in keys:
            entry = self._live(_canonical(key))
            out.append(None if entry is None else entry[0])
        return out

    async def batch_set(self, items: Sequence[tuple[str, bytes]], ttl_ms: int | None = None) -> None:
        self._check_open()
        _check_ttl_ms(ttl_ms)
        # All keys and values first: a batch is written whole or not at all.
        canonical = [(_canonical(key), _stored_value(value)) for key, value in items]
        for key, value in canonical:
            self._write(key, value, ttl_ms)

    async def batch_delete(self, keys: Sequence[str]) -> int:
        self._check_open()
        # All keys first: as one UNLINK, a batch is deleted whole or not at all.
        canonical = [_canonical(key) for key in keys]
        return sum(self._remove(key) for key in canonical)

    async def exists(self, keys: Sequence[str]) -> int:
        self._check_open()
        return sum(self._live(_canonical(key)) is not None for key in keys)

    # -- TTLBackend ------------------------------------------------------

    async def expire(self, key: str, ttl_ms: int) -> bool:
        self._check_open()
        _check_ttl_ms(ttl_ms)
        key = _canonical(key)
        entry = self._live(key)
        if entry is None:
            return False
        self._write(key, entry[0], ttl_ms, changed=False)
        return True

    async def ttl(self, key: str) -> int | None:
        self._check_open()
        key = _canonical(key)
        entry = self._live(key)
        if entry is None:
            raise KeyNotFoundError(key)
        if entry[1] is None:
            return None
        return max(0, round((entry[1] - time.monotonic()) * 1000))

    async def persist(self, key: str) -> bool:
        self._check_open()
        key = _canonical(key)
        entry = self._live(key)
        if entry is None or entry[1] is None:
            return False
        self._data[key] = (entry[0], None)
        self._touch(key)
        return True

    # -- HealthBackend ---------------------------------------------------

    async def health(self) -> None:
        self._check_open()

    # -- LeaseBackend ----------------------------------------------------

    async def acquire_lease(self, key: str, token: bytes, ttl_ms: int) -> bool:
        # No await between the check and the write: atomic within the event loop.
        self._check_open()
        _check_ttl_ms(ttl_ms)
        token = _stored_value(token)
        key = _canonical(key)
        if self._live(key) is not None:
            return False
        self._write(key, token, ttl_ms)
        return True

    async def release_lease(self, key: str, token: bytes) -> bool:
        self._check_open()
        key = _canonical(key)
        entry = self._live(key)
        if entry is None or entry[0] != token:
            return False
        return self._remove(key)

    # -- WatchBackend ----------------------------------------------------

    async def watch(
        self, prefix: str, *, max_pending: int = DEFAULT_MAX_PENDING, configure_server: bool = True
    ) -> ChangeStream:
        """Stream changes to keys under ``prefix``; see :mod:`kivigo_async.watch`.

        Events are emitted by this backend's own writes, deletes and expiries,
        as Redis would publish them: a write reports ``SET``, removing an
        existing key ``DELETE``, and a key whose TTL runs out ``EXPIRE``, on
        time while anyone watches. ``configure_server`` is ignored.

        Example:
            ```python
            stream = await backend.watch("user:")
            ```
        """
        self._check_open()
        _check_watch_args(prefix, max_pending)
        matches = _prefix_test(prefix)
        feed = ChangeFeed(max_pending=max_pending, halt=lambda: self._unwatch(feed))
        first = not self._feeds
        self._feeds[feed] = matches
        if first:
            self._deadlines = [(d, k) for k, (_, d) in self._data.items() if d is not None]
            heapq.heapify(self._deadlines)
            self._arm_expiry()
        return feed

    # -- TransactionBackend ----------------------------------------------

    async def begin(self, watch: Sequence[str]) -> BackendTransaction:
        self._check_open()
        return _MemoryTransaction(self, [_canonical(key) for key in watch])


def _checked_op(op: TxOp) -> tuple[str, bytes | None, int | None]:
    """``op`` as (canonical key, value or ``None`` to delete, TTL); raises what a write would."""
    if op[0] == "set":
        _check_ttl_ms(op[3])
        return _canonical(op[1]), _stored_value(op[2]), op[3]
    return _canonical(op[1]), None, None


class _MemoryTransaction:
    """An optimistic transaction; commits run without awaiting, hence atomically."""

    def __init__(self, backend: MemoryBackend, watch: Sequence[str]) -> None:
        self._backend = backend
        self._watch = tuple(dict.fromkeys(watch))
        self.dirty = False
        self._done = False
        # Redis aborts EXEC when a watched key expires in between, so remember deadlines.
        self._deadlines: list[float] = []
        for key in self._watch:
            backend._watchers.setdefault(key, set()).add(self)
            entry = backend._live(key)
            if entry is not None and entry[1] is not None:
                self._deadlines.append(entry[1])

    async def get(self, key: str) -> bytes | None:
        return await self._backend.get(key)

    async def commit(self, ops: Sequence[TxOp]) -> None:
        backend = self._backend
        try:
            backend._check_open()
            now = time.monotonic()
            if self.dirty or any(d <= now for d in self._deadlines):
                raise TransactionConflictError(
                    f"a watched key changed before commit: {', '.join(map(repr, self._watch))}"
                )
            self._unwatch()
            # Every op checked first: a commit applies whole or not at all.
            checked = [_checked_op(op) for op in ops]
            for key, value, ttl_ms in checked:
                if value is None:
                    backend._remove(key)
                else:
                    backend._write(key, value, ttl_ms)
        finally:
            self._unwatch()

    async def discard(self) -> None:
        self._unwatch()

    def _unwatch(self) -> None:
        if self._done:
            return
        self._done = True
        watchers = self._backend._watchers
        for key in self._watch:
            txs = watchers.get(key)
            if txs is not None:
                txs.discard(self)
                if not txs:
                    del watchers[key]
