"""Hooks: functions called after a successful write.

A :class:`HookRegistry` (``client.hooks``) calls the registered functions with
a :class:`HookEvent` once the backend has confirmed a write. A hook can never
fail or undo the operation: its exceptions and timeouts are logged on the
``kivigo_async.hooks`` logger (with the event type and key, never the value)
and swallowed. Cancelling the task that performs the write still cancels it.

Synchronous hooks (the default) run inside the write call, in registration
order, so the event has been handled when ``await client.set(...)`` returns.
Background hooks run as tasks, each call in the :mod:`contextvars` context of
the write that produced its event (so request ids and tracing spans stay with
their write); :meth:`HookRegistry.drain` waits for them and
:meth:`HookRegistry.aclose` cancels them.

Example:
    ```python
    from kivigo_async.hooks import EventType, HookEvent, prefix_filter

    async def audit(event: HookEvent) -> None:
        print(event.type.value, event.key)

    handle = client.hooks.register(
        audit,
        events=[EventType.SET, EventType.DELETE],
        key_filter=prefix_filter("user:"),
        background=True,
        timeout=2.0,
    )
    await client.set("user:42", {"name": "Ada"})  # audit() runs in the background
    handle.remove()
    ```
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import math
import re
import secrets
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

from ._tasks import callable_name, cancel_requested
from .errors import BackendUnavailableError, InvalidArgumentError

__all__ = [
    "DEFAULT_HOOK_MAX_PENDING",
    "EventType",
    "HookEvent",
    "HookFn",
    "HookHandle",
    "HookRegistry",
    "KeyFilter",
    "key_list_filter",
    "prefix_filter",
    "regex_filter",
    "suffix_filter",
]

_logger = logging.getLogger("kivigo_async.hooks")

#: How many events a background hook may have queued before the oldest are dropped.
DEFAULT_HOOK_MAX_PENDING = 10_000


class EventType(str, Enum):
    """The kind of write that produced a :class:`HookEvent`.

    Members compare equal to their string value, so ``EventType.SET == "set"``.
    """

    SET = "set"
    SET_RAW = "set_raw"
    DELETE = "delete"
    BATCH_SET = "batch_set"
    BATCH_SET_RAW = "batch_set_raw"
    BATCH_DELETE = "batch_delete"
    EXPIRE = "expire"
    PERSIST = "persist"

    def __str__(self) -> str:
        # The str mixin makes Enum.__str__ vary between Python versions; the value is what users expect.
        return self.value


@dataclass(frozen=True, slots=True, repr=False)
class HookEvent:
    """One successful write, as seen by a hook.

    Args:
        type: what happened.
        key: the key written, deleted or whose TTL changed.
        value: the encoded bytes written (``SET``, ``SET_RAW``, ``BATCH_SET``, ``BATCH_SET_RAW``);
            ``None`` for deletes, ``EXPIRE`` and ``PERSIST``.

    Example:
        >>> HookEvent(EventType.SET, "user:42", b'{"name":"Ada"}')
        HookEvent(type='set', key='user:42', value=<14 bytes>)
    """

    type: EventType
    key: str
    value: bytes | None

    def __repr__(self) -> str:
        # Values may be secrets; show their size only, so logging an event never leaks one.
        value = "None" if self.value is None else f"<{len(self.value)} bytes>"
        return f"HookEvent(type={str(self.type)!r}, key={self.key!r}, value={value})"


#: A hook: an ``async def`` or a plain function taking a :class:`HookEvent`. What it
#: returns is ignored (awaited first if awaitable), so ``cache.pop`` or an ``async def``
#: returning a bool fit too.
HookFn = Callable[[HookEvent], Awaitable[object] | object]
#: A predicate on keys; the hook is called only when it returns true.
KeyFilter = Callable[[str], bool]

_ALL_EVENTS: frozenset[EventType] = frozenset(EventType)


# -- key filters ----------------------------------------------------------


def prefix_filter(prefix: str) -> KeyFilter:
    """Match keys that start with ``prefix``.

    Example:
        >>> prefix_filter("user:")("user:42")
        True
    """
    if not isinstance(prefix, str):
        raise InvalidArgumentError(f"prefix must be str, not {type(prefix).__name__}")

    def match_prefix(key: str) -> bool:
        return key.startswith(prefix)

    return match_prefix


def suffix_filter(suffix: str) -> KeyFilter:
    """Match keys that end with ``suffix``.

    Example:
        >>> suffix_filter(":lock")("job:7:lock")
        True
    """
    if not isinstance(suffix, str):
        raise InvalidArgumentError(f"suffix must be str, not {type(suffix).__name__}")

    def match_suffix(key: str) -> bool:
        return key.endswith(suffix)

    return match_suffix


def regex_filter(pattern: str | re.Pattern[str]) -> KeyFilter:
    """Match keys in which the regular expression is found (:func:`re.search`).

    Anchor the pattern (``^...$``) to match whole keys. The pattern is compiled once.

    Example:
        >>> regex_filter(r"^session:[0-9a-f]+$")("session:abc123")
        True
    """
    if isinstance(pattern, re.Pattern):
        if not isinstance(pattern.pattern, str):
            raise InvalidArgumentError("regex_filter needs a str pattern, not a bytes pattern")
        compiled = pattern
    elif isinstance(pattern, str):
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise InvalidArgumentError(f"invalid regular expression {pattern!r}: {exc}") from exc
    else:
        raise InvalidArgumentError(f"pattern must be str or re.Pattern, not {type(pattern).__name__}")
    search = compiled.search

    def match_regex(key: str) -> bool:
        return search(key) is not None

    return match_regex


def key_list_filter(keys: Iterable[str]) -> KeyFilter:
    """Match exactly the given keys.

    Example:
        >>> key_list_filter(["config", "feature-flags"])("config")
        True
    """
    if isinstance(keys, (str, bytes)):
        # A lone string would silently become a set of its characters.
        raise InvalidArgumentError("key_list_filter needs a collection of keys, not a single string")
    try:
        members = frozenset(keys)
    except TypeError as exc:
        raise InvalidArgumentError(f"keys must be an iterable of str: {exc}") from exc
    for key in members:
        if not isinstance(key, str):
            raise InvalidArgumentError(f"keys must be str, not {type(key).__name__}")
    return members.__contains__


# -- running one hook -----------------------------------------------------


class _Hook:
    __slots__ = (
        "active",
        "background",
        "behind",
        "closed_warned",
        "dropped",
        "events",
        "fn",
        "id",
        "is_coro",
        "key_filter",
        "name",
        "pending",
        "timeout",
        "worker",
    )

    def __init__(
        self,
        fn: HookFn,
        events: frozenset[EventType],
        key_filter: KeyFilter | None,
        background: bool,
        timeout: float | None,
        max_pending: int | None,
    ) -> None:
        self.id = secrets.token_hex(8)
        self.fn = fn
        self.name = callable_name(fn)
        # Decided once so the hot path needs no inspect call for async hooks.
        self.is_coro = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - an object with `async def __call__`
        )
        self.events = events
        self.key_filter = key_filter
        self.background = background
        self.timeout = timeout
        self.active = True
        # Background hooks: events not handled yet, in write order, each with the
        # context of its write, and the task handling them (one at a time, so that
        # a hook sees a key's writes in order). Bounded: a hook slower than the
        # writes loses its oldest events, not memory.
        self.pending: deque[tuple[HookEvent, contextvars.Context]] = deque(maxlen=max_pending)
        self.worker: asyncio.Task[None] | None = None
        self.dropped = 0
        # Whether the hook has dropped events since its queue was last empty: one
        # warning per episode of falling behind, not one per dropped event.
        self.behind = False
        # Whether the warning about events lost to the registry's close was logged.
        self.closed_warned = False


class _HookTimeoutError(Exception):
    """Internal: the hook's own deadline expired (``__cause__`` is the TimeoutError)."""


