"""The machinery behind :meth:`kivigo_async.Client.get_or_set`.

Two layers keep a cold key from being computed many times over:

* in-process single-flight: concurrent callers for one key in one client
  share one task that runs the factory;
* a distributed lease (:class:`~kivigo_async.backend.LeaseBackend`) taken by
  that task, so that one process in the fleet runs the factory while the
  others poll for the value it stores.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import contextvars
import functools
import inspect
import logging
import random
import secrets
import sys
import typing
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from .backend import AsyncBackend, LeaseBackend
from .codecs import _codec_failure, _type_name
from .errors import BackendUnavailableError, EncodeError, KivigoError, OperationTimeoutError
from .hooks import EventType

if TYPE_CHECKING:
    from .client import Client

__all__ = [
    "LEASE_PREFIX",
    "CacheFiller",
    "Interrupted",
    "OutWaited",
    "SingleFlight",
    "find_lease",
    "lease_key",
    "result_type",
]

_log = logging.getLogger("kivigo_async")

R = TypeVar("R")

#: Prefix of lease keys. It has no braces, so the key's own hash tag (if any) stays in effect.
LEASE_PREFIX = "kivigo:lease:"
#: After the prefix, before a key that keeps its own braces: ``{`` begins the other kind,
#: so no two keys share a lease key (``a`` and ``{a}`` would otherwise).
_AS_IS = "="

# Polling for a value another process is computing: exponential, jittered, capped
# so a waiter notices the value (or an expired lease) within a fraction of a second.
_FIRST_POLL = 0.01
_MAX_POLL = 0.2
# How often a caller whose wait_timeout ran out looks again whether the shared
# task has gone back to waiting for another process (and so may be left).
_RECHECK = 0.02


def _hash_tag(key: str) -> str | None:
    """The part of ``key`` Redis Cluster hashes when it is not the whole key."""
    start = key.find("{")
    if start == -1:
        return None
    end = key.find("}", start + 1)
    if end == -1 or end == start + 1:
        return None
    return key[start + 1 : end]


def lease_key(key: str) -> str:
    """The key of the lease that guards filling ``key``.

    It lands in the same cluster hash slot as ``key``: a key with a hash tag
    keeps it, after ``=`` (``kivigo:lease:={user:1}:profile``); a key without
    ``}`` is wrapped in one (``kivigo:lease:{report:daily}``). Only a key
    containing ``}`` but no valid hash tag (``a{}b``) may land elsewhere, which
    costs locality, not correctness. Two keys never share a lease key.

    Example:
        >>> lease_key("report:daily"), lease_key("{user:1}:profile")
        ('kivigo:lease:{report:daily}', 'kivigo:lease:={user:1}:profile')
    """
    if _hash_tag(key) is not None or "}" in key:
        return LEASE_PREFIX + _AS_IS + key
    return LEASE_PREFIX + "{" + key + "}"


def find_lease(backend: AsyncBackend) -> LeaseBackend | None:
    """The lease capability of ``backend``: its own, a Redis adapter, or ``None``."""
    if isinstance(backend, LeaseBackend):
        return backend
    # Only look for the Redis backends when they are loaded: a backend of those
    # classes cannot exist otherwise, and importing redis-py here would be wasted.
    standalone = sys.modules.get("kivigo_async.backends.redis.standalone")
    cluster = sys.modules.get("kivigo_async.backends.redis.cluster")
    if (standalone is not None and isinstance(backend, standalone.RedisBackend)) or (
        cluster is not None and isinstance(backend, cluster.RedisClusterBackend)
    ):
        from .backends.redis._lease import RedisLease

        return RedisLease(backend)
    return None


#: Special forms a codec cannot decode into: the value is read untyped instead.
_UNTYPED_FORMS: Final = frozenset(
    f"{module}.{name}"
    for module in ("typing", "typing_extensions")
    for name in ("Any", "LiteralString", "Never", "NoReturn")
)
_SELF_FORMS: Final = frozenset({"typing.Self", "typing_extensions.Self"})


def _annotated_return(fn: Any) -> Any:
    """The return annotation of function ``fn``, resolved alone: a parameter annotated
    with a name imported only for type checkers must not cost the return type."""
    raw = getattr(fn, "__annotations__", {}).get("return", object)

    def probe() -> None: ...

    probe.__annotations__ = {"return": raw}
    return typing.get_type_hints(probe, globalns=getattr(fn, "__globals__", None)).get("return", object)


def result_type(factory: Callable[[], object]) -> Any:
    """The type a factory's return annotation names, for decoding cached values.

    ``async def load() -> User`` gives ``User``; a class gives itself; ``-> Self`` on
    a bound method gives its class; no or an unresolvable annotation gives
    ``object`` (decode untyped).
    """
    target: Any = factory
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.isclass(target):
        return target
    if not (inspect.isfunction(target) or inspect.ismethod(target)):
        return object
    try:
        hint = _annotated_return(inspect.unwrap(getattr(target, "__func__", target)))
    except Exception:  # a forward reference that does not resolve at runtime
        return object
    if typing.get_origin(hint) in (collections.abc.Awaitable, collections.abc.Coroutine):
        args = typing.get_args(hint)
        hint = args[-1] if args else object
    if isinstance(hint, TypeVar):
        return object
    form = repr(hint)
    if form in _SELF_FORMS:
        owner = getattr(target, "__self__", None)
        if owner is None:
            return object
        return owner if inspect.isclass(owner) else type(owner)
    if form in _UNTYPED_FORMS:
        return object
    return hint


class _Call(Generic[R]):
    __slots__ = ("abandoned", "task", "waiters")

    def __init__(self, task: asyncio.Task[R]) -> None:
        self.task = task
        self.waiters = 0
        self.abandoned = False


class Interrupted(Exception):
    """The shared task was cancelled, not by the caller (by ``cancel_all``, or from inside its work)."""


class OutWaited(Exception):
    """A caller's own ``timeout`` ran out (the shared task goes on for the others)."""


