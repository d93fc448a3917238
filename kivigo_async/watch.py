"""Change events: watch keys being set, deleted and expired by any client.

:meth:`kivigo_async.Client.watch` streams a :class:`ChangeEvent` for each
change to a key under a prefix, made by *any* client of the server, not just
this process. On Redis and Valkey it rides on keyspace notifications
(``PSUBSCRIBE __keyspace@<db>__:<prefix>*``); :class:`MemoryBackend
<kivigo_async.backends.memory.MemoryBackend>` emits the same events itself.

Delivery is best effort, but never *silently* lossy: whenever events may have
been missed, the stream raises instead of carrying on.

* :class:`~kivigo_async.errors.BackendUnavailableError` when the
  subscription's connection drops (pub/sub keeps nothing for a subscriber
  that is away), when the server stops answering its heartbeat, or when the
  heartbeat finds that a node it subscribed on changed role (a primary
  demoted by a failover) or, on a cluster, that the slots it serves changed
  (resharding, which reports each key it moves as set and deleted, in
  either order).
* :class:`WatchOverflowError` when the consumer falls more than
  ``max_pending`` events behind.
* :class:`~kivigo_async.errors.NotificationsDisabledError` when, on Redis
  or Valkey, the heartbeat finds that a keyspace-notification flag the watch
  needs was turned off after it subscribed (checked only when the watch could
  read ``notify-keyspace-events`` as it started).

In every case the events received before the failure are yielded first, the
subscription is already released, and the usual answer is to resynchronise
(re-read or drop what you derived from the keys) and watch again.

Example:
    ```python
    from kivigo_async import ChangeType, Client

    async with Client(backend) as client:
        async with client.watch("session:") as changes:
            async for change in changes:
                if change.type is ChangeType.SET:
                    print("written:", change.key)
                else:  # DELETE or EXPIRE
                    print("gone:", change.key)
    ```
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Protocol, runtime_checkable

from .errors import (
    InvalidArgumentError,
    KivigoError,
    NotificationsDisabledError,
    WatchOverflowError,
)

__all__ = [
    "DEFAULT_MAX_PENDING",
    "ChangeEvent",
    "ChangeFeed",
    "ChangeStream",
    "ChangeType",
    "NotificationsDisabledError",
    "Watch",
    "WatchOverflowError",
]

#: How many undelivered events a watch holds before it fails with :class:`WatchOverflowError`.
DEFAULT_MAX_PENDING = 10_000


def _check_watch_args(prefix: object, max_pending: object) -> None:
    if not isinstance(prefix, str):
        raise InvalidArgumentError(f"prefix must be str, not {type(prefix).__name__}")
    if not isinstance(max_pending, int) or isinstance(max_pending, bool) or max_pending < 1:
        raise InvalidArgumentError(f"max_pending must be a positive int, not {max_pending!r}")


class ChangeType(str, Enum):
    """What happened to a key.

    Members compare equal to their string value, so ``ChangeType.SET == "set"``.

    * ``SET``: the key got a new value (``SET`` in any form, ``MSET``,
      ``INCR``, ``APPEND``, ``SETRANGE``; the new name of a ``RENAME``; the
      target of a ``COPY``, ``MOVE`` or ``RESTORE``).
    * ``DELETE``: the key was removed (``DEL``, ``UNLINK``, ``GETDEL``, the
      old name of a ``RENAME``, ``MOVE`` to another database), or evicted
      under ``maxmemory``.
    * ``EXPIRE``: the key's TTL ran out and the server removed it.

    A TTL being set or removed (``EXPIRE``, ``PERSIST``) changes no value and
    is not reported; the expiry itself is, when it happens. A key of any type
    is reported as a whole (deleted, renamed, copied, moved, restored,
    expired, evicted); a change to the contents of a list, hash, set... is
    not (``HSET``, ``LPUSH``).
    """

    SET = "set"
    DELETE = "delete"
    EXPIRE = "expire"

    def __str__(self) -> str:
        # The str mixin makes Enum.__str__ vary between Python versions; the value is what users expect.
        return self.value


@dataclass(frozen=True, slots=True, repr=False)
class ChangeEvent:
    """One change to one key. Events carry no value: read it if you need it.

    Example:
        >>> ChangeEvent(ChangeType.SET, "user:42")
        ChangeEvent(type='set', key='user:42')
    """

    type: ChangeType
    key: str

    def __repr__(self) -> str:
        return f"ChangeEvent(type={str(self.type)!r}, key={self.key!r})"


@runtime_checkable
class ChangeStream(Protocol):
    """What :meth:`WatchBackend.watch <kivigo_async.backend.WatchBackend.watch>` returns.

    A single-consumer async iterator of :class:`ChangeEvent`, subscribed
    already: every change made after ``watch()`` returned is delivered.
    ``aclose()`` releases the subscription and is safe to call twice.
    """

    def __aiter__(self) -> AsyncIterator[ChangeEvent]: ...

    async def __anext__(self) -> ChangeEvent: ...

    async def aclose(self) -> None: ...


class ChangeFeed:
    """A bounded, single-consumer :class:`ChangeStream` that a backend feeds.

    The backend calls :meth:`put` for each change, and :meth:`fail` or
    :meth:`end` when the source stops; all three are plain (not ``async``)
    methods, safe to call from protocol callbacks and timers. ``halt`` is
    called once, at once, when the feed stops for any reason (overflow,
    failure, end or ``aclose``): it must stop the source synchronously (drop
    sockets, cancel timers). ``release`` is awaited by :meth:`aclose` for
    whatever cleanup needs awaiting.

    Example:
        >>> feed = ChangeFeed(max_pending=2)
        >>> feed.put(ChangeEvent(ChangeType.SET, "a"))
        >>> feed.pending
        1
    """

    def __init__(
        self,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        halt: Callable[[], None] | None = None,
        release: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._max_pending = max_pending
        self._halt = halt
        self._release = release
        self._events: deque[ChangeEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._stopped = False  # no more events will be put
        self._finished = False  # the consumer saw the end (or the error)
        self._released = False

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "open"
        return f"ChangeFeed({state}, pending={len(self._events)})"

    @property
    def pending(self) -> int:
        """Events received and not yet consumed."""
        return len(self._events)

    @property
    def stopped(self) -> bool:
        """Whether the source has stopped (no more events will arrive)."""
        return self._stopped

    # -- the backend's side ------------------------------------------------------

    def put(self, event: ChangeEvent) -> None:
        """Queue ``event``; past ``max_pending`` waiting events, fail with :class:`WatchOverflowError`."""
        if self._stopped:
            return
        if len(self._events) >= self._max_pending:
            self.fail(
                WatchOverflowError(
                    f"the watch fell more than {self._max_pending} events behind; "
                    "later changes were dropped: resynchronise and watch again"
                )
            )
            return
        self._events.append(event)
        self._wake()

    def fail(self, error: BaseException) -> None:
        """Stop the feed: buffered events are delivered, then ``error`` is raised once."""
        if not self._stopped:
            self._error = error
            self._stop()

    def end(self) -> None:
        """Stop the feed: buffered events are delivered, then the iteration ends."""
        if not self._stopped:
            self._stop()

    def _stop(self) -> None:
        self._stopped = True
        self._wake()
        halt, self._halt = self._halt, None
        if halt is not None:
            halt()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the consumer's side -----------------------------------------------------

    def __aiter__(self) -> ChangeFeed:
        return self

    async def __anext__(self) -> ChangeEvent:
        while True:
            if self._events:
                return self._events.popleft()
            if self._finished:
                raise StopAsyncIteration
            if self._stopped:
                self._finished = True
                error, self._error = self._error, None
                if error is not None:
                    raise error
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def aclose(self) -> None:
        """Stop the feed, drop undelivered events and release the source. Safe to call twice."""
        self.end()
        self._events.clear()
        self._finished = True
        if not self._released:
            self._released = True
            if self._release is not None:
                await self._release()


class Watch:
    """A stream of :class:`ChangeEvent`, returned by :meth:`kivigo_async.Client.watch`.

    Use it as an async context manager, then iterate: the subscription is in
    place when ``async with`` has entered (every change made after that is
    delivered) and released when the block exits, however it exits (``break``,
    an exception, cancellation).

    A bare ``async for change in client.watch(...)`` works too; it subscribes
    when the loop starts, so a change made just before may be missed. Its
    subscription is released when the loop ends, raises or is cancelled, and
    after a ``break`` when the abandoned iterator is garbage collected
    (CPython: at once, finished by a task on the next event-loop turn).

    Iteration ends (``StopAsyncIteration``) when the watch or its client is
    closed, and raises when events may have been lost; see :mod:`kivigo_async.watch`.

    Example:
        ```python
        async with client.watch("user:") as changes:
            async for change in changes:
                cache.pop(change.key, None)
        ```
    """

    def __init__(
        self,
        prefix: str,
        open_: Callable[[], Awaitable[ChangeStream]],
        *,
        subscribed: set[Watch] | None = None,
    ) -> None:
        self._prefix = prefix
        self._open = open_
        # Holds this watch while it is subscribed (the client's set): a watch entered
        # and then dropped without exiting must still be closed with its client.
        self._subscribed = subscribed
        self._stream: ChangeStream | None = None
        self._entered = False
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._stream is not None else "not started"
        return f"Watch(prefix={self._prefix!r}, {state})"

    @property
    def prefix(self) -> str:
        """The literal key prefix being watched."""
        return self._prefix

    @property
    def closed(self) -> bool:
        """Whether the watch has ended (closed, or its stream ended or failed)."""
        return self._closed

    async def _start(self) -> ChangeStream | None:
        """The subscribed stream; ``None`` when the watch was closed while subscribing."""
        if self._stream is not None:
            return self._stream
        if self._closed:
            raise KivigoError("this watch is closed; call client.watch() again")
        stream = await self._open()
        if self._closed:  # closed (with its client) while subscribing
            await stream.aclose()
            return None
        self._stream = stream
        if self._subscribed is not None:
            self._subscribed.add(self)
        return stream

    async def __aenter__(self) -> Watch:
        if self._entered:
            raise KivigoError("a watch can be entered only once")
        self._entered = True
        if await self._start() is None:
            raise KivigoError("this watch was closed while it subscribed")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[ChangeEvent]:
        if self._entered:
            return self
        # Not entered: the loop owns the subscription, released when the loop is left.
        return self._owned()

    async def _owned(self) -> AsyncIterator[ChangeEvent]:
        try:
            while True:
                try:
                    event = await self.__anext__()
                except StopAsyncIteration:
                    return
                yield event
        finally:
            await self.aclose()

    async def __anext__(self) -> ChangeEvent:
        if self._closed:
            raise StopAsyncIteration
        stream = self._stream if self._stream is not None else await self._start()
        if stream is None:  # its client closed while it subscribed: the loop just ends
            raise StopAsyncIteration
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            await self.aclose()
            raise
        except KivigoError:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Release the subscription; iteration ends. Safe to call twice."""
        self._closed = True
        if self._subscribed is not None:
            self._subscribed.discard(self)
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.aclose()