async def _call(hook: _Hook, event: HookEvent) -> None:
    result = hook.fn(event)
    # Plain functions may still return an awaitable (a partial, a lambda around a coroutine function).
    if result is not None and (hook.is_coro or inspect.isawaitable(result)):
        await cast("Awaitable[object]", result)  # is_coro: a coroutine, unchecked for speed


#: Python 3.10: the task wait_for runs a timed hook call in -> the task awaiting it.
_timed_calls: dict[asyncio.Task[None], asyncio.Task[Any]] = {}


async def _bounded_wait_for(hook: _Hook, event: HookEvent, timeout: float) -> None:
    # Python 3.10 has no asyncio.timeout; wait_for cannot tell our deadline from
    # a TimeoutError raised by the hook itself, so both count as timed out.
    call = asyncio.ensure_future(_call(hook, event))
    caller = asyncio.current_task()
    if caller is not None:  # so that the registry knows the call's own task (HookRegistry._chain)
        _timed_calls[call] = caller
        call.add_done_callback(_timed_calls.pop)
    try:
        await asyncio.wait_for(call, timeout)
    except asyncio.TimeoutError as exc:
        raise _HookTimeoutError from exc


if sys.version_info >= (3, 11):

    async def _bounded_timeout(hook: _Hook, event: HookEvent, timeout: float) -> None:
        # asyncio.timeout runs the hook in the current task, unlike wait_for, which creates one.
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                await _call(hook, event)
        except TimeoutError as exc:
            if deadline.expired():
                raise _HookTimeoutError from exc
            raise

    _bounded: Callable[[_Hook, HookEvent, float], Coroutine[Any, Any, None]] = _bounded_timeout