class SingleFlight(Generic[R]):
    """Run one task per key at a time; concurrent callers share its outcome.

    The work runs in its own task, so one caller being cancelled does not
    cancel the others' result; when every caller has been cancelled the
    task is cancelled too. With ``wait_for_cleanup``, the last caller to leave
    also waits for that task to end (its cleanup on cancellation), so that
    leaving means nothing it started still runs.

    Example:
        ```python
        flights: SingleFlight[bytes] = SingleFlight()
        body = await flights.do("https://example.org/", lambda: fetch("https://example.org/"))
        ```
    """

    def __init__(self, *, wait_for_cleanup: bool = False) -> None:
        self._wait_for_cleanup = wait_for_cleanup
        self._calls: dict[str, _Call[R]] = {}
        # Every task not yet finished, including an abandoned one that a newer
        # call for its key has replaced in _calls: cancel_all waits for them all.
        self._running: dict[asyncio.Task[R], _Call[R]] = {}

    def __len__(self) -> int:
        return len(self._calls)

    async def do(
        self,
        key: str,
        fn: Callable[[], Coroutine[Any, Any, R]],
        timeout: float | None = None,
        patient: Callable[[asyncio.Task[R]], bool] | None = None,
    ) -> R:
        """Return the result of ``fn()``, shared with every concurrent call for ``key``.

        ``timeout`` bounds this caller's wait alone, unless ``patient(task)``,
        asked when it runs out (and every few milliseconds after, while it
        says so), says to wait on.

        Raises:
            OutWaited: ``timeout`` ran out (the task goes on for the other callers).
            Interrupted: the task was cancelled, and not by this caller.
        """
        call = self._calls.get(key)
        if call is None or call.abandoned:
            call = _Call(asyncio.get_running_loop().create_task(fn()))
            self._calls[key] = call
            self._running[call.task] = call
            call.task.add_done_callback(functools.partial(self._finished, key, call))
        call.waiters += 1
        task = call.task
        try:
            # asyncio.wait, unlike awaiting a shield, tells this caller's cancellation
            # (raised here) from the task's (a task that ends cancelled), on every Python.
            done, _ = await asyncio.wait({task}, timeout=timeout)
            while not done:
                if patient is None or not patient(task):
                    raise OutWaited
                done, _ = await asyncio.wait({task}, timeout=_RECHECK)
        finally:
            call.waiters -= 1
            if call.waiters == 0 and not task.done():
                # Every caller left: nobody wants the result any more.
                call.abandoned = True
                task.cancel()
                if self._wait_for_cleanup:
                    await asyncio.wait({task})
        if task.cancelled():
            raise Interrupted
        return task.result()

    def runs(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether ``task`` is one of the calls' tasks (which :meth:`cancel_all` waits for)."""
        return task in self._running

    async def cancel_all(self) -> None:
        """Cancel every running task and wait until each has finished its cleanup.

        Called from inside one of them (a factory closing its client), that one is
        left to finish by itself: it cannot wait for its own end.
        """
        current = asyncio.current_task()
        running = [(task, call) for task, call in self._running.items() if task is not current]
        for task, call in running:
            # An abandoned task was cancelled already and may be giving its lease
            # back: cancelling it again would cut that short.
            if not call.abandoned:
                task.cancel()
        if running:
            await asyncio.gather(*(task for task, _ in running), return_exceptions=True)

    def _finished(self, key: str, call: _Call[R], task: asyncio.Task[R]) -> None:
        self._running.pop(task, None)
        if self._calls.get(key) is call:
            del self._calls[key]
        if not task.cancelled():
            task.exception()  # retrieved: the callers got it, or there were none left


#: The fills (filler, key, task) the running code is part of. Set in each fill's
#: task, so that the factory and the tasks it starts inherit it: a get_or_set from
#: there for a key being filled would join its own fill and wait for itself.
_FILLING: contextvars.ContextVar[tuple[tuple[CacheFiller, str, asyncio.Task[Any]], ...]] = (
    contextvars.ContextVar("kivigo_get_or_set_filling", default=())
)

#: _Filled.type of bytes no caller's type has decoded yet: each caller decodes them.
_UNDECODED: Final = object()


class _Filled:
    """What a fill produced: the value, its encoded form, and the type it was decoded as.

    Every caller sharing the fill gets it; the first takes ``value`` and the
    others decode ``data`` again, so that no two callers share a mutable object.
    """

    __slots__ = ("data", "taken", "type", "value")

    def __init__(self, value: Any, data: bytes, type: Any) -> None:
        self.value = value
        self.data = data
        self.type = type
        self.taken = False


class CacheFiller:
    """One client's single-flight table and lease capability for ``get_or_set``."""

    def __init__(self, backend: AsyncBackend) -> None:
        self.lease = find_lease(backend)
        self._flights: SingleFlight[_Filled] = SingleFlight()
        #: The task filling a key, while it waits for another process's run: the
        #: only time a caller's wait_timeout may end its wait.
        self._polling: dict[str, asyncio.Task[Any]] = {}
        #: Lease releases not yet ended, some cut loose from their cancelled fill.
        self._releases: set[asyncio.Future[bool]] = set()
        self._closed = False

    def runs(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether ``task`` is a fill (which :meth:`aclose` waits for)."""
        return self._flights.runs(task)

    async def aclose(self) -> None:
        """Stop every fill in progress (their leases are released) before the backend closes."""
        self._closed = True
        await self._flights.cancel_all()
        if self._releases:
            # A fill cancelled while it gave its lease back ends at once; the release
            # goes on, and needs the backend open until it is done.
            await asyncio.wait(set(self._releases))

    async def fill(
        self,
        client: Client,
        key: str,
        factory: Callable[[], object],
        rtype: Any,
        ttl_ms: int | None,
        lock_ms: int,
        wait_ms: int | None,
    ) -> Any:
        """Return the value of ``key`` after at most one factory run per key in this process."""
        if self._closed:
            raise BackendUnavailableError(f"get_or_set for key {key!r}: the client is closed")
        for filler, filling, task in _FILLING.get():
            if filler is self and filling == key and not task.done():
                raise KivigoError(
                    f"get_or_set for key {key!r}: called from the factory computing that key "
                    "(directly or through the factory of another get_or_set), which would wait "
                    "for itself; read the key with get() there instead"
                )
        wait_s = None if wait_ms is None else wait_ms / 1000
        try:
            # wait_timeout is each caller's own, and bounds only waiting for another
            # process's run: the shared task polls for as long as any caller waits,
            # and a caller whose time is up leaves once the task is polling, never
            # while it takes or gives back the lease or runs the factory here.
            filled = await self._flights.do(
                key,
                lambda: self._fill(client, key, factory, rtype, ttl_ms, lock_ms),
                wait_s,
                lambda task: self._polling.get(key) is not task,
            )
        except OutWaited:
            raise OperationTimeoutError(
                f"get_or_set for key {key!r}: another caller has been filling it "
                f"for longer than wait_timeout ({wait_s:g} s)"
            ) from None
        except Interrupted:
            if self._closed:
                raise BackendUnavailableError(
                    f"get_or_set for key {key!r}: the client was closed while the value was computed"
                ) from None
            raise KivigoError(
                f"get_or_set for key {key!r}: the factory was cancelled from inside "
                "(it awaited something another task cancelled)"
            ) from None
        if filled.type == rtype and not filled.taken:
            filled.taken = True
            return filled.value
        # Another caller took the value, or asked for another type: decode the shared bytes.
        return client._decode(key, filled.data, rtype)

    async def _fill(
        self,
        client: Client,
        key: str,
        factory: Callable[[], object],
        rtype: Any,
        ttl_ms: int | None,
        lock_ms: int,
    ) -> _Filled:
        task = asyncio.current_task()
        assert task is not None
        _FILLING.set((*_FILLING.get(), (self, key, task)))  # this task's own context: see _FILLING
        lease = self.lease
        if lease is None:
            # The caller's miss may have been read before a fill that has since
            # ended stored the value: without a lease's read-after-acquire, read
            # again here, or this process would run the factory a second time.
            return await _read_or_produce(client, key, factory, rtype, ttl_ms)
        lkey = lease_key(key)
        token = secrets.token_bytes(16)
        delay = _FIRST_POLL
        while True:
            try:
                taken = await lease.acquire_lease(lkey, token, lock_ms)
            except (Exception, asyncio.CancelledError):
                # The server may have set the lease before the cancellation, the
                # timeout or the broken connection: give it back (only ever ours),
                # or every process would wait out lock_ttl.
                await self._release(lease, lkey, token, key)
                raise
            if taken:
                try:
                    # The previous holder may have stored the value and left
                    # between our last read and our acquire.
                    return await _read_or_produce(client, key, factory, rtype, ttl_ms)
                finally:
                    await self._release(lease, lkey, token, key)
            with self._waiting_for_another(key):
                stored = await _read(client, key, rtype)
                if stored is not None:
                    return stored
                # Until every caller has left (each by its own wait_timeout) or the
                # holder's lease expires and this task takes it over.
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter: spread the pollers out
            delay = min(delay * 2, _MAX_POLL)

    async def _release(self, lease: LeaseBackend, lkey: str, token: bytes, key: str) -> None:
        release = asyncio.ensure_future(lease.release_lease(lkey, token))
        self._releases.add(release)
        release.add_done_callback(self._releases.discard)
        try:
            # Shielded: a cancelled holder still gives its lease back.
            await asyncio.shield(release)
        except asyncio.CancelledError:
            # The release goes on without us (aclose() waits for it): its failure
            # must still be seen and logged, not reported by asyncio as never retrieved.
            release.add_done_callback(functools.partial(_release_ended, key))
            raise
        except Exception as exc:
            _release_failed(key, exc)

    @contextlib.contextmanager
    def _waiting_for_another(self, key: str) -> Iterator[None]:
        task = asyncio.current_task()
        assert task is not None
        self._polling[key] = task
        try:
            yield
        finally:
            # An abandoned task may end after the next one for this key has started.
            if self._polling.get(key) is task:
                del self._polling[key]


async def _read(client: Client, key: str, rtype: Any) -> _Filled | None:
    """The value stored under ``key`` (decoded as ``rtype`` when it can be), or None."""
    data = await client.backend.get(key)
    if data is None:
        return None
    try:
        value = client._codec.decode(data, rtype)
    except Exception:
        # rtype is the first caller's. Callers sharing the fill may ask for other
        # types (old and new code during a schema change): each decodes the bytes
        # itself, and only a caller whose own type fails hears of it.
        return _Filled(None, data, _UNDECODED)
    return _Filled(value, data, rtype)


async def _read_or_produce(
    client: Client, key: str, factory: Callable[[], object], rtype: Any, ttl_ms: int | None
) -> _Filled:
    """The stored value if there is one now, else the factory's (stored with ``ttl_ms``)."""
    stored = await _read(client, key, rtype)
    return stored if stored is not None else await _produce(client, key, factory, rtype, ttl_ms)


async def _produce(
    client: Client, key: str, factory: Callable[[], object], rtype: Any, ttl_ms: int | None
) -> _Filled:
    result = factory()
    if inspect.isawaitable(result):
        awaitable: Awaitable[object] = result
        result = await awaitable
    data = client._encode(key, result)
    # Read back as every later hit will be: a result that does not match the type
    # is refused before it is stored (it would fail every read until its TTL ran
    # out), and the miss returns what the hits will (untyped too: JSON turns a
    # datetime into a string, a set into a list).
    result = _read_back(client, key, data, rtype)
    await client.backend.set(key, data, ttl_ms)
    if client.hooks:
        await client.hooks.emit(EventType.SET, key, data)
    return _Filled(result, data, rtype)


def _read_back(client: Client, key: str, data: bytes, rtype: Any) -> object:
    try:
        return client._codec.decode(data, rtype)
    except Exception as exc:
        error = EncodeError(
            f"get_or_set for key {key!r}: the factory's result does not read back as "
            f"{_type_name(rtype)}: {_codec_failure(client._codec, exc)}"
        )
    # Without the chain, as Client._decode raises its errors: the codec's exception,
    # or what it chained, may quote the value.
    raise error from None


def _release_failed(key: str, exc: BaseException) -> None:
    # The lease expires on its own; failing the caller would hide its value or its error.
    _log.warning("get_or_set: could not release the lease for key %r (it will expire): %s", key, exc)


def _release_ended(key: str, release: asyncio.Future[bool]) -> None:
    if not release.cancelled() and (exc := release.exception()) is not None:
        _release_failed(key, exc)
