"""Backend protocols: what a storage engine must (and may) implement.

A backend works on ``str`` keys and ``bytes`` values only; validation, codecs
and hooks live in :class:`kivigo_async.Client`. Only :class:`AsyncBackend` is
required. The other protocols are capabilities the client detects with
``isinstance`` once, when it is created:

* :class:`BatchBackend`: multi-key calls in one round trip. Without it the
  client emulates batches with ``asyncio.gather``.
* :class:`TTLBackend`: ``expire`` / ``ttl`` / ``persist``.
* :class:`HealthBackend`: a liveness probe.
* :class:`TransactionBackend`: atomic, optionally optimistic transactions.
* :class:`WatchBackend`: a stream of changes to keys under a prefix.

A missing capability (other than batch) makes the client raise
:class:`~kivigo_async.errors.UnsupportedOperationError`.

Backends raise only :mod:`kivigo_async.errors` exceptions.

Example:
    >>> from kivigo_async.backend import AsyncBackend, BatchBackend
    >>> from kivigo_async.backends.memory import MemoryBackend
    >>> isinstance(MemoryBackend(), AsyncBackend), isinstance(MemoryBackend(), BatchBackend)
    (True, True)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Literal, Protocol, Union, runtime_checkable

if TYPE_CHECKING:
    from .watch import ChangeStream

__all__ = [
    "AsyncBackend",
    "BackendTransaction",
    "BatchBackend",
    "ConnectableBackend",
    "HealthBackend",
    "LeaseBackend",
    "TTLBackend",
    "TransactionBackend",
    "TxDelete",
    "TxOp",
    "TxSet",
    "WatchBackend",
]

#: A queued transaction write: ``("set", key, value, ttl_ms)``.
TxSet = tuple[Literal["set"], str, bytes, Union[int, None]]  # noqa: UP007
#: A queued transaction delete: ``("delete", key)``.
TxDelete = tuple[Literal["delete"], str]
TxOp = Union[TxSet, TxDelete]  # noqa: UP007


def stored_key(key: str) -> str:
    """``key`` as Redis stores, lists and invalidates it (not exported: for backends).

    Keys are bytes on the server; U+DC80..U+DCFF stand for the bytes of a key that
    is not UTF-8. Escaped bytes that do form UTF-8 are that text there, so
    ``"\\udcc3\\udca9"`` and ``"é"`` are one key: this returns the second for both.
    Raises ``UnicodeEncodeError`` for a key the server cannot hold (a lone surrogate).
    """
    if key.isascii():
        return key
    return stored_bytes(key).decode("utf-8", "surrogateescape")


def stored_bytes(key: str) -> bytes:
    """``key``'s bytes on the server (not exported: for backends and the client).

    U+DC80..U+DCFF stand for bytes that are not UTF-8; they become those bytes again.
    Raises ``UnicodeEncodeError`` for a key the server cannot hold (a lone surrogate).
    """
    return key.encode("utf-8", "surrogateescape")


@runtime_checkable
class AsyncBackend(Protocol):
    """The required backend interface.

    ``ttl_ms`` is a positive number of milliseconds, or ``None`` for no expiry.
    """

    async def get(self, key: str) -> bytes | None:
        """Return the value of ``key``, or ``None`` when it does not exist."""
        ...

    async def set(self, key: str, value: bytes, ttl_ms: int | None = None) -> None:
        """Store ``value`` under ``key``, replacing any value and any TTL."""
        ...

    async def delete(self, key: str) -> bool:
        """Delete ``key``; return whether it existed."""
        ...

    def scan(self, prefix: str) -> AsyncIterator[str]:
        """Yield every key starting with the literal ``prefix`` (``""``: all keys).

        Order is unspecified. A key present for the whole scan is yielded at
        least once; when the keyspace is resized during the scan it may be
        yielded twice (a single Redis server's ``SCAN`` does that; the cluster
        backend yields each key once, even while slots migrate).
        """
        ...

    async def close(self) -> None:
        """Release connections and background tasks. Safe to call twice.

        A failure is raised to the calls under way when it happens; a later
        call returns without raising it again.
        """
        ...


@runtime_checkable
class BatchBackend(Protocol):
    """Multi-key operations, each in as few round trips as the engine allows.

    Empty input is valid: ``[]``, ``0`` or nothing, without a round trip.
    """

    async def batch_get(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return the values of ``keys`` in input order, ``None`` for missing ones."""
        ...

    async def batch_set(self, items: Sequence[tuple[str, bytes]], ttl_ms: int | None = None) -> None:
        """Store every pair; all of them or (on error) as documented by the backend."""
        ...

    async def batch_delete(self, keys: Sequence[str]) -> int:
        """Delete ``keys``; return how many existed."""
        ...

    async def exists(self, keys: Sequence[str]) -> int:
        """Return how many of ``keys`` exist (a key listed twice counts twice)."""
        ...