else:
    _bounded = _bounded_wait_for


def _cancelled_by_hook() -> bool:
    """True when a CancelledError came from inside the hook rather than from cancelling our task."""
    # When the two cannot be told apart (None), propagating is the safe choice.
    return cancel_requested() is False


def _log_failure(hook: _Hook, event: HookEvent, what: str) -> None:
    _logger.error(
        "%s %s (id %s) failed on %s event for key %r",
        what,
        hook.name,
        hook.id,
        str(event.type),
        event.key,
        exc_info=True,
    )


def _swallow(hook: _Hook, event: HookEvent, exc: BaseException) -> None:
    """Log the failed call of ``hook`` (called in its ``except``); re-raise a cancellation of our task."""
    if isinstance(exc, asyncio.CancelledError) and not _cancelled_by_hook():
        raise exc
    _log_failure(hook, event, "hook")


async def _invoke(hook: _Hook, event: HookEvent) -> None:
    """Run one hook call; log and swallow everything except cancellation of our task."""
    try:
        if hook.timeout is None:
            # Inlined _call: one coroutine frame less on the common path.
            result = hook.fn(event)
            if result is not None and (hook.is_coro or inspect.isawaitable(result)):
                await cast("Awaitable[object]", result)
        else:
            await _bounded(hook, event, hook.timeout)
    except _HookTimeoutError as exc:
        _logger.warning(
            "hook %s (id %s) timed out after %ss on %s event for key %r",
            hook.name,
            hook.id,
            hook.timeout,
            str(event.type),
            event.key,
            exc_info=exc.__cause__,
        )
    except (Exception, asyncio.CancelledError) as exc:
        _swallow(hook, event, exc)


def _call_plain(hook: _Hook, event: HookEvent) -> Awaitable[object] | None:
    """:func:`_invoke` for a plain function without a timeout, as far as it goes without awaiting.

    Returns what is left to await: an awaitable the function returned.
    """
    try:
        result = hook.fn(event)
    except (Exception, asyncio.CancelledError) as exc:
        _swallow(hook, event, exc)
        return None
    return result if result is not None and inspect.isawaitable(result) else None


async def _await_result(hook: _Hook, event: HookEvent, result: Awaitable[object]) -> None:
    """The rest of :func:`_call_plain`, once the function returned an awaitable."""
    try:
        await result
    except (Exception, asyncio.CancelledError) as exc:
        _swallow(hook, event, exc)


