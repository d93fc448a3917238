"""The :class:`Client`: validation, codecs and hooks in front of any backend.

The client owns everything that is the same for every storage engine: key and
argument checks, turning values into bytes and back, TTL conversion, hook
events and error wording. I/O is delegated to an
:class:`~kivigo_async.backend.AsyncBackend`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import inspect
import math
import operator
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from types import TracebackType, UnionType
from typing import Any, NamedTuple, TypeVar, Union, cast, overload

from ._singleflight import CacheFiller, result_type
from ._tasks import cancel_requested
from .backend import (
    AsyncBackend,
    BackendTransaction,
    BatchBackend,
    ConnectableBackend,
    HealthBackend,
    TransactionBackend,
    TTLBackend,
    TxOp,
    WatchBackend,
    stored_bytes,
)
from .codecs import Codec, JsonCodec, _codec_failure
from .errors import (
    BackendUnavailableError,
    ConfigurationError,
    DecodeError,
    EncodeError,
    HealthCheckError,
    InvalidArgumentError,
    InvalidKeyError,
    KeyNotFoundError,
    KivigoError,
    UnsupportedOperationError,
)
from .hooks import EventType, HookRegistry
from .watch import DEFAULT_MAX_PENDING, ChangeStream, Watch, _check_watch_args

__all__ = ["MAX_TTL_MS", "Client", "HealthCheck", "Transaction", "TTLLike"]

T = TypeVar("T")
D = TypeVar("D")
V = TypeVar("V")
Item = TypeVar("Item")

#: A TTL: seconds as a number (fractions keep millisecond precision) or a timedelta.
TTLLike = Union[float, int, timedelta]  # noqa: UP007 (a runtime alias must work on 3.9 syntax)
#: An extra health check: receives the client, raises on failure. Usually async;
#: a plain function is called as it is.
HealthCheck = Callable[["Client"], Union[Awaitable[object], object]]  # noqa: UP007

#: The longest TTL accepted, in milliseconds (about 146 million years). Redis refuses
#: an expiry time past 2**63 - 1 ms once its clock is added; this leaves room for it.
MAX_TTL_MS = 2**62


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


def _check_key(key: object) -> None:
    if key.__class__ is not str:
        raise InvalidKeyError(f"keys must be str, not {type(key).__name__}")
    if not key:
        raise InvalidKeyError("keys must not be empty")


def _key_list(keys: Iterable[str]) -> list[str]:
    if isinstance(keys, (str, bytes)):
        raise InvalidKeyError("expected a collection of keys, not a single string")
    try:
        return list(keys)
    except TypeError as exc:
        raise InvalidKeyError(f"expected a collection of keys, not {type(keys).__name__}") from exc


_first = operator.itemgetter(0)
_second = operator.itemgetter(1)


def _check_types(keys: list[str]) -> None:
    """Raise InvalidKeyError at the first key that is not a non-empty exact str."""
    # Batches run this on every key. Identity, not equality (a set or list.count
    # would use ==, which a metaclass can fake). A plain loop: on CPython 3.11+ its
    # specialized bytecode beats all(map(operator.is_, map(type, ...))) by a third.
    for key in keys:
        if type(key) is not str or not key:
            _check_key(key)
            # Only a str subclass that overrides __class__ gets here.
            raise InvalidKeyError(f"keys must be str, not {type(key).__name__}")


def _check_keys(keys: Iterable[str]) -> list[str]:
    """The checked keys, in input order, repeats included."""
    out = _key_list(keys)
    _check_types(out)
    return out


def _unique_keys(keys: Iterable[str]) -> list[str]:
    """The checked keys, first occurrence of each kept, in input order."""
    out = _check_keys(keys)
    # All str from here, so hashing them is safe. A set is cheaper to build than an
    # ordered dict, and most batches have no repeats.
    return out if len(set(out)) == len(out) else list(dict.fromkeys(out))


def _batch_items(
    operation: str, mapping: Mapping[str, V], ttl: TTLLike | None
) -> tuple[list[str], list[V], int | None]:
    """A batch write's checked keys, its values in the same order, and its TTL in ms."""
    if not isinstance(mapping, Mapping):
        raise InvalidArgumentError(f"{operation} needs a mapping, not {type(mapping).__name__}")
    ttl_ms = _ttl_ms(ttl)
    pairs = list(mapping.items())
    return _check_keys(map(_first, pairs)), list(map(_second, pairs)), ttl_ms