@runtime_checkable
class TTLBackend(Protocol):
    """Key expiry."""

    async def expire(self, key: str, ttl_ms: int) -> bool:
        """Set a TTL on an existing key; return ``False`` when the key does not exist."""
        ...

    async def ttl(self, key: str) -> int | None:
        """Return the remaining TTL in milliseconds, ``None`` when the key has none.

        Raises :class:`~kivigo_async.errors.KeyNotFoundError` for a missing key.
        """
        ...

    async def persist(self, key: str) -> bool:
        """Remove the TTL; return ``True`` when a TTL was removed."""
        ...


@runtime_checkable
class HealthBackend(Protocol):
    """A liveness probe."""

    async def health(self) -> None:
        """Return when the backend answers; raise a :class:`~kivigo_async.errors.KivigoError` otherwise."""
        ...


class BackendTransaction(Protocol):
    """One open transaction, returned by :meth:`TransactionBackend.begin`."""

    async def get(self, key: str) -> bytes | None:
        """Read ``key`` now (reads are not queued)."""
        ...

    async def commit(self, ops: Sequence[TxOp]) -> None:
        """Apply ``ops`` atomically.

        Raises :class:`~kivigo_async.errors.TransactionConflictError` when a
        watched key changed since :meth:`TransactionBackend.begin`; then
        nothing is written.
        """
        ...

    async def discard(self) -> None:
        """Abandon the transaction and release what it holds. Safe after commit."""
        ...


@runtime_checkable
class TransactionBackend(Protocol):
    """Atomic MULTI/EXEC-style transactions with optional optimistic locking."""

    async def begin(self, watch: Sequence[str]) -> BackendTransaction:
        """Open a transaction that fails on commit if any key in ``watch`` changes."""
        ...


@runtime_checkable
class ConnectableBackend(Protocol):
    """A backend that can connect eagerly (``Client.__aenter__`` calls it)."""

    async def connect(self) -> None:
        """Open connections now and check that the backend answers."""
        ...


@runtime_checkable
class LeaseBackend(Protocol):
    """Short-lived exclusive leases, the distributed half of ``Client.get_or_set``.

    A lease is a key holding a random token with an expiry: taking it is
    "set if absent" (Redis ``SET NX PX``), giving it back is "delete if it
    still holds my token" (a compare-and-delete), so a holder whose lease
    expired and was taken over can never remove the new holder's lease.

    Example:
        ```python
        if await backend.acquire_lease("kivigo:lease:{report}", token, 10_000):
            try:
                ...  # only one holder at a time, across processes
            finally:
                await backend.release_lease("kivigo:lease:{report}", token)
        ```
    """

    async def acquire_lease(self, key: str, token: bytes, ttl_ms: int) -> bool:
        """Store ``token`` under ``key`` for ``ttl_ms`` unless ``key`` exists; return whether it did."""
        ...

    async def release_lease(self, key: str, token: bytes) -> bool:
        """Delete ``key`` if it still holds ``token``; return whether it was deleted."""
        ...


@runtime_checkable
class WatchBackend(Protocol):
    """A stream of changes (set, delete, expire) to keys under a prefix, made by any client.

    ``watch`` subscribes before it returns: every change made after that is
    delivered, in the order the server made it (per node, on a cluster). The
    returned :class:`~kivigo_async.watch.ChangeStream` is the caller's to
    close; :class:`~kivigo_async.watch.ChangeFeed` implements the buffering,
    overflow and error rules for a backend. See :mod:`kivigo_async.watch`.

    Example:
        ```python
        stream = await backend.watch("user:")
        try:
            async for change in stream:
                print(change.type, change.key)
        finally:
            await stream.aclose()
        ```
    """

    async def watch(
        self, prefix: str, *, max_pending: int = 10_000, configure_server: bool = True
    ) -> ChangeStream:
        """Subscribe to changes to keys starting with the literal ``prefix`` (``""``: every key).

        Args:
            prefix: the literal key prefix (glob characters match themselves).
            max_pending: undelivered events held before the stream fails with
                :class:`~kivigo_async.watch.WatchOverflowError`.
            configure_server: whether the backend may check and turn on what
                the server needs to publish changes (Redis: ``notify-keyspace-events``
                through ``CONFIG``); backends with nothing to configure ignore it.
        """
        ...