async def _drain_pending(hook: _Hook, callers: dict[asyncio.Task[None], asyncio.Task[None]]) -> None:
    """The background worker of ``hook``: handle its queued events in order, then end.

    Each call runs in a copy of the context of the write that queued the event,
    not in this worker's, which is that of whichever write happened to start it.
    ``callers`` maps each call made a task of its own to this worker, for
    :meth:`HookRegistry.drain` called from inside a hook.
    """
    pending = hook.pending
    loop = asyncio.get_running_loop()
    worker = asyncio.current_task()
    name = f"kivigo-hook-{hook.id}-call"
    # A plain function runs right here, in the event's context: a task per call would
    # cost far more than most such hooks (a counter, a local cache eviction) do.
    plain = not hook.is_coro and hook.timeout is None
    try:
        while pending and hook.active:
            event, context = pending.popleft()
            if plain:
                # A copy, as a task gets: what one call sets is not seen by the next.
                context = context.copy()
                result = context.run(_call_plain, hook, event)
                if result is None:
                    continue
                work = _await_result(hook, event, result)
            elif _same_values(context, contextvars.copy_context()):
                # The values this worker runs with already (the usual case: writes
                # from one request, or no context variables at all): no task needed.
                # A call that sets one changes the worker's, so the next call,
                # compared again, gets a task of its own and never sees it.
                await _invoke(hook, event)
                continue
            else:
                work = _invoke(hook, event)
            # Awaiting must happen in a task of its own: a task's context is fixed when
            # it is made, and one made inside context.run gets a copy of that context.
            call = context.run(loop.create_task, work, name=name)
            if worker is not None:
                callers[call] = worker
            try:
                # Cancelling this worker (aclose) cancels the call too.
                await call
            finally:
                callers.pop(call, None)
        hook.behind = False  # caught up
    finally:
        # Not current_task(): a worker left on a closed loop is closed by the garbage
        # collector, with no loop running.
        if hook.worker is worker:
            hook.worker = None
        if not hook.active:
            pending.clear()


_MISSING = object()


def _same_values(context: contextvars.Context, other: contextvars.Context) -> bool:
    """Whether two contexts hold the very same objects.

    By identity, never ``==``: values that compare equal may still be two
    requests' objects (two empty lists), and some values' ``==`` raises (an
    array's or an SQL expression's truth), which would end the worker.
    """
    if len(context) != len(other):
        return False
    get = other.get
    return all(get(var, _MISSING) is value for var, value in context.items())


def _dropping(hook: _Hook, count: int) -> None:
    hook.dropped += count
    if not hook.behind:
        hook.behind = True
        _logger.warning(
            "background hook %s (id %s) fell more than %d events behind: dropping the oldest "
            "until it catches up (%d dropped so far; see max_pending)",
            hook.name,
            hook.id,
            hook.pending.maxlen,
            hook.dropped,
        )


def _dropping_at_close(hook: _Hook, count: int) -> None:
    """Count events that will never reach ``hook`` because the registry is closed; warn once."""
    hook.dropped += count
    if not hook.closed_warned:
        hook.closed_warned = True
        _logger.warning(
            "hooks closed: background hook %s (id %s) will not receive %d events written before "
            "or during the close; they are dropped (%d dropped so far)",
            hook.name,
            hook.id,
            count,
            hook.dropped,
        )


def _accepts(hook: _Hook, event: HookEvent) -> bool:
    key_filter = hook.key_filter
    if key_filter is None:
        return True
    # A raising filter is a failure of the hook, not of the write.
    try:
        return bool(key_filter(event.key))
    except Exception:
        _log_failure(hook, event, "key filter of hook")
        return False


# -- public API -----------------------------------------------------------


class HookHandle:
    """What :meth:`HookRegistry.register` returns; call :meth:`remove` to unregister.

    Example:
        ```python
        handle = client.hooks.register(print)
        handle.remove()
        assert not handle.active
        ```
    """

    __slots__ = ("_hook", "_registry", "id")

    def __init__(self, registry: HookRegistry, hook: _Hook) -> None:
        self._registry = registry
        self._hook = hook
        #: A random identifier, also printed in log records about this hook.
        self.id: str = hook.id

    @property
    def active(self) -> bool:
        """Whether the hook is still registered."""
        return self._hook.active

    @property
    def dropped(self) -> int:
        """How many events this background hook lost: its queue was full, or the registry closed.

        See ``max_pending`` in :meth:`HookRegistry.register` and :meth:`HookRegistry.aclose`;
        always 0 for an inline hook.
        """
        return self._hook.dropped

    def remove(self) -> None:
        """Unregister the hook. Calling it again does nothing.

        The hook is not called for any later event. A call already running (a
        background task, or the hook removing itself) is left to finish within
        its timeout; :meth:`HookRegistry.drain` and :meth:`HookRegistry.aclose`
        still wait for or cancel it. Pending events of a batch are not delivered.
        """
        self._registry._remove(self._hook)

    def __repr__(self) -> str:
        return f"<HookHandle id={self.id} hook={self._hook.name} active={self._hook.active}>"