def _raw_bytes(operation: str, value: object, key: str | None = None) -> bytes:
    """``value`` as the bytes to store as is (a copy: a bytearray may change after the call)."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        where = "" if key is None else f" (key {key!r})"
        raise InvalidArgumentError(f"{operation} needs bytes, not {type(value).__name__}{where}")
    return bytes(value)  # an exact bytes object is returned as it is, not copied


def _settled(items: list[Item], results: Sequence[object]) -> tuple[list[Item], BaseException | None]:
    """The items whose call succeeded, and the first failure (``None``: none failed).

    A backend without batch support gets one call per key, all awaited to the end
    (none left running after the batch returns): when one fails, the others may
    have been applied all the same.
    """
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is None:
        return items, None
    return [item for item, r in zip(items, results, strict=True) if not isinstance(r, BaseException)], failed


def _ttl_ms(ttl: TTLLike | None, name: str = "ttl") -> int | None:
    """A user TTL (or another duration: ``name``, in errors) in whole milliseconds (None: no expiry)."""
    if ttl is None:
        return None
    if isinstance(ttl, timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
        try:
            seconds = float(ttl)
        except OverflowError:
            seconds = math.inf
    else:
        raise InvalidArgumentError(
            f"{name} must be seconds (int or float) or a timedelta, not {type(ttl).__name__}"
        )
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidArgumentError(f"{name} must be a positive, finite duration, got {seconds!r} seconds")
    exact_ms = seconds * 1000  # infinite above about 1.8e305 s, which round() refuses
    if exact_ms > MAX_TTL_MS:
        raise InvalidArgumentError(
            f"{name} must be at most {MAX_TTL_MS // 1000} seconds, got {seconds!r} seconds"
            + (" (leave ttl=None for no expiry)" if name == "ttl" else "")
        )
    ms = round(exact_ms)  # at most MAX_TTL_MS: floats near 2**62 are whole numbers
    if ms < 1:
        raise InvalidArgumentError(f"{name} must be at least 1 millisecond, got {seconds!r} seconds")
    return ms


async def run_health_check(check: HealthCheck, client: Client) -> object:
    """Run one extra health check, awaiting its result only when it is awaitable.

    A check that ends in a ``CancelledError`` nobody asked its caller for (it
    awaited a future that something else cancelled) has failed, like one that
    raised: it raises :class:`~kivigo_async.errors.KivigoError`, so a health
    loop goes on instead of ending as if it had been stopped. Before Python 3.11
    the two cannot be told apart, and the cancellation goes on.
    """
    try:
        result = check(client)
        if inspect.isawaitable(result):
            return await result
        return result
    except asyncio.CancelledError as exc:
        name = getattr(check, "__qualname__", type(check).__qualname__)
        failure = _cancelled_inside(f"health check {name}")
        if failure is None:
            raise
        raise failure from exc


def _cancelled_inside(what: str) -> KivigoError | None:
    """The failure a health probe's ``CancelledError`` stands for, when it came
    from a future something else cancelled; ``None`` when the caller was cancelled."""
    if cancel_requested() is not False:
        return None
    return KivigoError(f"{what} was cancelled from inside (not by its caller)")


def _refuse_class(what: str, value: object) -> None:
    # A class has the protocol's methods too, so a duck-typed check alone accepts it.
    if isinstance(value, type):
        raise ConfigurationError(
            f"{what} must be an instance, not the class {value.__name__} (did you mean {value.__name__}()?)"
        )


def _none_type_error() -> InvalidArgumentError:
    # get(key, None) reads like dict.get(key, None), but would decode as NoneType
    # and still raise KeyNotFoundError for a missing key.
    return InvalidArgumentError(
        "type=None is not a type: did you mean default=None? (to read a JSON null, pass type(None))"
    )


def _encode_error(key: str, codec: object, exc: Exception) -> EncodeError:
    return EncodeError(f"cannot encode the value for key {key!r}: {_codec_failure(codec, exc)}")


def _decode_error(key: str, codec: object, exc: Exception) -> DecodeError:
    return DecodeError(f"cannot decode the value of key {key!r}: {_codec_failure(codec, exc)}")


def _miscounted(codec: object, method: str, given: int, returned: object) -> str:
    """The message for a batch method of ``codec`` that did not return one result per item."""
    try:
        count = f"{len(returned)} result(s)"  # type: ignore[arg-type]
    except Exception:
        count = f"a {type(returned).__name__}"
    return (
        f"{type(codec).__name__}.{method} returned {count} for {given} values: "
        "a codec's batch method must return one result per value, in order"
    )


class _CloseOutcome(NamedTuple):
    """How a close() ended, for the calls that waited for it."""

    error: Exception | None
    traceback: TracebackType | None
    interrupted: bool  # cancelled (or interrupted) before it finished


class Client:
    """An asyncio key-value client over any :class:`~kivigo_async.backend.AsyncBackend`.

    Values are encoded with ``codec`` (default :class:`~kivigo_async.codecs.JsonCodec`).
    Using the client as an async context manager connects the backend (when it
    supports eager connection) and closes it on exit.

    Args:
        backend: the storage engine, e.g. ``RedisBackend`` or ``MemoryBackend``.
        codec: how values become bytes; any object with ``encode``/``decode``.

    Example:
        ```python
        from kivigo_async import Client
        from kivigo_async.backends.redis import RedisBackend

        async with Client(RedisBackend.from_url("redis://localhost:6379/0")) as client:
            await client.set("session:abc123", {"user_id": "u1"}, ttl=1800)
            session = await client.get("session:abc123")
        ```
    """

    def __init__(self, backend: AsyncBackend, *, codec: Codec | None = None) -> None:
        _refuse_class("backend", backend)
        if not isinstance(backend, AsyncBackend):
            raise ConfigurationError(f"backend must implement AsyncBackend, got {type(backend).__name__}")
        codec = JsonCodec() if codec is None else codec
        _refuse_class("codec", codec)
        if not (callable(getattr(codec, "encode", None)) and callable(getattr(codec, "decode", None))):
            raise ConfigurationError(f"codec must have encode() and decode(), got {type(codec).__name__}")
        self._backend = backend
        self._codec = codec
        # Optional batch decode (see kivigo_async.codecs): one call per batch, not per value.
        # Looked up on the class: a wrapper forwarding attributes to an inner codec
        # with __getattr__ would otherwise hand us the inner one, skipping its own decode.
        decode_many = getattr(codec, "decode_many", None) if hasattr(type(codec), "decode_many") else None
        self._decode_many: Callable[[Sequence[bytes], Any], list[Any]] | None = (
            decode_many if callable(decode_many) else None
        )
        encode_many = getattr(codec, "encode_many", None) if hasattr(type(codec), "encode_many") else None
        self._encode_many: Callable[[Sequence[Any]], list[bytes]] | None = (
            encode_many if callable(encode_many) else None
        )
        # Capabilities are detected once: isinstance on a runtime protocol is slow.
        self._batch: BatchBackend | None = backend if isinstance(backend, BatchBackend) else None
        self._ttl: TTLBackend | None = backend if isinstance(backend, TTLBackend) else None
        self._tx: TransactionBackend | None = backend if isinstance(backend, TransactionBackend) else None
        self._health: HealthBackend | None = backend if isinstance(backend, HealthBackend) else None
        self._watcher: WatchBackend | None = backend if isinstance(backend, WatchBackend) else None
        # Every watch made (weakly: one never used may just be dropped), and the
        # subscribed ones (strongly: each holds a connection until it is closed).
        self._watches: weakref.WeakSet[Watch] = weakref.WeakSet()
        self._subscribed_watches: set[Watch] = set()
        self.hooks = HookRegistry()
        self._closed = False
        # While a close() is under way: what it will end with, and the task running it.
        self._close_done: asyncio.Future[_CloseOutcome] | None = None
        self._close_task: asyncio.Task[Any] | None = None

    def __repr__(self) -> str:
        return f"Client(backend={self._backend!r}, codec={self._codec!r})"

    @property
    def backend(self) -> AsyncBackend:
        """The backend this client delegates to."""
        return self._backend

    @property
    def codec(self) -> Codec:
        """The codec values go through."""
        return self._codec

    # -- lifecycle -------------------------------------------------------

    async def __aenter__(self) -> Client:
        if self._closed:
            # Its backend is closed too: every call would fail. (A framework's client
            # factory that hands out one shared client does this on a second startup.)
            raise BackendUnavailableError("this client was closed; create a new one instead of reopening it")
        if isinstance(self._backend, ConnectableBackend):
            try:
                await self._backend.connect()
            except BaseException:
                # __aexit__ will not run: release what connect() opened, keep its error.
                # Marked closed, so that a later close() does not close the backend twice.
                self._closed = True
                async with self._closing():
                    with contextlib.suppress(Exception):
                        await self._backend.close()
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop watches, running ``get_or_set`` fills and background hooks, then close the backend.

        Safe to call twice. A call made while another is under way returns when
        that one has finished, with its error if it failed; called from work the
        first one stops (a background hook, a ``get_or_set`` factory), it returns
        at once, since waiting would never end; such work must not await a
        close() in a task of its own (``asyncio.gather``, or ``asyncio.wait_for``
        before Python 3.12), which cannot be told apart and would wait. A
        ``get_or_set`` caller whose fill is stopped gets
        :class:`~kivigo_async.errors.BackendUnavailableError`.

        Example:
            ```python
            await asyncio.gather(client.close(), client.close())  # both return once it is closed
            ```
        """
        if self._closed:
            await self._wait_closed()
            return
        self._closed = True
        async with self._closing():
            try:
                for watch in {*self._watches, *self._subscribed_watches}:
                    # Their loops end (StopAsyncIteration); a failing close must not stop ours.
                    with contextlib.suppress(Exception):
                        await watch.aclose()
                if self._filler is not None:
                    await self._filler.aclose()
                await self.hooks.aclose()
            finally:
                # Even when cancelled above: this close() is the only one that
                # releases the backend's connections.
                await self._backend.close()

    @contextlib.asynccontextmanager
    async def _closing(self) -> AsyncIterator[None]:
        """Mark the close under way, so that a close() called meanwhile can wait for it."""
        done: asyncio.Future[_CloseOutcome] = asyncio.get_running_loop().create_future()
        self._close_done, self._close_task = done, asyncio.current_task()
        outcome = _CloseOutcome(None, None, interrupted=False)
        try:
            yield
        except Exception as exc:
            outcome = _CloseOutcome(exc, exc.__traceback__, interrupted=False)
            raise
        except BaseException:
            # Cancelled, perhaps while the backend closed: that may go on without us.
            outcome = _CloseOutcome(None, None, interrupted=True)
            raise
        finally:
            self._close_task = None
            done.set_result(outcome)

    async def _wait_closed(self) -> None:
        """Wait for a close() under way, unless that close waits for the running task."""
        done = self._close_done
        if done is None or done.done():
            return
        current = asyncio.current_task()
        filler = self._filler
        if (
            current is self._close_task  # called by something the close itself awaits
            or self.hooks.runs(current)
            or (filler is not None and filler.runs(current))
        ):
            return
        # Shielded: a caller that gives up must not cancel the close it waited for.
        outcome = await asyncio.shield(done)
        if outcome.interrupted:
            # The backend's close goes on detached; closing again joins it (it is safe to repeat).
            await self._backend.close()
        if outcome.error is not None:
            # Its traceback as the first close left it, as a future's result is raised:
            # each waiter raising the one object would otherwise add its frames to it.
            raise outcome.error.with_traceback(outcome.traceback)

    # -- encoding helpers ------------------------------------------------

    # Codec errors are raised from None, outside the handler: a codec's EncodeError or
    # DecodeError says what it has to say in its message, but whatever it chained (a
    # serializer's error, a third-party parser's) may quote the value, and a log
    # prints the chain; so may the message of any other exception (only its type is said).

    def _encode(self, key: str, value: object) -> bytes:
        try:
            return self._codec.encode(value)
        except Exception as exc:
            error = _encode_error(key, self._codec, exc)
        raise error from None

    def _encode_items(self, keys: Sequence[str], values: Sequence[object]) -> list[tuple[str, bytes]]:
        """``(key, encoded value)`` for ``keys`` and their ``values``; one codec call when the codec can."""
        many = self._encode_many
        if many is not None:
            try:
                data = many(values)
            except Exception:
                pass  # encoded again below, one by one, so that the error names the key
            else:
                try:
                    return builtins.list(zip(keys, data, strict=True))
                except (TypeError, ValueError):  # not one value per key: nothing is written
                    error = EncodeError(_miscounted(self._codec, "encode_many", len(values), data))
                raise error from None
        encode = self._encode
        return [(key, encode(key, value)) for key, value in zip(keys, values, strict=True)]

    def _decode(self, key: str, data: bytes, type: type[T]) -> T:
        try:
            return self._codec.decode(data, type)
        except Exception as exc:
            error = _decode_error(key, self._codec, exc)
        raise error from None

    def _decode_values(self, keys: Sequence[str], data: Sequence[bytes], type: Any) -> dict[str, Any]:
        """``{key: decoded value}`` for ``keys`` and their ``data``; one codec call when the codec can."""
        many = self._decode_many
        if many is not None:
            try:
                values = many(data, type)
            except Exception:
                pass  # decoded again below, one by one, so that the error names the key
            else:
                try:
                    return dict(zip(keys, values, strict=True))
                except (TypeError, ValueError):
                    error = DecodeError(_miscounted(self._codec, "decode_many", len(data), values))
                raise error from None
        decode = self._decode
        return {key: decode(key, value, type) for key, value in zip(keys, data, strict=True)}

    def _result(self, key: str, data: bytes | None, type: Any, default: Any) -> Any:
        """What a read returns: the decoded value, ``default``, or KeyNotFoundError."""
        if data is None:
            if default is _MISSING:
                raise KeyNotFoundError(key)
            return default
        return self._decode(key, data, type)

    def _require_ttl(self, operation: str) -> TTLBackend:
        if self._ttl is None:
            raise UnsupportedOperationError(f"{operation}: {type(self._backend).__name__} has no TTL support")
        return self._ttl

    # -- single keys -----------------------------------------------------

    @overload
    async def get(self, key: str) -> Any: ...
    @overload
    async def get(self, key: str, type: type[T]) -> T: ...
    @overload
    async def get(self, key: str, type: type[T], *, default: D) -> T | D: ...
    @overload
    async def get(self, key: str, *, default: D) -> Any | D: ...
    # A union (``User | None``) is not a class: decoded as such, but no annotation can
    # name its instances until TypeForm exists, so the result is Any.
    @overload
    async def get(self, key: str, type: UnionType) -> Any: ...
    @overload
    async def get(self, key: str, type: UnionType, *, default: object) -> Any: ...

    async def get(self, key: str, type: Any = object, *, default: Any = _MISSING) -> Any:
        """Return the value stored under ``key``, decoded as ``type``.

        Raises :class:`~kivigo_async.errors.KeyNotFoundError` when the key does
        not exist, unless ``default`` is given.

        Example:
            ```python
            session = await client.get("session:abc123", Session)
            count = await client.get("visits", int, default=0)
            ```
        """
        _check_key(key)
        if type is None:
            raise _none_type_error()
        return self._result(key, await self._backend.get(key), type, default)

    async def set(self, key: str, value: object, *, ttl: TTLLike | None = None) -> None:
        """Store ``value`` under ``key``, replacing any value and TTL.

        ``ttl`` is seconds (``float`` keeps millisecond precision) or a
        ``timedelta``; ``None`` keeps the key until it is deleted.

        Example:
            ```python
            await client.set("session:abc123", session, ttl=1800)
            ```
        """
        _check_key(key)
        ttl_ms = None if ttl is None else _ttl_ms(ttl)
        data = self._encode(key, value)
        await self._backend.set(key, data, ttl_ms)
        if self.hooks:
            await self.hooks.emit(EventType.SET, key, data)

    async def delete(self, key: str) -> bool:
        """Delete ``key``; return whether it existed.

        Example:
            ```python
            existed = await client.delete("session:abc123")
            ```
        """
        _check_key(key)
        existed = await self._backend.delete(key)
        if self.hooks:
            await self.hooks.emit(EventType.DELETE, key, None)
        return existed

    async def get_raw(self, key: str) -> bytes:
        """Return the stored bytes of ``key`` without decoding them.

        Example:
            ```python
            blob = await client.get_raw("avatar:42")
            ```
        """
        _check_key(key)
        data = await self._backend.get(key)
        if data is None:
            raise KeyNotFoundError(key)
        return data

    async def set_raw(
        self, key: str, value: bytes | bytearray | memoryview, *, ttl: TTLLike | None = None
    ) -> None:
        """Store ``value`` (bytes-like) as is, bypassing the codec.

        Example:
            ```python
            await client.set_raw("avatar:42", png_bytes, ttl=3600)
            ```
        """
        _check_key(key)
        data = _raw_bytes("set_raw", value)
        await self._backend.set(key, data, _ttl_ms(ttl))
        if self.hooks:
            await self.hooks.emit(EventType.SET_RAW, key, data)

    async def has_key(self, key: str) -> bool:
        """Return whether ``key`` exists.

        Example:
            ```python
            if await client.has_key("session:abc123"): ...
            ```
        """
        _check_key(key)
        if self._batch is not None:
            return await self._batch.exists([key]) == 1
        return await self._backend.get(key) is not None

    async def has_keys(self, keys: Iterable[str]) -> bool:
        """Return whether every key in ``keys`` exists (``True`` for no keys).

        Example:
            ```python
            ready = await client.has_keys(["config:db", "config:api"])
            ```
        """
        unique = _unique_keys(keys)
        if not unique:
            return True
        if self._batch is not None:
            return await self._batch.exists(unique) == len(unique)
        values = await asyncio.gather(*(self._backend.get(k) for k in unique))
        return all(v is not None for v in values)

    # -- cache fill ------------------------------------------------------

    # Created on the first get_or_set: most clients never call it.
    _filler: CacheFiller | None = None

    # With type=, the call is typed as it, whatever the factory returns: the result is
    # read back as that type (a dict for a Struct). Without it, the factory types it.
    @overload
    async def get_or_set(
        self,
        key: str,
        factory: Callable[[], object],
        *,
        type: builtins.type[T],
        ttl: TTLLike | None = None,
        lock_ttl: TTLLike = 10,
        wait_timeout: TTLLike | None = None,
    ) -> T: ...
    @overload
    async def get_or_set(
        self,
        key: str,
        factory: Callable[[], Awaitable[T]],
        *,
        type: builtins.type[T] | None = None,
        ttl: TTLLike | None = None,
        lock_ttl: TTLLike = 10,
        wait_timeout: TTLLike | None = None,
    ) -> T: ...
    @overload
    async def get_or_set(
        self,
        key: str,
        factory: Callable[[], T],
        *,
        type: builtins.type[T] | None = None,
        ttl: TTLLike | None = None,
        lock_ttl: TTLLike = 10,
        wait_timeout: TTLLike | None = None,
    ) -> T: ...
    @overload
    async def get_or_set(
        self,
        key: str,
        factory: Callable[[], object],
        *,
        type: UnionType,
        ttl: TTLLike | None = None,
        lock_ttl: TTLLike = 10,
        wait_timeout: TTLLike | None = None,
    ) -> Any: ...
    async def get_or_set(
        self,
        key: str,
        factory: Callable[[], Any],
        *,
        type: Any = None,
        ttl: TTLLike | None = None,
        lock_ttl: TTLLike = 10,
        wait_timeout: TTLLike | None = None,
    ) -> Any:
        """Return the value of ``key``; when it is missing, compute it once with ``factory`` and store it.

        ``factory`` is a plain or async function of no arguments. Concurrent
        callers for one key share one run of it: in this process through a
        shared task, and across processes through a lease (a key named
        ``kivigo:lease:{<key>}``, or ``kivigo:lease:=<key>`` for a key with
        a hash tag or a ``}``, holding a random token, taken with
        ``SET NX PX`` and given back by a compare-and-delete) when the backend
        supports leases (Redis, Valkey, memory). The lease holder runs the
        factory and stores the result with ``ttl``; other processes poll for
        the value with a jittered backoff and take over if the lease expires
        (``lock_ttl``) before a value appears, as when its holder crashed.

        If the factory raises, the lease is given back and every caller
        waiting in this process gets the exception; nothing is stored.

        Cached values are decoded as ``type``; without it, as the factory's
        return annotation (``async def load() -> User``), else untyped. A miss
        returns the factory's result read back the same way: what later hits
        return, in an object of each caller's own.

        Args:
            key: the cache key.
            factory: computes the value when the key is missing.
            type: decode a cached value as this type.
            ttl: expiry of the stored value (``None``: none).
            lock_ttl: how long the lease lasts; longer than the factory's
                worst-case run time, or another process may run it too.
            wait_timeout: how long to wait for another process's run before
                raising :class:`~kivigo_async.errors.OperationTimeoutError`
                (``None``: as long as it takes; an abandoned lease still
                expires after ``lock_ttl``).

        Example:
            ```python
            async def load_report() -> Report:
                return await build_report()         # slow: runs once fleet-wide

            report = await client.get_or_set("report:daily", load_report, ttl=300)
            ```
        """
        _check_key(key)
        if not callable(factory):
            raise InvalidArgumentError(
                f"get_or_set needs a callable factory, not {builtins.type(factory).__name__}"
            )
        ttl_ms = _ttl_ms(ttl)
        lock_ms = _ttl_ms(lock_ttl, "lock_ttl")
        if lock_ms is None:
            raise InvalidArgumentError("get_or_set needs a lock_ttl (a positive duration), not None")
        wait_ms = _ttl_ms(wait_timeout, "wait_timeout")
        rtype = result_type(factory) if type is None else type
        data = await self._backend.get(key)
        if data is not None:
            return self._decode(key, data, rtype)
        filler = self._filler
        if filler is None:
            if self._closed:
                # A close() under way found no filler to stop: one made now would
                # run the factory after close() returned.
                raise BackendUnavailableError(f"get_or_set for key {key!r}: the client is closed")
            filler = self._filler = CacheFiller(self._backend)
        return await filler.fill(self, key, factory, rtype, ttl_ms, lock_ms, wait_ms)

    # -- TTL -------------------------------------------------------------

    async def expire(self, key: str, ttl: TTLLike) -> bool:
        """Set a TTL on an existing key; return ``False`` when it does not exist.

        Example:
            ```python
            await client.expire("session:abc123", 30)
            ```
        """
        _check_key(key)
        ttl_ms = _ttl_ms(ttl)
        if ttl_ms is None:
            raise InvalidArgumentError("expire needs a ttl; use persist() to remove one")
        done = await self._require_ttl("expire").expire(key, ttl_ms)
        if done and self.hooks:
            await self.hooks.emit(EventType.EXPIRE, key, None)
        return done

    async def ttl(self, key: str) -> float | None:
        """Return the seconds ``key`` has left (ms precision), ``None`` when it never expires.

        Raises :class:`~kivigo_async.errors.KeyNotFoundError` for a missing key.

        Example:
            ```python
            remaining = await client.ttl("session:abc123")   # e.g. 1799.412
            ```
        """
        _check_key(key)
        ms = await self._require_ttl("ttl").ttl(key)
        return None if ms is None else ms / 1000

    async def persist(self, key: str) -> bool:
        """Remove the TTL of ``key``; return ``True`` when there was one.

        Example:
            ```python
            await client.persist("session:abc123")
            ```
        """
        _check_key(key)
        done = await self._require_ttl("persist").persist(key)
        if done and self.hooks:
            await self.hooks.emit(EventType.PERSIST, key, None)
        return done

    # -- listing ---------------------------------------------------------

    def iter_keys(self, prefix: str = "") -> AsyncIterator[str]:
        """Stream the keys that start with the literal ``prefix``, in no order.

        Works on keyspaces of any size (Redis ``SCAN``, never ``KEYS``).
        Characters that are special in glob patterns are matched literally and
        no separator is added: ``iter_keys("user")`` also yields ``user1``.
        On a single Redis server a key may be yielded twice if the server resizes
        its table during the scan; :meth:`list` removes such duplicates. On a
        cluster each key comes once, and a key that exists for the whole scan is
        never missed, even while slots migrate.

        Example:
            ```python
            async for key in client.iter_keys("session:"):
                ...
            ```
        """
        if not isinstance(prefix, str):
            raise InvalidArgumentError(f"prefix must be str, not {type(prefix).__name__}")
        return self._backend.scan(prefix)

    async def list(self, prefix: str = "") -> list[str]:
        """Return the keys that start with the literal ``prefix`` (``""``: all keys), sorted by their bytes.

        Example:
            ```python
            sessions = await client.list("session:")
            ```
        """
        keys = {key async for key in self.iter_keys(prefix)}
        try:
            # Code-point order is the stored bytes' order for UTF-8 text, so one
            # check spares the per-key encoding when no key holds escaped bytes.
            "".join(keys).encode()
        except UnicodeEncodeError:
            return sorted(keys, key=stored_bytes)
        return sorted(keys)

    async def match_keys(
        self, prefix: str, fn: Callable[[builtins.list[str]], bool | Awaitable[bool]]
    ) -> bool:
        """Call ``fn`` with the keys under ``prefix`` and return its verdict.

        ``fn`` may be a plain or an async function.

        Example:
            ```python
            many = await client.match_keys("session:", lambda keys: len(keys) > 1000)
            ```
        """
        if not callable(fn):
            raise InvalidArgumentError("match_keys needs a callable")
        result = fn(await self.list(prefix))
        if inspect.isawaitable(result):
            result = await result
        return bool(result)

    # -- batches ---------------------------------------------------------

    async def batch_set(self, mapping: Mapping[str, object], *, ttl: TTLLike | None = None) -> None:
        """Store every key/value pair of ``mapping``, with one optional TTL for all.

        Every key is checked and every value encoded before anything is sent:
        one bad key or value raises and nothing is written. On Redis the batch
        is one round trip and atomic. On a backend without batch support it is
        one call per key, run together: when one fails, the others may still
        have been written (hooks hear of those), and its error is raised once
        every call has ended.

        Example:
            ```python
            await client.batch_set({"cache:user:1": alice, "cache:user:2": bob}, ttl=60)
            ```
        """
        keys, values, ttl_ms = _batch_items("batch_set", mapping, ttl)
        if keys:
            await self._write_batch(self._encode_items(keys, values), ttl_ms, EventType.BATCH_SET)

    async def batch_set_raw(
        self, mapping: Mapping[str, bytes | bytearray | memoryview], *, ttl: TTLLike | None = None
    ) -> None:
        """Store every key/value pair of ``mapping`` as is, bypassing the codec.

        The batch form of :meth:`set_raw`, with :meth:`batch_set`'s guarantees: every
        key and value is checked before anything is sent (a value that is not
        bytes-like raises :class:`~kivigo_async.errors.InvalidArgumentError` and nothing
        is written). Hooks hear one ``BATCH_SET_RAW`` event per key.

        Example:
            ```python
            await client.batch_set_raw({"thumb:1": png_1, "thumb:2": png_2}, ttl=3600)
            ```
        """
        keys, values, ttl_ms = _batch_items("batch_set_raw", mapping, ttl)
        # Exact bytes need neither a copy nor a call per value: one pass in C.
        if set(map(type, values)) == {bytes}:
            items = builtins.list(zip(keys, cast("builtins.list[bytes]", values), strict=True))
        else:
            items = [
                (key, _raw_bytes("batch_set_raw", value, key))
                for key, value in zip(keys, values, strict=True)
            ]
        if items:
            await self._write_batch(items, ttl_ms, EventType.BATCH_SET_RAW)

    async def _write_batch(
        self, items: builtins.list[tuple[str, bytes]], ttl_ms: int | None, event: EventType
    ) -> None:
        """Write checked keys with their bytes; hooks hear of each key written."""
        failed: BaseException | None = None
        if self._batch is not None:
            await self._batch.batch_set(items, ttl_ms)
        else:
            results = await asyncio.gather(
                *(self._backend.set(k, v, ttl_ms) for k, v in items), return_exceptions=True
            )
            items, failed = _settled(items, results)
        if self.hooks and items:  # those written, even when the batch failed
            await self.hooks.emit_many(event, items)
        if failed is not None:
            raise failed

    @overload
    async def batch_get(self, keys: Iterable[str]) -> dict[str, Any]: ...
    @overload
    async def batch_get(self, keys: Iterable[str], type: type[T]) -> dict[str, T]: ...
    @overload
    async def batch_get(self, keys: Iterable[str], type: UnionType) -> dict[str, Any]: ...

    async def batch_get(self, keys: Iterable[str], type: Any = object) -> dict[str, Any]:
        """Return ``{key: value}`` for the keys that exist, in input order.

        Missing keys are left out (never mapped to a zero value). A key listed more
        than once is in the result once, at its first place.

        Example:
            ```python
            found = await client.batch_get(["cache:user:1", "cache:user:9"], User)
            ```
        """
        if type is None:  # refused before any I/O, as get() does
            raise _none_type_error()
        found, data = await self._read_batch(keys)
        return self._decode_values(found, data, type)

    async def batch_get_raw(self, keys: Iterable[str]) -> dict[str, bytes]:
        """Return ``{key: stored bytes}`` for the keys that exist, in input order, without decoding.

        The batch form of :meth:`get_raw`, with :meth:`batch_get`'s rules: missing
        keys are left out, and a key listed more than once is in the result once.

        Example:
            ```python
            blobs = await client.batch_get_raw(["thumb:1", "thumb:2"])
            ```
        """
        found, data = await self._read_batch(keys)
        return dict(zip(found, data, strict=True))

    async def _read_batch(self, keys: Iterable[str]) -> tuple[builtins.list[str], builtins.list[bytes]]:
        """The keys found among ``keys`` (checked), and their bytes, in input order."""
        # Repeats are not removed: the result dict folds them, and a set over every
        # key of every batch would cost more than reading the rare repeat twice.
        checked = _check_keys(keys)
        if not checked:
            return checked, []
        if self._batch is not None:
            values = await self._batch.batch_get(checked)
        else:
            values = list(await asyncio.gather(*(self._backend.get(k) for k in checked)))
        # all() tests each value's length, far cheaper than comparing it with None;
        # only a batch with a miss (or an empty value) pays for the exact scan.
        if not all(values) and None in values:
            return (
                [key for key, data in zip(checked, values, strict=True) if data is not None],
                [data for data in values if data is not None],
            )
        return checked, cast("list[bytes]", values)

    async def batch_delete(self, keys: Iterable[str]) -> int:
        """Delete ``keys``; return how many existed.

        Example:
            ```python
            removed = await client.batch_delete(["cache:user:1", "cache:user:2"])
            ```
        """
        unique = _unique_keys(keys)
        if not unique:
            return 0
        failed: BaseException | None = None
        if self._batch is not None:
            count = await self._batch.batch_delete(unique)
        else:
            results = await asyncio.gather(*(self._backend.delete(k) for k in unique), return_exceptions=True)
            unique, failed = _settled(unique, results)
            count = 0 if failed is not None else sum(cast("list[bool]", results))
        if self.hooks and unique:  # those deleted, even when the batch failed
            await self.hooks.emit_many(EventType.BATCH_DELETE, [(k, None) for k in unique])
        if failed is not None:
            raise failed
        return count

    # -- watching ----------------------------------------------------------

    def watch(
        self, prefix: str = "", *, max_pending: int = DEFAULT_MAX_PENDING, configure_server: bool = True
    ) -> Watch:
        """Watch keys under the literal ``prefix`` being set, deleted or expired, by any client.

        Returns a :class:`~kivigo_async.watch.Watch`: enter it with
        ``async with`` (the subscription is in place once entered) and iterate
        :class:`~kivigo_async.watch.ChangeEvent` values. Leaving the block, by
        ``break``, an exception or cancellation, releases the subscription;
        closing the client ends every watch it opened.

        On Redis and Valkey this uses keyspace notifications, on a connection
        of its own (one per primary on a cluster), and a second one per node
        for the heartbeat, which ends the watch when a node is demoted or its
        slots move. Unless ``configure_server``
        is false, the server's ``notify-keyspace-events`` is checked and the
        flags a watch needs are added to those already on (none is ever turned
        off); a server that refuses ``CONFIG`` raises
        :class:`~kivigo_async.watch.NotificationsDisabledError`.

        Delivery is best effort but never silently lossy: a lost connection
        raises :class:`~kivigo_async.errors.BackendUnavailableError`, and
        falling more than ``max_pending`` events behind raises
        :class:`~kivigo_async.watch.WatchOverflowError`, after the events
        received before. See the "Watching changes" guide.

        Raises:
            UnsupportedOperationError: the backend cannot watch.

        Example:
            ```python
            async with client.watch("session:") as changes:
                async for change in changes:
                    print(change.type, change.key)   # e.g. "delete session:abc123"
            ```
        """
        _check_watch_args(prefix, max_pending)
        backend = self._watcher
        if backend is None:
            raise UnsupportedOperationError(f"watch: {type(self._backend).__name__} cannot watch changes")

        async def subscribe() -> ChangeStream:
            if self._closed:
                raise BackendUnavailableError("watch: the client is closed")
            return await backend.watch(prefix, max_pending=max_pending, configure_server=configure_server)

        watch = Watch(prefix, subscribe, subscribed=self._subscribed_watches)
        self._watches.add(watch)
        return watch

    # -- health and transactions -------------------------------------------

    async def health(self, *extra_checks: HealthCheck) -> None:
        """Check the backend (and ``extra_checks``, run concurrently); raise on failure.

        Each extra check is a callable (usually async) that receives the client
        and raises when unhealthy. A backend without a health probe is checked
        with a read of a key that does not need to exist.

        Raises:
            HealthCheckError: with every failure in ``.errors``.
            InvalidArgumentError: an extra check is not callable.

        Example:
            ```python
            await client.health()
            ```
        """
        for check in extra_checks:
            if not callable(check):
                raise InvalidArgumentError(f"a health check must be callable, got {type(check).__name__}")
        probes: builtins.list[Awaitable[object]] = [self._probe_backend()]
        # Each check runs inside its own coroutine, so one that raises at once
        # (a plain function) is a health result like any other.
        probes.extend(run_health_check(check, self) for check in extra_checks)
        results = await asyncio.gather(*probes, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for err in errors:
            if not isinstance(err, Exception):
                raise err  # cancellation and the like are not health results
        if errors:
            summary = "; ".join(f"{type(e).__name__}: {e}" for e in errors)
            raise HealthCheckError(f"health check failed: {summary}", errors) from errors[0]

    async def _probe_backend(self) -> object:
        """The backend's own health probe; a cancellation from inside it is a failed probe."""
        try:
            if self._health is not None:
                await self._health.health()
                return None
            return await self._backend.get("kivigo:health")
        except asyncio.CancelledError as exc:
            failure = _cancelled_inside(f"the health probe of {type(self._backend).__name__}")
            if failure is None:
                raise
            raise failure from exc

    def transaction(self, watch: Iterable[str] = ()) -> Transaction:
        """Open an atomic transaction (``async with``); writes apply together on exit.

        Reads inside run at once; ``set``/``delete`` are queued and applied
        atomically when the block exits without an exception (and discarded
        when it raises). With ``watch``, the commit fails with
        :class:`~kivigo_async.errors.TransactionConflictError` if any watched
        key changed after the block started.

        Example:
            ```python
            async with client.transaction(watch=["stock:42"]) as tx:
                stock = await tx.get("stock:42", int)
                tx.set("stock:42", stock - 1)
                tx.set("order:7", {"item": 42})
            ```
        """
        if self._tx is None:
            raise UnsupportedOperationError(
                f"transaction: {type(self._backend).__name__} has no transaction support"
            )
        return Transaction(self, self._tx, _check_keys(watch))


class Transaction:
    """A transaction opened by :meth:`Client.transaction`.

    Example:
        ```python
        async with client.transaction() as tx:
            tx.set("a", 1)
            tx.delete("b")
        ```
    """

    def __init__(self, client: Client, backend: TransactionBackend, watch: Sequence[str]) -> None:
        self._client = client
        self._backend = backend
        self._watch = watch
        self._tx: BackendTransaction | None = None
        self._ops: list[TxOp] = []
        self._ended = False

    def _open(self) -> BackendTransaction:
        if self._ended:
            # A write queued now would never be committed: refuse it, never drop it.
            raise KivigoError("the transaction has ended: use it only inside its 'async with' block")
        if self._tx is None:
            raise KivigoError("use the transaction inside 'async with'")
        return self._tx

    async def __aenter__(self) -> Transaction:
        if self._tx is not None or self._ended:
            raise KivigoError("a transaction can be entered only once")
        self._tx = await self._backend.begin(self._watch)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tx = self._open()
        self._ended = True
        try:
            if exc_type is None and self._ops:
                await tx.commit(self._ops)
        finally:
            await tx.discard()
        if exc_type is None and self._client.hooks:
            for op in self._ops:
                if op[0] == "set":
                    await self._client.hooks.emit(EventType.SET, op[1], op[2])
                else:
                    await self._client.hooks.emit(EventType.DELETE, op[1], None)

    @overload
    async def get(self, key: str) -> Any: ...
    @overload
    async def get(self, key: str, type: type[T]) -> T: ...
    @overload
    async def get(self, key: str, type: type[T], *, default: D) -> T | D: ...
    @overload
    async def get(self, key: str, *, default: D) -> Any | D: ...
    # A union (``User | None``) is not a class: decoded as such, but no annotation can
    # name its instances until TypeForm exists, so the result is Any.
    @overload
    async def get(self, key: str, type: UnionType) -> Any: ...
    @overload
    async def get(self, key: str, type: UnionType, *, default: object) -> Any: ...

    async def get(self, key: str, type: Any = object, *, default: Any = _MISSING) -> Any:
        """Read ``key`` now (not queued); like :meth:`Client.get`."""
        _check_key(key)
        if type is None:
            raise _none_type_error()
        return self._client._result(key, await self._open().get(key), type, default)

    def set(self, key: str, value: object, *, ttl: TTLLike | None = None) -> None:
        """Queue a write; the value is encoded now, so a bad value raises here."""
        self._open()
        _check_key(key)
        self._ops.append(("set", key, self._client._encode(key, value), _ttl_ms(ttl)))

    def delete(self, key: str) -> None:
        """Queue a delete."""
        self._open()
        _check_key(key)
        self._ops.append(("delete", key))
