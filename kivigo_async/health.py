"""Background health watching: :class:`HealthWatcher`.

A :class:`HealthWatcher` runs ``client.health(*checks)`` at once when it is
entered and then every ``interval`` seconds in a background task, and keeps
the outcome as a :class:`HealthReport` with one of four
:class:`HealthStatus` values:

* ``UNKNOWN``: before the first check has completed.
* ``HEALTHY``: the last check passed within ``degraded_latency``.
* ``DEGRADED``: the backend answered, but the check took longer than
  ``degraded_latency``, or some (not all) of the extra ``checks`` failed.
* ``DOWN``: the backend probe failed, every extra check failed, or the whole
  check took longer than ``timeout``.

Listeners (``on_change`` and :meth:`HealthWatcher.add_listener`) and
``async for`` loops over the watcher see status *transitions* only, not every
check. Listeners are called in a task of the watcher's own, each call bounded
by ``listener_timeout``, so a slow one never holds up a check. While the
backend is down, checks back off exponentially (with jitter) up to
``max_backoff`` seconds apart, so a dead server is not hammered but is still
probed regularly.

Failures are logged on the ``kivigo_async.health`` logger; error texts come
from kivigo-async exceptions, which never carry passwords.

Example:
    ```python
    from kivigo_async import Client, HealthStatus, HealthWatcher

    async with Client(backend) as client, HealthWatcher(client, interval=5) as watcher:
        print(watcher.status)               # already checked: HEALTHY, DEGRADED or DOWN
        async for report in watcher:        # the current report, then each transition
            if report.status is HealthStatus.DOWN:
                print("backend down:", report.error)
    ```
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import random
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Any, Literal, TypeVar, Union

from ._singleflight import Interrupted, SingleFlight
from ._tasks import callable_name, cancel_requested, detached
from .client import Client, HealthCheck, run_health_check
from .errors import (
    ConfigurationError,
    HealthCheckError,
    InvalidArgumentError,
    KivigoError,
    OperationTimeoutError,
)

__all__ = ["HealthListener", "HealthReport", "HealthStatus", "HealthWatcher"]

_logger = logging.getLogger("kivigo_async.health")

T = TypeVar("T")

#: A function told about status transitions; plain or async. Its return value is ignored.
HealthListener = Callable[["HealthReport"], Union[Awaitable[None], None]]  # noqa: UP007

# Jitter only spreads probes out; it needs no cryptographic quality, and a private
# generator keeps tests that seed the global one from synchronising watchers.
_rng = random.Random()


class HealthStatus(str, Enum):
    """The health of a backend as last seen by a :class:`HealthWatcher`.

    Members compare equal to their string value: ``HealthStatus.DOWN == "down"``.
    """

    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DOWN = "down"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The outcome of the latest health check.

    Attributes:
        status: the status this check led to.
        latency: seconds the check took, or ``None`` when it failed outright
            (``DOWN``) or before the first check. A wait for the previous probe
            to finish its cleanup is not counted.
        error: ``"ExcType: message"`` of this check's failure (``DOWN``, or
            ``DEGRADED`` because an extra check failed), else ``None``.
        checked_at: ``time.time()`` when the check ended (``0.0`` before the first).
        consecutive_failures: how many checks in a row ended ``DOWN``.

    Example:
        ```python
        report = watcher.report
        return JSONResponse(report.to_dict(), status_code=200 if report.healthy else 503)
        ```
    """

    status: HealthStatus
    latency: float | None
    error: str | None
    checked_at: float
    consecutive_failures: int

    @property
    def healthy(self) -> bool:
        """Whether the backend is usable: ``HEALTHY`` or ``DEGRADED``."""
        return self.status is HealthStatus.HEALTHY or self.status is HealthStatus.DEGRADED

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict (for ``/readyz`` bodies and logs).

        Example:
            >>> HealthReport(HealthStatus.HEALTHY, 0.002, None, 1700000000.0, 0).to_dict()["status"]
            'healthy'
        """
        return {
            "status": self.status.value,
            "healthy": self.healthy,
            "latency": self.latency,
            "error": self.error,
            "checked_at": self.checked_at,
            "consecutive_failures": self.consecutive_failures,
        }


_INITIAL = HealthReport(HealthStatus.UNKNOWN, None, None, 0.0, 0)

#: How many status changes may wait for the listeners before the oldest are dropped.
_MAX_UNTOLD_CHANGES = 100

#: How many status changes an ``async for`` that is not reading keeps before dropping the oldest.
_MAX_UNREAD_CHANGES = 100


def _next_delay(interval: float, max_backoff: float, failures: int, rng: random.Random = _rng) -> float:
    """Seconds to wait before the next check, after ``failures`` consecutive ``DOWN`` checks.

    Not down: ``interval``. Down: ``min(interval * 2**(failures-1), max_backoff)``
    scaled by a random factor in ``[0.5, 1.0]`` (so many clients that lost the
    same server do not probe it in lockstep), and never below ``interval``.
    Hence the delay stays within ``[interval, max(interval, max_backoff)]``.
    """
    if failures <= 0:
        return interval
    # The exponent is capped so the power stays a float, however long the outage.
    ceiling = min(interval * 2.0 ** min(failures - 1, 60), max_backoff)
    return max(interval, ceiling * rng.uniform(0.5, 1.0))


def _positive(name: str, value: object, error: type[KivigoError] = ConfigurationError) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name} must be a number of seconds, not {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise error(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return seconds


class _TimedOut(Exception):
    """Raised by :func:`_within` when the time is up; ``task`` is the cancelled, still unfinished task."""

    def __init__(self, task: asyncio.Task[Any]) -> None:
        super().__init__()
        self.task = task


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # nobody else looks: keep the loop from reporting it as never retrieved


async def _cancel_and_wait(task: asyncio.Task[Any]) -> None:
    task.cancel()
    task.add_done_callback(_retrieve)
    await asyncio.wait({task})


def _abandon(task: asyncio.Task[Any]) -> None:
    task.cancel()
    task.add_done_callback(_retrieve)


async def _within(task: asyncio.Task[T], timeout: float) -> T:
    """Wait at most ``timeout`` seconds for ``task``, else cancel it and raise :class:`_TimedOut`.

    At the deadline, and when the caller is cancelled, the task is cancelled
    but not waited for: cleanup that runs on cancellation (closing a session,
    say) may take any time, and the caller was promised an answer within
    ``timeout``, or has given up. The caller keeps track of the task (the
    exception carries it at the deadline) and waits for it when it must; its
    outcome is retrieved, never reported.

    Unlike ``asyncio.wait_for`` before Python 3.12, a cancellation that arrives
    just as ``task`` finishes is never swallowed: a watcher being stopped must stop.
    A ``task`` cancelled from inside has failed (:class:`KivigoError`), on every
    Python version.
    """
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except BaseException:
        _abandon(task)
        raise
    if not done:
        _abandon(task)
        raise _TimedOut(task)
    if task.cancelled():  # not by us: our own cancellation comes through asyncio.wait
        raise KivigoError("cancelled from inside (it awaited something another task cancelled)")
    return task.result()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _log_delivery_failure(task: asyncio.Task[None]) -> None:
    # Nobody awaits this task for its result; a bug in it must not go unseen.
    if not task.cancelled() and task.exception() is not None:
        _logger.error("the health listener task failed", exc_info=task.exception())


class _Listener:
    __slots__ = ("fn",)

    def __init__(self, fn: HealthListener) -> None:
        self.fn = fn


class _Subscription:
    """One ``async for`` over a watcher: its own backlog, so every loop sees every transition.

    The backlog keeps the latest ``_MAX_UNREAD_CHANGES`` reports: a loop that
    stops reading while the status keeps changing must not make memory grow
    without bound. The oldest are dropped, never the most recent, and a report
    repeating the status last yielded is skipped, so the loop still sees
    changes only, ending on the current status.
    """

    def __init__(self, watcher: HealthWatcher) -> None:
        self._reports: deque[HealthReport] = deque([watcher.report])
        self._ended = watcher._state == "stopped"
        self._wakeup = asyncio.Event()
        self._yielded: HealthStatus | None = None
        self._behind = False
        if not self._ended:
            # Weakly held: a loop that breaks out and drops its iterator unsubscribes itself.
            watcher._subscriptions.add(self)

    def _push(self, report: HealthReport) -> None:
        if len(self._reports) >= _MAX_UNREAD_CHANGES:
            self._reports.popleft()
            if not self._behind:
                self._behind = True
                _logger.warning(
                    "an 'async for' over a health watcher fell %d status changes behind (it is not "
                    "reading): dropping the oldest until it catches up; it will still see the latest status",
                    _MAX_UNREAD_CHANGES,
                )
        self._reports.append(report)
        self._wakeup.set()

    def _end(self) -> None:
        self._ended = True
        self._wakeup.set()

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> HealthReport:
        while True:
            if self._reports:
                report = self._reports.popleft()
                if report.status is self._yielded:
                    continue  # the changes in between were dropped: no change for this loop
                self._yielded = report.status
                return report
            self._behind = False  # caught up
            if self._ended:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()


class HealthWatcher:
    """Watch a :class:`~kivigo_async.Client`'s health in a background task.

    Entering the watcher (``async with`` or :meth:`start`) runs the first check
    at once and waits for it, so :attr:`status` is meaningful straight away;
    a background task then checks again ``interval`` seconds after each check
    ends. Exiting (or :meth:`stop`) cancels and awaits that task; a watcher is
    used once and cannot be restarted.

    Status rules (one check = ``client.health(*checks)``, bounded by ``timeout``):

    * ``DOWN`` when the whole check exceeds ``timeout`` (the error is an
      :class:`~kivigo_async.errors.OperationTimeoutError`), when the backend
      probe fails, or when every extra check fails.
    * ``DEGRADED`` when the backend probe passes but only some of the extra
      checks fail, or when the check passes in more than ``degraded_latency``
      seconds.
    * ``HEALTHY`` otherwise.

    Backoff: after ``n`` consecutive ``DOWN`` checks the next one waits
    ``min(interval * 2**(n-1), max_backoff) * uniform(0.5, 1.0)`` seconds, but
    never less than ``interval``; so a down backend is probed at least every
    ``max_backoff`` seconds (every ``interval`` when ``max_backoff <= interval``).
    The first passing check returns to the normal ``interval``.

    A check that overruns ``timeout`` is cancelled and reported ``DOWN`` at
    once; its cancellation cleanup finishes in the background. A check whose
    :meth:`check_now` callers all gave up (were cancelled) is cancelled the
    same way, with no report: they return at once, and the status stays as it
    was. Until such a cleanup is over, no new probe is started: the next check
    waits for it (within its own ``timeout``, not counted in its latency) and
    is ``DOWN`` if it is still not done, so a hanging check never piles up
    copies of itself. :meth:`stop` waits for it to end.

    Listeners (``on_change`` first, then :meth:`add_listener` ones, in order)
    are called with the new :class:`HealthReport` on every status change,
    including the first result after ``UNKNOWN``. They may be plain or async
    functions. They run in a task of the watcher's own, one call at a time and
    in the order of the changes, so a slow listener never delays a check or
    :meth:`check_now`. An async listener still running after
    ``listener_timeout`` seconds is cancelled (and left running, with a
    warning, if it has not ended ``listener_timeout`` seconds later); one that
    raises or overruns is logged on ``kivigo_async.health`` and the others are
    still called. If the listeners fall more than 100 changes behind, the
    oldest are dropped (with a warning): they then hear the latest status
    rather than a stale history.
    :meth:`drain` waits until they have heard of every change so far.

    Args:
        client: the client to check.
        interval: seconds between the end of one check and the start of the next.
        timeout: upper bound in seconds on one check (backend probe and extra checks).
        degraded_latency: a passing check slower than this is ``DEGRADED``;
            ``None`` turns the latency rule off.
        max_backoff: the longest wait between checks while ``DOWN``.
        checks: extra checks, each an async function of the client that raises
            when unhealthy; they run concurrently with the backend probe.
        on_change: a listener, as with :meth:`add_listener`.
        listener_timeout: upper bound in seconds on one call of an async
            listener; it is then cancelled. :meth:`stop` also gives the listeners
            this long to hear of the changes already seen.

    Example:
        ```python
        async def search_index_ready(client: Client) -> None:
            if not await client.has_key("index:ready"):
                raise RuntimeError("search index not built")

        async def page_oncall(report: HealthReport) -> None:
            await pager.send(f"cache {report.status}")  # cancelled after listener_timeout

        async with HealthWatcher(
            client, interval=5, timeout=2, checks=[search_index_ready],
            on_change=page_oncall, listener_timeout=3,
        ) as watcher:
            if not watcher.healthy:
                ...
        ```
    """

    def __init__(
        self,
        client: Client,
        *,
        interval: float = 5.0,
        timeout: float = 2.0,
        degraded_latency: float | None = 0.5,
        max_backoff: float = 30.0,
        checks: Sequence[HealthCheck] = (),
        on_change: HealthListener | None = None,
        listener_timeout: float = 5.0,
    ) -> None:
        if not isinstance(client, Client):
            raise ConfigurationError(
                f"HealthWatcher needs a kivigo_async.Client, got {type(client).__name__}"
            )
        self._interval = _positive("interval", interval)
        self._timeout = _positive("timeout", timeout)
        self._degraded_latency = (
            None if degraded_latency is None else _positive("degraded_latency", degraded_latency)
        )
        self._max_backoff = _positive("max_backoff", max_backoff)
        self._listener_timeout = _positive("listener_timeout", listener_timeout)
        if isinstance(checks, (str, bytes)) or not isinstance(checks, Sequence):
            raise ConfigurationError(f"checks must be a sequence of callables, not {type(checks).__name__}")
        for check in checks:
            if not callable(check):
                raise ConfigurationError(f"every health check must be callable, got {type(check).__name__}")
        if on_change is not None and not callable(on_change):
            raise ConfigurationError(f"on_change must be callable, got {type(on_change).__name__}")
        self._client = client
        self._checks: tuple[HealthCheck, ...] = tuple(checks)
        self._listeners: list[_Listener] = [] if on_change is None else [_Listener(on_change)]
        self._report = _INITIAL
        self._last_error: BaseException | None = None
        self._state: Literal["new", "running", "stopped"] = "new"
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        # The one shutdown every stop() waits for, and when it has stopped the watcher
        # (what a listener calling stop() waits for: the rest waits for the listeners).
        self._shutdown: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._lock = asyncio.Lock()
        # The check under way, shared by every check_now() call made meanwhile; the
        # last caller to give up stops it, as if it ran in its own task, and waits
        # for it to end. That is at once: like one at its deadline, the probe is
        # cancelled and left to finish its cleanup (see _probe_task), so the check
        # lets go of the lock, and the watcher, straight away.
        self._check_flight: SingleFlight[HealthReport] = SingleFlight(wait_for_cleanup=True)
        # The latest probe. Only one runs at a time, so between checks it is either
        # done or was cancelled (at its deadline, or when its check's callers all gave
        # up) and may still be running its cleanup: the next check waits for it before
        # starting another, and stop() waits for it.
        self._probe_task: asyncio.Task[None] | None = None
        self._subscriptions: weakref.WeakSet[_Subscription] = weakref.WeakSet()
        # Status changes the listeners have not heard of yet, and the task telling them.
        self._changes: deque[HealthReport] = deque()
        self._delivery: asyncio.Task[None] | None = None
        self._listener_call: asyncio.Future[Any] | None = None
        # Listener calls that ignored their cancellation, kept until they end.
        self._left_behind: set[asyncio.Future[Any]] = set()
        # The last status the listeners were told: after dropped changes, the next
        # one left may repeat it, and listeners are promised changes only.
        self._told = HealthStatus.UNKNOWN
        self._behind = False

    def __repr__(self) -> str:
        return (
            f"HealthWatcher(client={self._client!r}, status={self._report.status.value!r}, "
            f"interval={self._interval}, state={self._state!r})"
        )

    # -- state -----------------------------------------------------------

    @property
    def report(self) -> HealthReport:
        """The latest :class:`HealthReport`."""
        return self._report

    @property
    def status(self) -> HealthStatus:
        """The latest :class:`HealthStatus` (``UNKNOWN`` before the first check)."""
        return self._report.status

    @property
    def healthy(self) -> bool:
        """Whether the backend is usable: ``HEALTHY`` or ``DEGRADED``."""
        return self._report.healthy

    @property
    def latency(self) -> float | None:
        """Seconds the latest check took; ``None`` if it failed or none ran yet."""
        return self._report.latency

    @property
    def last_error(self) -> BaseException | None:
        """The exception behind the latest check's failure; ``None`` when it passed."""
        return self._last_error

    @property
    def running(self) -> bool:
        """Whether the background task is running (entered and not yet stopped)."""
        return self._state == "running"

    # -- lifecycle -------------------------------------------------------

    async def __aenter__(self) -> HealthWatcher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Run the first check now, then keep checking in a background task.

        Raises :class:`~kivigo_async.errors.KivigoError` if the watcher was
        already started (a watcher runs once; create a new one instead).

        Example:
            ```python
            watcher = HealthWatcher(client, interval=10)
            await watcher.start()
            try:
                ...
            finally:
                await watcher.stop()
            ```
        """
        if self._stopping or self._state == "stopped":
            raise KivigoError("this HealthWatcher was stopped and cannot be restarted; create a new one")
        if self._state == "running":
            raise KivigoError("this HealthWatcher is already running; it can be entered only once")
        self._state = "running"
        try:
            await self.check_now()
        except BaseException:
            # Cancelled while entering: no 'async with' exit will come, so stop here,
            # waiting (as stop() does) for the first probe's cleanup.
            await self.stop()
            raise
        if not self._stopping:  # stop() may have been called during the first check
            self._task = asyncio.create_task(self._run(), name="kivigo-health-watcher")

    async def stop(self) -> None:
        """Cancel the background task and wait for it; end every ``async for``.

        Waits for the latest probe to end too: one cancelled (at its deadline,
        or because every caller of its :meth:`check_now` gave up) has only its
        cleanup left; one still checking for a :meth:`check_now` caller ends
        within ``timeout``. Listeners then get up to ``listener_timeout``
        seconds to hear of the status changes already seen; after that their
        task is cancelled and what is left untold is dropped. The listener then
        running gets ``listener_timeout`` seconds more to end; one that ignores
        its cancellation is left running, with a warning naming it, so the
        listeners hold up this call by at most twice ``listener_timeout``.

        The stopping is done once, for every caller: concurrent calls all
        return when it is over, and a call that is cancelled (a shutdown timeout
        around it, say) raises ``CancelledError`` while the stopping goes on, so
        that a later call waits for its end. Called from a listener, it returns
        once the watcher has stopped, without waiting for the listeners (it
        would wait for itself). Safe to call more than once, and before
        :meth:`start` (the watcher then never runs).

        Example:
            ```python
            await watcher.stop()
            ```
        """
        shutdown = self._shutdown
        # Cancelled: only by something cancelling every task (asyncio.run() ending, say): begin again.
        if shutdown is None or shutdown.cancelled():
            self._stopping = True
            if self._task is not None:
                self._task.cancel()  # with the flag, in one step: the loop ends by its cancellation
            shutdown = self._shutdown = detached(self._shut_down(), "kivigo-health-stop")
        if self._inside_listener(asyncio.current_task()):
            # The shutdown ends by waiting for the listeners' task, which ends once
            # this listener returns and the changes already queued are told.
            await self._stopped.wait()
            return
        # asyncio.wait, unlike awaiting the task, leaves it running when this caller is cancelled.
        await asyncio.wait({shutdown})
        shutdown.result()

    async def _shut_down(self) -> None:
        try:
            task = self._task
            if task is not None:
                await asyncio.wait({task})  # cancelled by stop()
                if not task.cancelled() and task.exception() is not None:
                    _logger.error("the health watcher task failed", exc_info=task.exception())
            # Read once the task has ended: the check it left (if no other caller
            # wanted it) has ended too, its probe cancelled and now this one.
            probe = self._probe_task
            if probe is not None:
                await asyncio.wait({probe})
        finally:
            self._finish()
        await self._end_delivery()

    async def _end_delivery(self) -> None:
        # After _finish(): no change is queued any more, so no new task can start meanwhile.
        delivery = self._delivery
        if delivery is None or delivery.done():
            return
        try:
            await asyncio.wait({delivery}, timeout=self._listener_timeout)
        finally:
            if not delivery.done():
                self._changes.clear()
                await _cancel_and_wait(delivery)

    def _inside_listener(self, current: asyncio.Task[Any] | None) -> bool:
        return current is not None and (current is self._delivery or current is self._listener_call)

    def _finish(self) -> None:
        self._state = "stopped"
        for subscription in list(self._subscriptions):
            subscription._end()
        self._subscriptions.clear()
        self._stopped.set()

    async def _run(self) -> None:
        # The flag backs up cancellation, which user code (a check or a listener)
        # could swallow; either way the loop ends after stop().
        while not self._stopping:
            failures = self._report.consecutive_failures
            await asyncio.sleep(_next_delay(self._interval, self._max_backoff, failures))
            if self._stopping:
                return
            try:
                await self.check_now()
            except Exception:  # a bug here must not end the watching silently
                _logger.exception("the health check loop failed; trying again")
            except asyncio.CancelledError:
                # stop(), the owner cancelling the task, or asyncio.run() shutting down
                # end the loop; a cancellation nobody asked this task for does not.
                if self._stopping or cancel_requested() is not False:
                    raise
                _logger.exception("the health check loop was cancelled from inside; trying again")

    # -- checking --------------------------------------------------------

    async def check_now(self) -> HealthReport:
        """Run one check now, update the state and queue a change for the listeners.

        The check takes at most about ``timeout`` seconds, however long the
        listeners take: they are called in the background (see :meth:`drain`).
        Works whether or not the watcher is running. A call made while a check
        is under way (another caller's, or the watcher's own) waits for that
        check and returns its report, so that a hundred readiness probes against
        a hung server all answer within ``timeout``, not one after another.
        A caller that gives up (is cancelled, by its own ``asyncio.wait_for``
        say) leaves at once; when the last one has, the check is cancelled as
        if at its deadline, without updating :attr:`report`, and the next
        check waits for its cleanup. After :meth:`stop` it still checks and
        updates :attr:`report`, but calls no listener.

        Example:
            ```python
            report = await watcher.check_now()
            print(report.status, report.latency)
            ```
        """
        while True:
            try:
                return await self._check_flight.do("check", self._check_now)
            except Interrupted:
                continue  # cancelled from elsewhere, not by a caller (one still waited): check again

    async def _check_now(self) -> HealthReport:
        async with self._lock:
            report, error = await self._check()
            previous = self._report
            self._report = report
            self._last_error = error
            if report.status is not previous.status:
                self._log_transition(previous, report)
                for subscription in list(self._subscriptions):
                    subscription._push(report)
                # Queued under the lock, so the listeners hear of changes in order.
                self._queue_change(report)
            return report

    async def _check(self) -> tuple[HealthReport, BaseException | None]:
        failed_extras = 0

        def counting(check: HealthCheck) -> HealthCheck:
            async def run(client: Client) -> object:
                nonlocal failed_extras
                try:
                    return await run_health_check(check, client)
                except Exception:
                    failed_extras += 1
                    raise

            return run

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        if not await self._previous_probe_ended(deadline):
            return self._outcome(
                HealthStatus.DOWN,
                None,
                OperationTimeoutError(
                    f"the health check took longer than {self._timeout:g} s "
                    "(the previous one, cancelled, is still finishing)"
                ),
            )
        # Timed from here: how long the previous probe's cleanup took says nothing of the backend now.
        started = time.perf_counter()
        status = HealthStatus.HEALTHY
        error: BaseException | None = None
        latency: float | None = None
        try:
            await self._probe(counting, deadline)
        except HealthCheckError as exc:
            error = exc
            backend_passed = len(exc.errors) == failed_extras
            if backend_passed and failed_extras < len(self._checks):
                status = HealthStatus.DEGRADED
                latency = time.perf_counter() - started
            else:
                status = HealthStatus.DOWN
        except _TimedOut:
            error = OperationTimeoutError(f"the health check took longer than {self._timeout:g} s")
            status = HealthStatus.DOWN
        except Exception as exc:  # a backend breaking its contract is still "down"
            error = exc
            status = HealthStatus.DOWN
        else:
            latency = time.perf_counter() - started
            if self._degraded_latency is not None and latency > self._degraded_latency:
                status = HealthStatus.DEGRADED
        return self._outcome(status, latency, error)

    def _outcome(
        self, status: HealthStatus, latency: float | None, error: BaseException | None
    ) -> tuple[HealthReport, BaseException | None]:
        failures = self._report.consecutive_failures + 1 if status is HealthStatus.DOWN else 0
        report = HealthReport(
            status=status,
            latency=latency,
            error=None if error is None else _describe(error),
            checked_at=time.time(),
            consecutive_failures=failures,
        )
        return report, error

    async def _previous_probe_ended(self, deadline: float) -> bool:
        """Wait until ``deadline`` for the previous probe to end; whether it has.

        A probe is never started while a cancelled one is still finishing: a
        backend or check that hangs would otherwise gain one more stuck task per check.
        """
        previous = self._probe_task
        if previous is None or previous.done():
            return True
        await asyncio.wait({previous}, timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
        return previous.done()

    async def _probe(self, counting: Callable[[HealthCheck], HealthCheck], deadline: float) -> None:
        """Run ``client.health(...)`` until ``deadline``; raise :class:`_TimedOut` when it is up.

        At the deadline, or when the check is cancelled (every caller gave up,
        or stop()), the probe is cancelled and left to finish its cleanup as
        ``_probe_task``.
        """
        # The coroutine is made only now: one never started would be reported as never awaited.
        probe = asyncio.create_task(self._client.health(*(counting(check) for check in self._checks)))
        self._probe_task = probe
        await _within(probe, max(0.0, deadline - asyncio.get_running_loop().time()))

    def _log_transition(self, previous: HealthReport, report: HealthReport) -> None:
        if report.status is HealthStatus.DOWN:
            _logger.warning("backend health: %s -> down (%s)", previous.status, report.error)
        elif report.status is HealthStatus.DEGRADED:
            _logger.warning(
                "backend health: %s -> degraded (latency %.3f s%s)",
                previous.status,
                report.latency or 0.0,
                f"; {report.error}" if report.error else "",
            )
        else:
            _logger.info("backend health: %s -> %s", previous.status, report.status)

    def _queue_change(self, report: HealthReport) -> None:
        changes = self._changes
        if self._state == "stopped" or (not changes and not self._listeners):
            # After stop() no task of the watcher's may start: nothing would end it.
            self._told = report.status  # nobody to tell, and no task to start
            return
        if len(changes) >= _MAX_UNTOLD_CHANGES:
            changes.popleft()
            if not self._behind:
                self._behind = True
                _logger.warning(
                    "health listeners fell %d status changes behind (one is slow): dropping the "
                    "oldest until they catch up; they will still hear the latest status",
                    _MAX_UNTOLD_CHANGES,
                )
        changes.append(report)
        # done(): a task cancelled before it started never ran its cleanup.
        if self._delivery is None or self._delivery.done():
            self._delivery = asyncio.create_task(self._deliver(), name="kivigo-health-listeners")
            self._delivery.add_done_callback(_log_delivery_failure)

    async def _deliver(self) -> None:
        """Tell the listeners of the queued changes, oldest first, then end."""
        changes = self._changes
        try:
            while changes:
                report = changes.popleft()
                if report.status is self._told:
                    continue  # the changes in between were dropped: nothing changed for the listeners
                self._told = report.status
                for entry in list(self._listeners):
                    # Removed while an earlier listener was being called: it must not hear of this change.
                    if entry in self._listeners:
                        await self._call_listener(entry.fn, report)
            self._behind = False  # caught up
        finally:
            if self._delivery is asyncio.current_task():
                self._delivery = None

    async def _call_listener(self, fn: HealthListener, report: HealthReport) -> None:
        name = callable_name(fn)
        try:
            result = fn(report)
        except Exception:
            _logger.exception("health listener %s failed on the change to %s", name, report.status)
            return
        except asyncio.CancelledError:
            if cancel_requested() is not False:
                raise
            _logger.exception(
                "health listener %s was cancelled from inside on the change to %s", name, report.status
            )
            return
        if not inspect.isawaitable(result):
            return
        # A task of its own, so that the deadline below is the same on every Python
        # version and a listener cancelled from inside can be told from a stop().
        call = asyncio.ensure_future(result)
        self._listener_call = call
        try:
            try:
                done, _ = await asyncio.wait({call}, timeout=self._listener_timeout)
            except BaseException:  # the watcher stopping: the call ends with it
                await self._end_call(call, name, report)
                raise
            if not done:
                _logger.warning(
                    "health listener %s took longer than %g s on the change to %s: cancelling it",
                    name,
                    self._listener_timeout,
                    report.status,
                )
                await self._end_call(call, name, report)
                return
        finally:
            self._listener_call = None
        if call.cancelled():  # not by us: it awaited something another task cancelled
            _logger.error(
                "health listener %s was cancelled from inside on the change to %s", name, report.status
            )
        elif call.exception() is not None:
            _logger.error(
                "health listener %s failed on the change to %s",
                name,
                report.status,
                exc_info=call.exception(),
            )

    async def _end_call(self, call: asyncio.Future[Any], name: str, report: HealthReport) -> None:
        """Cancel a listener call and wait up to ``listener_timeout`` for it to end.

        Waited for, so that listeners still run one at a time; but a listener
        that ignores its cancellation (catches ``CancelledError`` and carries
        on) is then left behind, so that it holds up neither the other
        listeners nor :meth:`stop`. Interrupted (by :meth:`stop`), it leaves
        the call behind at once.
        """
        if call.done():
            return
        call.cancel()
        try:
            await asyncio.wait({call}, timeout=self._listener_timeout)
        finally:
            if not call.done():
                self._leave_behind(call, name, report)

    def _leave_behind(self, call: asyncio.Future[Any], name: str, report: HealthReport) -> None:
        _logger.warning(
            "health listener %s did not end within %g s of being cancelled on the change to %s "
            "(it ignores cancellation): leaving it running",
            name,
            self._listener_timeout,
            report.status,
        )
        # The loop holds tasks weakly: keep this one until it ends, and never report its outcome.
        self._left_behind.add(call)
        call.add_done_callback(self._left_behind.discard)
        call.add_done_callback(_retrieve)

    async def drain(self) -> None:
        """Wait until the listeners have been called for every status change so far.

        Each call is bounded by ``listener_timeout``. Called from a listener,
        it returns at once (it would wait for itself).

        Example:
            ```python
            report = await watcher.check_now()
            await watcher.drain()   # on_change and the other listeners have seen it
            ```
        """
        current = asyncio.current_task()
        while True:
            delivery = self._delivery
            if delivery is None or delivery.done() or self._inside_listener(current):
                return
            await asyncio.wait({delivery})

    # -- listeners and iteration -----------------------------------------

    def add_listener(self, fn: HealthListener) -> Callable[[], None]:
        """Call ``fn(report)`` (plain or async) on every status change; return a remover.

        Example:
            ```python
            async def page_oncall(report: HealthReport) -> None:
                if report.status is HealthStatus.DOWN:
                    await pager.send(f"cache down: {report.error}")

            remove = watcher.add_listener(page_oncall)
            ...
            remove()  # safe to call twice
            ```
        """
        if not callable(fn):
            raise InvalidArgumentError(f"a health listener must be callable, got {type(fn).__name__}")
        # One entry object per registration (compared by identity): each remover takes
        # out exactly its own, even when the same function was added twice.
        entry = _Listener(fn)
        self._listeners.append(entry)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(entry)

        return remove

    def __aiter__(self) -> AsyncIterator[HealthReport]:
        """Yield the current report, then one report per status change, until the watcher stops.

        Every ``async for`` gets every change, however many run at once. One
        that stops reading keeps only the latest 100 changes (with a warning):
        the most recent status is never dropped, and a report repeating the
        status it saw last is skipped.

        Example:
            ```python
            async for report in watcher:
                metrics.gauge("cache_up", 1 if report.healthy else 0)
            ```
        """
        return _Subscription(self)

    async def wait_for(self, status: HealthStatus | str, timeout: float) -> HealthReport:
        """Wait until the status is ``status`` and return that report.

        Returns at once if it already is. Raises
        :class:`~kivigo_async.errors.OperationTimeoutError` after ``timeout``
        seconds, and :class:`~kivigo_async.errors.KivigoError` if the watcher
        stops first.

        Example:
            ```python
            await watcher.wait_for(HealthStatus.HEALTHY, timeout=30)   # a readiness gate
            ```
        """
        try:
            wanted = HealthStatus(status)
        except ValueError:
            raise InvalidArgumentError(
                f"unknown health status {status!r}; expected one of {[s.value for s in HealthStatus]}"
            ) from None
        seconds = _positive("timeout", timeout, InvalidArgumentError)
        subscription = _Subscription(self)

        async def first_match() -> HealthReport:
            async for report in subscription:
                if report.status is wanted:
                    return report
            raise KivigoError(f"the health watcher stopped before the status became {wanted}")

        matching = asyncio.create_task(first_match())
        try:
            return await _within(matching, seconds)
        except _TimedOut:
            raise OperationTimeoutError(
                f"the health status did not become {wanted} within {seconds:g} s (it is {self.status})"
            ) from None
        finally:
            if not matching.done():
                # Cancelled by _within, and only waiting on the subscription: it ends at once.
                await asyncio.wait({matching})