class HookRegistry:
    """The hooks of one client, and the background tasks running them.

    ``bool(registry)`` is false when no hook is registered, which lets callers
    skip building events at all.

    Example:
        ```python
        registry = HookRegistry()
        seen: list[str] = []
        registry.register(lambda event: seen.append(event.key), events=["set"])
        await registry.emit(EventType.SET, "user:42", b"{}")
        assert seen == ["user:42"]
        ```
    """

    def __init__(self) -> None:
        self._hooks: list[_Hook] = []
        # Per event type, the (synchronous, background) hooks, rebuilt on every
        # register/remove so emit does no event matching. Tuples are immutable,
        # which makes them the snapshot that survives hooks (un)registering during emit.
        self._index: dict[EventType, tuple[tuple[_Hook, ...], tuple[_Hook, ...]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Each running background hook call -> the worker task awaiting it.
        self._callers: dict[asyncio.Task[None], asyncio.Task[None]] = {}
        self._closed = False

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def __len__(self) -> int:
        return len(self._hooks)

    def __repr__(self) -> str:
        return f"<HookRegistry hooks={len(self._hooks)} running={len(self._tasks)}>"

    def register(
        self,
        fn: HookFn,
        *,
        events: Iterable[EventType | str] | None = None,
        key_filter: KeyFilter | None = None,
        background: bool = False,
        timeout: float | None = None,
        max_pending: int | None = DEFAULT_HOOK_MAX_PENDING,
    ) -> HookHandle:
        """Call ``fn`` after each successful write that matches.

        Args:
            fn: an ``async def`` or plain function taking a :class:`HookEvent`.
                Its return value is ignored (awaited first if awaitable).
            events: the event types to receive, as members or their string
                values (``"set"``); ``None`` or empty means every event.
            key_filter: called with the key; the hook runs only when it returns
                true. See :func:`prefix_filter`, :func:`suffix_filter`,
                :func:`regex_filter` and :func:`key_list_filter`.
            background: run the hook in a task instead of inside the write call.
                Its calls run one at a time, in write order, each in a copy of
                the :mod:`contextvars` context of the write that produced the
                event (request ids and tracing spans stay with their write).
            timeout: seconds after which an awaiting hook is cancelled and the
                timeout logged. It cannot interrupt code that never awaits.
            max_pending: background hooks only: how many events may wait for
                the hook. When a write would queue more, the oldest are dropped,
                counted in :attr:`HookHandle.dropped` and logged (one warning
                each time the hook falls behind). ``None`` lets the queue grow
                without bound.

        Raises:
            InvalidArgumentError: ``fn`` or ``key_filter`` is not callable, an
                event type is unknown, or ``timeout`` or ``max_pending`` is not
                a positive number.
            BackendUnavailableError: ``background=True`` once the registry is
                closed (by :meth:`aclose`, which ``client.close()`` calls): no
                event would ever reach the hook.

        Example:
            ```python
            async def invalidate(event: HookEvent) -> None:
                await local_cache.pop(event.key)

            handle = client.hooks.register(
                invalidate, events=["set", "delete"], key_filter=prefix_filter("user:")
            )
            ```
        """
        if not callable(fn):
            raise InvalidArgumentError(f"hook must be callable, not {type(fn).__name__}")
        if key_filter is not None and not callable(key_filter):
            raise InvalidArgumentError(f"key_filter must be callable, not {type(key_filter).__name__}")
        if timeout is not None:
            if (
                isinstance(timeout, bool)
                or not isinstance(timeout, (int, float))
                or not math.isfinite(timeout)
                or timeout <= 0
            ):
                raise InvalidArgumentError(f"timeout must be a positive number of seconds, got {timeout!r}")
            timeout = float(timeout)
        if max_pending is not None and (
            isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1
        ):
            raise InvalidArgumentError(f"max_pending must be a positive int or None, got {max_pending!r}")
        if background and self._closed:
            raise BackendUnavailableError(
                "hooks: the client is closed; a background hook registered now would never run"
            )
        hook = _Hook(fn, _parse_events(events), key_filter, bool(background), timeout, max_pending)
        self._hooks.append(hook)
        self._reindex()
        return HookHandle(self, hook)

    def _remove(self, hook: _Hook) -> None:
        if not hook.active:
            return
        hook.active = False
        self._hooks.remove(hook)
        self._reindex()

    def _reindex(self) -> None:
        index: dict[EventType, tuple[tuple[_Hook, ...], tuple[_Hook, ...]]] = {}
        for event_type in EventType:
            matching = [hook for hook in self._hooks if event_type in hook.events]
            if matching:
                index[event_type] = (
                    tuple(hook for hook in matching if not hook.background),
                    tuple(hook for hook in matching if hook.background),
                )
        self._index = index

    def _queue(self, hook: _Hook, entries: Sequence[tuple[HookEvent, contextvars.Context]]) -> None:
        pending = hook.pending
        if pending.maxlen is not None:
            overflow = len(pending) + len(entries) - pending.maxlen
            if overflow > 0:
                _dropping(hook, overflow)
        pending.extend(entries)  # a deque with maxlen drops from the left: the oldest
        # done(): a worker cancelled before it started never ran its cleanup. Another
        # loop's: left on a loop closed (or stopped) without cancelling it, it never ends.
        worker, loop = hook.worker, asyncio.get_running_loop()
        if worker is None or worker.done() or worker.get_loop() is not loop:
            task = loop.create_task(_drain_pending(hook, self._callers), name=f"kivigo-hook-{hook.id}")
            hook.worker = task
            # The loop keeps only weak references to tasks; the set keeps them alive until done.
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def emit(self, type: EventType, key: str, value: bytes | None) -> None:
        """Deliver one event to the matching hooks.

        Background hooks are started first, then synchronous hooks run in
        registration order. Hook failures are logged, never raised;
        cancellation of the calling task propagates.

        Example:
            ```python
            await registry.emit(EventType.DELETE, "user:42", None)
            ```
        """
        entry = self._index.get(type)
        if entry is None:
            return
        sync_hooks, background_hooks = entry
        event = HookEvent(_coerce_type(type), key, value)
        if background_hooks:
            if self._closed:
                self._dropped_after_close(background_hooks, (event,))
            else:
                # One snapshot per write, shared by its hooks: each call runs in a copy of its own.
                entries = ((event, contextvars.copy_context()),)
                for hook in background_hooks:
                    if hook.active and (hook.key_filter is None or _accepts(hook, event)):
                        self._queue(hook, entries)
        for hook in sync_hooks:
            # A hook earlier in this emit may have removed this one.
            if hook.active and (hook.key_filter is None or _accepts(hook, event)):
                await _invoke(hook, event)

    async def emit_many(self, type: EventType, items: Sequence[tuple[str, bytes | None]]) -> None:
        """Deliver one event per ``(key, value)`` pair, in order (batch writes).

        A background hook handles them in order, after the events queued before,
        each call with its own timeout and error isolation.

        Example:
            ```python
            await registry.emit_many(EventType.BATCH_DELETE, [("a", None), ("b", None)])
            ```
        """
        entry = self._index.get(type)
        if entry is None or not items:
            return
        sync_hooks, background_hooks = entry
        event_type = _coerce_type(type)
        events = [HookEvent(event_type, key, value) for key, value in items]
        if background_hooks and self._closed:
            self._dropped_after_close(background_hooks, events)
        elif background_hooks:
            context = contextvars.copy_context()
            for hook in background_hooks:
                if not hook.active:
                    continue
                selected = events if hook.key_filter is None else [e for e in events if _accepts(hook, e)]
                if selected:
                    self._queue(hook, [(event, context) for event in selected])
        if sync_hooks:
            for event in events:
                for hook in sync_hooks:
                    if hook.active and (hook.key_filter is None or _accepts(hook, event)):
                        await _invoke(hook, event)

    @staticmethod
    def _dropped_after_close(hooks: Sequence[_Hook], events: Sequence[HookEvent]) -> None:
        # A write that finished as the client closed: its event is lost, but not without a word.
        for hook in hooks:
            if hook.active:
                count = sum(1 for event in events if _accepts(hook, event))
                if count:
                    _dropping_at_close(hook, count)

    async def drain(self) -> None:
        """Wait until no background hook call is running, including calls started meanwhile.

        Called from inside a background hook, it does not wait for that hook itself.

        Example:
            ```python
            await client.set("k", 1)
            await client.hooks.drain()  # background hooks have seen "k"
            ```
        """
        own = self._own_tasks()
        while True:
            pending = [task for task in self._tasks_here() if task not in own]
            if not pending:
                return
            await asyncio.wait(pending)

    def _tasks_here(self) -> list[asyncio.Task[None]]:
        """The background tasks of the running loop; forgets those of closed loops.

        A loop closed without cancelling its tasks leaves them pending forever:
        waiting for one would never end, and cancelling one raises.
        """
        loop = asyncio.get_running_loop()
        here = []
        for task in list(self._tasks):
            task_loop = task.get_loop()
            if task_loop is loop:
                here.append(task)
            elif task_loop.is_closed():
                self._tasks.discard(task)
        return here

    def runs(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether ``task`` runs background hook calls (which :meth:`aclose` waits for)."""
        return any(t in self._tasks or t in self._callers for t in self._chain(task))

    def _chain(self, task: asyncio.Task[Any] | None) -> tuple[asyncio.Task[Any], ...]:
        """``task`` and, inside a background hook call, the tasks awaiting it: on Python
        3.10 a timed call runs in a task of wait_for's, awaited by the call's own task
        or its worker; a call's own task is awaited by its worker."""
        if task is None:
            return ()
        chain = [task]
        caller = _timed_calls.get(task)
        if caller is not None:
            chain.append(caller)
        worker = self._callers.get(chain[-1])
        if worker is not None:
            chain.append(worker)
        return tuple(chain)

    def _own_tasks(self) -> tuple[asyncio.Task[Any], ...]:
        """The running task and, inside a background hook call, the tasks awaiting it."""
        return self._chain(asyncio.current_task())

    async def aclose(self) -> None:
        """Cancel running background hook calls and wait for them to finish.

        Events still queued for a background hook are dropped: counted in
        :attr:`HookHandle.dropped` and logged (one warning per hook); call
        :meth:`drain` first to deliver them. Later emits do not reach background
        hooks either (counted the same way); synchronous hooks still run. Safe to
        call more than once.

        Example:
            ```python
            await client.hooks.aclose()
            ```
        """
        self._closed = True
        for hook in self._hooks:
            # Cleared before the cancelling: a worker spared (the one calling us) stops
            # after its running call too. What it loses is counted and logged.
            if hook.background and hook.pending:
                count = len(hook.pending)
                hook.pending.clear()
                _dropping_at_close(hook, count)
        own = self._own_tasks()
        pending = [task for task in self._tasks_here() if task not in own]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


def _coerce_type(type: EventType | str) -> EventType:
    if isinstance(type, EventType):
        return type
    try:
        return EventType(type)
    except ValueError:
        raise InvalidArgumentError(f"unknown event type {type!r}") from None


def _parse_events(events: Iterable[EventType | str] | None) -> frozenset[EventType]:
    if events is None:
        return _ALL_EVENTS
    if isinstance(events, str):
        # A lone "set" (or EventType.SET, itself a str) means that one event, not its letters.
        events = (events,)
    try:
        values = list(events)
    except TypeError:
        raise InvalidArgumentError(
            f"events must be an iterable of EventType or str, not {type(events).__name__}"
        ) from None
    parsed: set[EventType] = set()
    for value in values:
        if isinstance(value, EventType):
            parsed.add(value)
        elif isinstance(value, str):
            try:
                parsed.add(EventType(value))
            except ValueError:
                valid = ", ".join(repr(member.value) for member in EventType)
                raise InvalidArgumentError(f"unknown event type {value!r}; expected one of {valid}") from None
        else:
            raise InvalidArgumentError(f"event types must be EventType or str, not {type(value).__name__}")
    return frozenset(parsed) if parsed else _ALL_EVENTS
