"""Tests of kivigo_async.health: HealthWatcher on real servers and on the memory backend."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import itertools
import json
import logging
import random
import time
from typing import TYPE_CHECKING, Any

import pytest
from conftest import eventually, redis_options

from kivigo_async import Client, HealthReport, HealthStatus, HealthWatcher
from kivigo_async.backends.memory import MemoryBackend
from kivigo_async.backends.redis import RedisBackend
from kivigo_async.errors import (
    ConfigurationError,
    HealthCheckError,
    InvalidArgumentError,
    KivigoError,
    OperationTimeoutError,
)
from kivigo_async.health import _next_delay

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from kivigo_async.testing.pytest_plugin import ServerFactory
    from kivigo_async.testing.servers import RedisServer

LOGGER = "kivigo_async.health"
WAIT = 30.0  # generous bound on anything that should take well under a second

HEALTHY, DEGRADED, DOWN = HealthStatus.HEALTHY, HealthStatus.DEGRADED, HealthStatus.DOWN


def fast_failing_backend(server: RedisServer) -> RedisBackend:
    """A backend that gives up quickly on a dead server."""
    # Quick, yet slack enough that a healthy server on a loaded machine is not taken for down.
    return RedisBackend(redis_options(server, max_retries=0, dial_timeout=2.0, read_timeout=2.0))


class Switch:
    """An extra health check that passes or fails on demand."""

    def __init__(self) -> None:
        self.ok = True
        self.calls = 0

    async def __call__(self, client: Client) -> None:
        self.calls += 1
        if not self.ok:
            raise RuntimeError("switched off")


async def passing(client: Client) -> None:
    return None


@pytest.fixture
async def valkey_client(valkey_server: RedisServer) -> AsyncIterator[Client]:
    async with Client(fast_failing_backend(valkey_server)) as client:
        yield client


@pytest.fixture
async def memory_client() -> AsyncIterator[Client]:
    async with Client(MemoryBackend()) as client:
        yield client


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Collect what the loop reports ("Task was destroyed but it is pending", ...)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(previous)


def watcher_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "kivigo-health-watcher"]


# -- first check and reports -------------------------------------------------


@pytest.mark.server
async def test_healthy_right_after_enter(valkey_client: Client) -> None:
    watcher = HealthWatcher(valkey_client, interval=60, degraded_latency=10)
    assert watcher.status is HealthStatus.UNKNOWN
    assert watcher.report.checked_at == 0.0
    before = time.time()
    async with watcher:
        # interval=60: only the check made on entering can have set this.
        assert watcher.status is HEALTHY
        assert watcher.healthy
        assert watcher.last_error is None
        assert watcher.latency is not None
        assert watcher.latency >= 0
        report = watcher.report
        assert report.error is None
        assert report.consecutive_failures == 0
        assert report.checked_at >= before
        assert watcher.running
    assert not watcher.running
    assert watcher_tasks() == []


def test_report_to_dict_is_json_ready() -> None:
    report = HealthReport(DOWN, None, "BackendUnavailableError: refused", 1700000000.5, 3)
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == {
        "status": "down",
        "healthy": False,
        "latency": None,
        "error": "BackendUnavailableError: refused",
        "checked_at": 1700000000.5,
        "consecutive_failures": 3,
    }
    assert HealthReport(DEGRADED, 0.7, None, 0.0, 0).healthy
    assert str(HealthStatus.DEGRADED) == "degraded"
    as_text: str = HealthStatus.DOWN
    assert as_text == "down"


# -- transitions on a real server that dies and comes back -------------------


@pytest.mark.server
async def test_kill_and_restart_is_seen_by_iterators_and_listeners(
    redis_server_factory: ServerFactory,
) -> None:
    server = redis_server_factory("valkey", "password")
    assert server.password
    sync_seen: list[HealthStatus] = []
    async_seen: list[HealthStatus] = []

    async def async_listener(report: HealthReport) -> None:
        await asyncio.sleep(0)
        async_seen.append(report.status)

    async with Client(fast_failing_backend(server)) as client:
        watcher = HealthWatcher(
            client,
            interval=0.05,
            timeout=5,
            max_backoff=0.2,
            degraded_latency=None,
            on_change=lambda report: sync_seen.append(report.status),
        )
        watcher.add_listener(async_listener)
        async with watcher:
            # Subscribe now, while healthy, rather than whenever the task first runs.
            iterator = watcher.__aiter__()

            async def consume() -> list[HealthStatus]:
                statuses: list[HealthStatus] = []
                async for report in iterator:
                    statuses.append(report.status)
                    if len(statuses) == 3:
                        break
                return statuses

            consumer = asyncio.create_task(consume())
            assert watcher.status is HEALTHY

            server.kill()
            down = await watcher.wait_for(DOWN, WAIT)
            assert down.latency is None
            assert down.consecutive_failures >= 1
            assert down.error is not None
            assert down.error.startswith("HealthCheckError: ")
            assert isinstance(watcher.last_error, HealthCheckError)
            assert server.password not in json.dumps(down.to_dict())
            assert not watcher.healthy

            await asyncio.to_thread(server.restart)
            up = await watcher.wait_for(HEALTHY, WAIT)
            assert up.error is None
            assert up.consecutive_failures == 0
            assert watcher.last_error is None

            assert await asyncio.wait_for(consumer, WAIT) == [HEALTHY, DOWN, HEALTHY]
        assert sync_seen == [HEALTHY, DOWN, HEALTHY]
        assert async_seen == [HEALTHY, DOWN, HEALTHY]


# -- degraded and timeouts -----------------------------------------------------


@pytest.mark.server
async def test_slow_check_is_degraded(valkey_client: Client) -> None:
    async def slow(client: Client) -> None:
        await asyncio.sleep(0.3)

    async with HealthWatcher(
        valkey_client, interval=60, timeout=10, degraded_latency=0.1, checks=[slow]
    ) as watcher:
        assert watcher.status is DEGRADED
        assert watcher.healthy
        assert watcher.report.error is None
        assert watcher.latency is not None
        assert watcher.latency >= 0.25


@pytest.mark.server
async def test_check_slower_than_timeout_is_down(valkey_client: Client) -> None:
    cancelled = asyncio.Event()

    async def stuck(client: Client) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with HealthWatcher(valkey_client, interval=60, timeout=0.2, checks=[stuck]) as watcher:
        assert watcher.status is DOWN
        assert isinstance(watcher.last_error, OperationTimeoutError)
        assert watcher.report.error is not None
        assert watcher.report.error.startswith("OperationTimeoutError: ")
        assert "0.2 s" in watcher.report.error
        assert watcher.latency is None
        # The abandoned check was cancelled, not left running.
        await asyncio.wait_for(cancelled.wait(), WAIT)


class SlowToCancel:
    """An extra check that hangs, and whose cleanup on cancellation waits for ``cleanup_may_end``.

    It passes at once while ``hang`` is false; ``entered`` is set once a call hangs.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.hang = True
        self.entered = asyncio.Event()
        self.cleanup_may_end = asyncio.Event()
        self.cleaned_up = asyncio.Event()

    async def __call__(self, client: Client) -> None:
        self.calls += 1
        if not self.hang:
            return
        self.entered.set()
        try:
            await asyncio.sleep(60)  # the dependency hangs
        finally:
            # Graceful cleanup on cancellation, like closing an HTTP session.
            await asyncio.wait_for(self.cleanup_may_end.wait(), WAIT)
            self.cleaned_up.set()


@contextlib.asynccontextmanager
async def watching_slow_to_cancel(
    client: Client, timeout: float, loop_errors: list[dict[str, Any]], **options: Any
) -> AsyncIterator[tuple[HealthWatcher, SlowToCancel]]:
    """A watcher whose extra check is slow to cancel; stopped on exit, leaving no task or loop error."""
    before = asyncio.all_tasks()
    check = SlowToCancel()
    watcher = HealthWatcher(client, interval=60, timeout=timeout, checks=[check], **options)
    try:
        yield watcher, check
    finally:
        check.cleanup_may_end.set()
        await asyncio.wait_for(watcher.stop(), WAIT)
    assert asyncio.all_tasks() == before
    assert loop_errors == []


@pytest.mark.server
async def test_a_check_slow_to_cancel_is_down_at_its_deadline_and_not_started_twice(
    valkey_client: Client, loop_errors: list[dict[str, Any]]
) -> None:
    async with watching_slow_to_cancel(valkey_client, 0.3, loop_errors) as (watcher, check):
        started = time.perf_counter()
        # Far below the time the cleanup would take, yet ample for a 0.3 s deadline.
        await asyncio.wait_for(watcher.start(), 10)
        assert time.perf_counter() - started < 5
        assert watcher.status is DOWN
        assert isinstance(watcher.last_error, OperationTimeoutError)
        assert watcher.report.error == "OperationTimeoutError: the health check took longer than 0.3 s"

        # The abandoned check is still cleaning up: no second copy of it is started,
        # and the answer still comes within about the timeout.
        started = time.perf_counter()
        report = await asyncio.wait_for(watcher.check_now(), 10)
        assert time.perf_counter() - started < 5
        assert report.status is DOWN
        assert report.error is not None
        assert "still finishing" in report.error
        assert report.consecutive_failures == 2
        assert check.calls == 1

        check.cleanup_may_end.set()
        await asyncio.wait_for(check.cleaned_up.wait(), WAIT)
        report = await asyncio.wait_for(watcher.check_now(), 10)
        assert check.calls == 2  # finished: checks run again
        assert report.error == "OperationTimeoutError: the health check took longer than 0.3 s"


async def test_stop_waits_for_a_check_still_finishing_after_its_deadline(
    memory_client: Client, loop_errors: list[dict[str, Any]]
) -> None:
    async with watching_slow_to_cancel(memory_client, 0.2, loop_errors) as (watcher, check):
        await asyncio.wait_for(watcher.start(), 10)
        assert watcher.status is DOWN
        stopping = asyncio.create_task(watcher.stop())
        await asyncio.sleep(0.1)
        assert not stopping.done()  # the cancelled check has not finished its cleanup
        check.cleanup_may_end.set()
        await asyncio.wait_for(stopping, WAIT)
        assert check.cleaned_up.is_set()


async def give_up_on_a_check(watcher: HealthWatcher, check: SlowToCancel) -> None:
    """Start a check_now() that hangs in ``check``, then cancel its caller; fail unless it leaves at once."""
    caller = asyncio.create_task(watcher.check_now())
    await asyncio.wait_for(check.entered.wait(), WAIT)
    caller.cancel()
    # Far longer than leaving takes, and the cleanup cannot end before the test lets it.
    await asyncio.wait({caller}, timeout=5)
    assert caller.done(), "the caller that gave up waited for the check's cleanup"
    assert caller.cancelled()
    assert not check.cleaned_up.is_set()


async def test_a_caller_giving_up_neither_waits_for_the_cleanup_nor_holds_up_the_next_check(
    memory_client: Client, loop_errors: list[dict[str, Any]]
) -> None:
    # The deadline is far off: the caller gives up (a readiness handler's own timeout, say), not the watcher.
    async with watching_slow_to_cancel(memory_client, WAIT, loop_errors) as (watcher, check):
        await give_up_on_a_check(watcher, check)
        # The abandoned check let go of the watcher: the next check (or the background
        # loop's) waits for the cleanup within its own timeout, not for a lock.
        assert not watcher._lock.locked()
        check.hang = False
        second = asyncio.create_task(watcher.check_now())
        await asyncio.sleep(0.1)
        assert not second.done()
        assert check.calls == 1  # no second probe while the first is still finishing
        check.cleanup_may_end.set()
        report = await asyncio.wait_for(second, WAIT)
        assert report.healthy
        assert check.calls == 2
        assert check.cleaned_up.is_set()


async def test_stop_waits_for_the_cleanup_of_a_check_its_caller_gave_up(
    memory_client: Client, loop_errors: list[dict[str, Any]]
) -> None:
    async with watching_slow_to_cancel(memory_client, WAIT, loop_errors) as (watcher, check):
        await give_up_on_a_check(watcher, check)
        stopping = asyncio.create_task(watcher.stop())
        await asyncio.sleep(0.1)
        assert not stopping.done()
        check.cleanup_may_end.set()
        await asyncio.wait_for(stopping, WAIT)
        assert check.cleaned_up.is_set()


async def test_latency_leaves_out_the_wait_for_the_previous_probe(
    memory_client: Client, loop_errors: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with watching_slow_to_cancel(memory_client, WAIT, loop_errors, degraded_latency=0.5) as (
        watcher,
        check,
    ):
        await give_up_on_a_check(watcher, check)
        check.hang = False  # the dependency answers at once from now on
        second = asyncio.create_task(watcher.check_now())
        await asyncio.sleep(0.7)  # at least this long waiting for the previous probe's cleanup
        assert not second.done()
        check.cleanup_may_end.set()
        report = await asyncio.wait_for(second, WAIT)
    assert report.status is HEALTHY
    assert report.latency is not None
    assert report.latency < 0.5
    assert not [r for r in caplog.records if r.name == LOGGER and "degraded" in r.getMessage()]


@pytest.mark.server
async def test_some_extra_checks_failing_is_degraded(valkey_client: Client) -> None:
    broken = Switch()
    broken.ok = False
    async with HealthWatcher(valkey_client, interval=60, degraded_latency=10, checks=[passing, broken]) as w:
        assert w.status is DEGRADED
        assert w.report.error is not None
        assert "RuntimeError: switched off" in w.report.error
        assert w.latency is not None
        assert w.report.consecutive_failures == 0


@pytest.mark.server
async def test_every_extra_check_failing_is_down(valkey_client: Client) -> None:
    broken = Switch()
    broken.ok = False
    async with HealthWatcher(valkey_client, interval=60, checks=[broken]) as w:
        assert w.status is DOWN
        assert w.report.consecutive_failures == 1
        assert isinstance(w.last_error, HealthCheckError)
        assert [type(e) for e in w.last_error.errors] == [RuntimeError]


@pytest.mark.server
async def test_dead_backend_with_passing_extra_checks_is_down(redis_server_factory: ServerFactory) -> None:
    server = redis_server_factory("valkey")
    async with Client(fast_failing_backend(server)) as client:
        server.kill()
        async with HealthWatcher(client, interval=60, checks=[passing]) as w:
            assert w.status is DOWN
            assert w.report.error is not None
            assert "BackendUnavailableError" in w.report.error


async def test_plain_function_checks(memory_client: Client) -> None:
    state = {"ok": True}

    def flag_store(client: Client) -> None:
        if not state["ok"]:
            raise RuntimeError("flag store unreachable")

    async with HealthWatcher(memory_client, interval=60, degraded_latency=10, checks=[flag_store]) as w:
        assert w.status is HEALTHY
        state["ok"] = False
        report = await w.check_now()
        assert report.status is DOWN
        assert report.error is not None
        assert "RuntimeError: flag store unreachable" in report.error


async def test_a_check_cancelled_from_inside_fails_and_the_watching_goes_on(memory_client: Client) -> None:
    # A CancelledError the watcher was not asked for (the check awaited a future that
    # something else cancelled) is a failed check, not the end of the watching.
    runs = 0

    async def shared_lookup(client: Client) -> None:
        nonlocal runs
        runs += 1
        if runs == 2:
            abandoned = asyncio.get_running_loop().create_future()
            abandoned.cancel()
            await abandoned

    watcher = HealthWatcher(memory_client, interval=0.05, degraded_latency=None, checks=[shared_lookup])
    async with watcher as w:
        report = await w.wait_for(DOWN, WAIT)
        assert report.error is not None
        assert "cancelled from inside" in report.error
        assert (await w.wait_for(HEALTHY, WAIT)).status is HEALTHY
        assert w.running
        assert runs >= 3


async def test_a_backend_probe_cancelled_from_inside_does_not_end_the_watching() -> None:
    fourth_probe = asyncio.Event()

    class FlakyProbe(MemoryBackend):
        probes = 0

        async def health(self) -> None:
            self.probes += 1
            if self.probes == 2:
                abandoned = asyncio.get_running_loop().create_future()
                abandoned.cancel()
                await abandoned
            if self.probes == 4:
                fourth_probe.set()

    backend = FlakyProbe()
    reports: list[HealthReport] = []
    async with (
        Client(backend) as client,
        HealthWatcher(client, interval=0.05, degraded_latency=None, on_change=reports.append) as w,
    ):
        await asyncio.wait_for(fourth_probe.wait(), WAIT)
        assert w.running
        # The cancelled probe was a failed check (the status went down and came
        # back), not a silent skip that left the status as it was.
        failed = [r for r in reports if r.status is DOWN]
        assert failed
        assert failed[0].error is not None
        assert "cancelled from inside" in failed[0].error
        assert reports[-1].status is HEALTHY  # the third probe passed again


async def test_memory_backend_closed_is_down(memory_client: Client) -> None:
    async with HealthWatcher(memory_client, interval=60, degraded_latency=10) as w:
        assert w.status is HEALTHY
        await memory_client.backend.close()
        report = await w.check_now()
        assert report.status is DOWN
        assert report.error is not None
        assert "BackendUnavailableError: the memory backend is closed" in report.error
        assert w.report is report


# -- listeners -----------------------------------------------------------------


@pytest.mark.server
async def test_a_hung_listener_does_not_stop_the_checks(
    redis_server_factory: ServerFactory, loop_errors: list[dict[str, Any]]
) -> None:
    server = redis_server_factory("valkey")
    release = asyncio.Event()
    heard: list[HealthStatus] = []

    async def pager(report: HealthReport) -> None:
        heard.append(report.status)
        await release.wait()  # a notification whose HTTP call hangs

    async with Client(fast_failing_backend(server)) as client:
        watcher = HealthWatcher(
            client, interval=0.05, timeout=5, max_backoff=0.2, degraded_latency=None, on_change=pager
        )
        try:
            await asyncio.wait_for(watcher.start(), WAIT)
            assert watcher.status is HEALTHY
            server.kill()
            # Seen by the background checks while the listener still hangs on HEALTHY.
            await watcher.wait_for(DOWN, WAIT)
            report = await asyncio.wait_for(watcher.check_now(), WAIT)  # a readiness probe
            assert report.status is DOWN
            assert report.consecutive_failures >= 2
            release.set()
            await asyncio.wait_for(watcher.drain(), WAIT)
            assert heard == [HEALTHY, DOWN]
        finally:
            release.set()
            await asyncio.wait_for(watcher.stop(), WAIT)
    assert loop_errors == []


async def test_a_listener_past_listener_timeout_is_cancelled_and_logged(
    memory_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    switch = Switch()
    cancelled = asyncio.Event()
    heard: list[HealthStatus] = []
    after: list[HealthStatus] = []

    async def hanging_pager(report: HealthReport) -> None:
        heard.append(report.status)
        if report.status is HEALTHY:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

    caplog.set_level(logging.WARNING, logger=LOGGER)
    watcher = HealthWatcher(
        memory_client,
        interval=60,
        degraded_latency=None,
        checks=[switch],
        listener_timeout=0.2,
        on_change=hanging_pager,
    )
    watcher.add_listener(lambda report: after.append(report.status))
    async with watcher:
        await asyncio.wait_for(cancelled.wait(), WAIT)
        switch.ok = False
        await watcher.check_now()
        await asyncio.wait_for(watcher.drain(), WAIT)
        assert heard == [HEALTHY, DOWN]
        assert after == [HEALTHY, DOWN]  # the listener after the slow one still heard of both
    [overrun] = [r for r in caplog.records if r.name == LOGGER and "listener" in r.getMessage()]
    assert overrun.levelno == logging.WARNING
    assert "hanging_pager" in overrun.getMessage()
    assert "0.2 s" in overrun.getMessage()


async def test_listeners_that_fall_behind_hear_the_latest_status(
    memory_client: Client, caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    switch = Switch()
    release = asyncio.Event()
    heard: list[HealthStatus] = []

    async def slow(report: HealthReport) -> None:
        heard.append(report.status)
        await release.wait()

    caplog.set_level(logging.WARNING, logger=LOGGER)
    watcher = HealthWatcher(
        memory_client,
        interval=60,
        degraded_latency=None,
        checks=[switch],
        on_change=slow,
    )
    try:
        await asyncio.wait_for(watcher.start(), WAIT)
        statuses = []
        for _ in range(251):  # the backend flaps while the listener is stuck on the first change
            switch.ok = not switch.ok
            statuses.append((await asyncio.wait_for(watcher.check_now(), WAIT)).status)
        assert statuses[-1] is DOWN
        release.set()
        await asyncio.wait_for(watcher.drain(), WAIT)
    finally:
        release.set()
        await asyncio.wait_for(watcher.stop(), WAIT)
    assert heard[0] is HEALTHY
    assert heard[-1] is DOWN  # the latest status, not a stale one
    assert all(a is not b for a, b in itertools.pairwise(heard))  # changes only
    assert len(heard) <= 101  # the first change, then at most 100 queued
    behind = [r for r in caplog.records if "fell 100 status changes behind" in r.getMessage()]
    assert len(behind) == 1  # one warning per episode, not one per dropped change
    assert loop_errors == []


async def test_listeners_run_on_transitions_only(memory_client: Client) -> None:
    switch = Switch()
    seen: list[HealthStatus] = []
    async with HealthWatcher(
        memory_client,
        interval=60,
        degraded_latency=10,
        checks=[switch],
        on_change=lambda r: seen.append(r.status),
    ) as w:
        for _ in range(3):
            await w.check_now()
        await asyncio.wait_for(w.drain(), WAIT)
        assert switch.calls == 4
        assert seen == [HEALTHY]
        switch.ok = False
        await w.check_now()
        await w.check_now()
        await asyncio.wait_for(w.drain(), WAIT)
        assert seen == [HEALTHY, DOWN]
        assert w.report.consecutive_failures == 2


async def test_add_listener_returns_a_remover(memory_client: Client) -> None:
    switch = Switch()
    first: list[HealthStatus] = []
    second: list[HealthStatus] = []

    def record_first(report: HealthReport) -> None:
        first.append(report.status)

    async with HealthWatcher(memory_client, interval=60, degraded_latency=10, checks=[switch]) as w:
        remove_a = w.add_listener(record_first)
        w.add_listener(record_first)  # the same function twice: called twice
        w.add_listener(lambda r: second.append(r.status))
        switch.ok = False
        await w.check_now()
        await asyncio.wait_for(w.drain(), WAIT)
        assert first == [DOWN, DOWN]
        remove_a()
        remove_a()  # a second call removes nothing more
        switch.ok = True
        await w.check_now()
        await asyncio.wait_for(w.drain(), WAIT)
        assert first == [DOWN, DOWN, HEALTHY]
        assert second == [DOWN, HEALTHY]
        with pytest.raises(InvalidArgumentError):
            w.add_listener("not callable")  # type: ignore[arg-type]


async def test_a_listener_removed_while_a_change_is_told_is_not_called_for_it(memory_client: Client) -> None:
    switch = Switch()
    slow_called, release = asyncio.Event(), asyncio.Event()
    heard_slow: list[HealthStatus] = []
    heard_later: list[HealthStatus] = []

    async def slow(report: HealthReport) -> None:
        heard_slow.append(report.status)
        if report.status is DOWN:
            slow_called.set()
            await release.wait()

    watcher = HealthWatcher(
        memory_client, interval=60, degraded_latency=None, checks=[switch], listener_timeout=WAIT
    )
    watcher.add_listener(slow)
    remove_later = watcher.add_listener(lambda report: heard_later.append(report.status))
    async with watcher:
        await asyncio.wait_for(watcher.drain(), WAIT)
        assert heard_later == [HEALTHY]
        switch.ok = False
        await watcher.check_now()
        await asyncio.wait_for(slow_called.wait(), WAIT)
        remove_later()  # while the change to DOWN is being told to the listener before it
        release.set()
        await asyncio.wait_for(watcher.drain(), WAIT)
    assert heard_slow == [HEALTHY, DOWN]
    assert heard_later == [HEALTHY]


async def test_raising_listener_is_logged_and_the_watcher_keeps_going(
    memory_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    switch = Switch()
    after: list[HealthStatus] = []

    def explode(report: HealthReport) -> None:
        raise RuntimeError(f"listener broke on {report.status}")

    async def explode_async(report: HealthReport) -> None:
        await asyncio.sleep(0)
        raise ValueError("async listener broke")

    caplog.set_level(logging.INFO, logger=LOGGER)
    watcher = HealthWatcher(
        memory_client,
        interval=0.05,
        max_backoff=0.1,
        degraded_latency=None,
        checks=[switch],
        on_change=explode,
    )
    watcher.add_listener(explode_async)
    watcher.add_listener(lambda r: after.append(r.status))
    async with watcher:
        switch.ok = False
        await watcher.wait_for(DOWN, WAIT)  # reached by the background task
        switch.ok = True
        await watcher.wait_for(HEALTHY, WAIT)
        assert watcher.running
    assert after == [HEALTHY, DOWN, HEALTHY]
    failures = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    assert len(failures) == 6
    assert all(r.exc_info is not None for r in failures)
    raised = {type(r.exc_info[1]) for r in failures if r.exc_info is not None}
    assert raised == {RuntimeError, ValueError}
    assert any("explode" in r.getMessage() for r in failures)
    transitions = [r.getMessage() for r in caplog.records if r.name == LOGGER and "->" in r.getMessage()]
    assert any("-> down" in m and "switched off" in m for m in transitions)


async def test_a_listener_cancelled_from_inside_is_logged_and_the_watcher_keeps_going(
    memory_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    switch = Switch()
    seen: list[HealthStatus] = []

    async def flaky_pager(report: HealthReport) -> None:
        seen.append(report.status)
        if len(seen) == 1:
            abandoned = asyncio.get_running_loop().create_future()
            abandoned.cancel()
            await abandoned

    caplog.set_level(logging.ERROR, logger="kivigo_async.health")
    async with HealthWatcher(memory_client, interval=60, degraded_latency=None, checks=[switch]) as w:
        w.add_listener(flaky_pager)
        switch.ok = False
        assert (await w.check_now()).status is DOWN
        await asyncio.wait_for(w.drain(), WAIT)
        switch.ok = True
        assert (await w.check_now()).status is HEALTHY
        await asyncio.wait_for(w.drain(), WAIT)
        assert w.running
    assert seen == [DOWN, HEALTHY]
    assert "cancelled from inside" in caplog.text


async def test_a_listener_may_call_check_now(
    memory_client: Client, loop_errors: list[dict[str, Any]]
) -> None:
    # Listeners run outside the check, so one that checks again waits for nothing of its own.
    switch = Switch()
    watcher = HealthWatcher(memory_client, interval=60, degraded_latency=None, checks=[switch])
    rechecked: list[HealthStatus] = []

    async def confirm_down(report: HealthReport) -> None:
        if report.status is DOWN:
            rechecked.append((await watcher.check_now()).status)

    watcher.add_listener(confirm_down)
    async with watcher:
        switch.ok = False
        assert (await asyncio.wait_for(watcher.check_now(), WAIT)).status is DOWN
        await asyncio.wait_for(watcher.drain(), WAIT)
        assert rechecked == [DOWN]
        assert switch.calls == 3
    assert loop_errors == []


# -- iteration -------------------------------------------------------------------


async def test_concurrent_iterators_each_get_every_transition(memory_client: Client) -> None:
    switch = Switch()
    watcher = HealthWatcher(memory_client, interval=60, degraded_latency=None, checks=[switch])

    async def collect(iterator: AsyncIterator[HealthReport]) -> list[HealthStatus]:
        return [report.status async for report in iterator]

    async with watcher:
        consumers = [asyncio.create_task(collect(watcher.__aiter__())) for _ in range(3)]
        for ok in (False, False, True, True, False):
            switch.ok = ok
            await watcher.check_now()
    results = await asyncio.wait_for(asyncio.gather(*consumers), WAIT)
    assert results == [[HEALTHY, DOWN, HEALTHY, DOWN]] * 3


async def test_iterating_a_stopped_watcher_yields_the_last_report_and_ends(memory_client: Client) -> None:
    async with HealthWatcher(memory_client, interval=60, degraded_latency=None) as watcher:
        pass
    reports = [report async for report in watcher]
    assert [r.status for r in reports] == [HEALTHY]


async def test_wait_for(memory_client: Client) -> None:
    switch = Switch()
    async with HealthWatcher(memory_client, interval=60, degraded_latency=None, checks=[switch]) as w:
        assert (await w.wait_for("healthy", WAIT)).status is HEALTHY
        with pytest.raises(OperationTimeoutError, match="did not become down"):
            await w.wait_for(DOWN, 0.1)
        with pytest.raises(InvalidArgumentError, match="unknown health status"):
            await w.wait_for("sideways", WAIT)
        with pytest.raises(InvalidArgumentError):
            await w.wait_for(DOWN, 0)
        waiter = asyncio.create_task(w.wait_for(DOWN, WAIT))
        await asyncio.sleep(0)
        switch.ok = False
        await w.check_now()
        assert (await asyncio.wait_for(waiter, WAIT)).status is DOWN
        ended = asyncio.create_task(w.wait_for(HEALTHY, WAIT))
        await asyncio.sleep(0)
    with pytest.raises(KivigoError, match="stopped before"):
        await asyncio.wait_for(ended, WAIT)


# -- backoff -------------------------------------------------------------------


def test_next_delay_bounds() -> None:
    rng = random.Random(7)
    assert _next_delay(0.5, 30, 0, rng) == 0.5
    for failures in range(1, 200):
        for _ in range(50):
            delay = _next_delay(0.5, 30, failures, rng)
            assert 0.5 <= delay <= 30
            assert delay <= max(0.5, 0.5 * 2 ** (failures - 1))
    assert _next_delay(0.5, 30, 1, rng) == 0.5
    # Far into an outage the delay sits in the jitter band just under the cap.
    late = [_next_delay(0.5, 30, 100, rng) for _ in range(200)]
    assert min(late) >= 15
    # A cap below the interval means no backoff rather than probing faster.
    assert {_next_delay(10, 3, n, rng) for n in range(1, 20)} == {10}


async def test_backoff_grows_while_down_and_stays_capped(memory_client: Client) -> None:
    stamps: list[float] = []
    enough = asyncio.Event()

    async def failing(client: Client) -> None:
        stamps.append(time.monotonic())
        if len(stamps) >= 10:
            enough.set()
        raise RuntimeError("still broken")

    interval, max_backoff = 0.05, 0.4
    async with HealthWatcher(
        memory_client, interval=interval, max_backoff=max_backoff, checks=[failing]
    ) as watcher:
        await asyncio.wait_for(enough.wait(), WAIT)
    assert watcher.status is DOWN
    # Every completed check counted; the one running at exit may have been cut short.
    assert watcher.report.consecutive_failures in (len(stamps) - 1, len(stamps))
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    margin = 2.0
    assert all(gap >= interval * 0.9 for gap in gaps), gaps
    # From the fourth failure on, the delay is at least min(interval * 8, max_backoff) / 2.
    assert all(gap >= 0.2 * 0.9 for gap in gaps[3:]), gaps
    assert all(gap <= max_backoff + margin for gap in gaps), gaps


# -- lifecycle -------------------------------------------------------------------


async def test_enter_twice_and_restart_raise(memory_client: Client) -> None:
    watcher = HealthWatcher(memory_client, interval=60)
    async with watcher:
        with pytest.raises(KivigoError, match="already running"):
            async with watcher:
                pass
        assert watcher.running
    with pytest.raises(KivigoError, match="cannot be restarted"):
        await watcher.start()
    await watcher.stop()
    await watcher.stop()  # idempotent


async def test_check_now_after_stop_updates_the_report_and_calls_no_listener(memory_client: Client) -> None:
    switch = Switch()
    heard: list[HealthStatus] = []
    watcher = HealthWatcher(memory_client, interval=60, degraded_latency=None, checks=[switch])
    watcher.add_listener(lambda report: heard.append(report.status))
    async with watcher:
        await watcher.drain()
    assert heard == [HEALTHY]
    switch.ok = False
    assert (await watcher.check_now()).status is DOWN
    assert watcher.status is DOWN
    assert watcher._delivery is None  # no task left behind that nothing would end
    await watcher.drain()
    assert heard == [HEALTHY]


async def test_concurrent_check_now_calls_share_the_check_under_way(memory_client: Client) -> None:
    """A hundred readiness probes against a hung backend all answer within about one timeout."""
    runs = 0

    async def hangs(client: Client) -> None:
        nonlocal runs
        runs += 1
        await asyncio.sleep(3600)

    watcher = HealthWatcher(memory_client, timeout=0.3, interval=60, checks=[hangs])
    started = time.monotonic()
    reports = await asyncio.wait_for(asyncio.gather(*(watcher.check_now() for _ in range(100))), 30)
    elapsed = time.monotonic() - started
    assert {report.status for report in reports} == {DOWN}
    assert runs == 1
    assert elapsed < 3  # one after another, the last would answer after 30 s

    await watcher.stop()

    # Callers that give up, the one that started the check among them, do not stop
    # it for those still waiting; the last one to leave stops it. The check ends when
    # told, not at a timeout a stalled test could reach before the callers act.
    entered, failing = asyncio.Event(), asyncio.Event()

    async def held(client: Client) -> None:
        nonlocal runs
        runs += 1
        entered.set()
        await failing.wait()
        raise RuntimeError("down")

    async def callers_waiting(count: int) -> None:
        while watcher._check_flight._calls["check"].waiters < count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    watcher = HealthWatcher(memory_client, timeout=60, interval=60, checks=[held])
    first = asyncio.ensure_future(watcher.check_now())
    await asyncio.wait_for(entered.wait(), 10)
    impatient = asyncio.ensure_future(watcher.check_now())
    patient = asyncio.ensure_future(watcher.check_now())
    await asyncio.wait_for(callers_waiting(3), 10)
    impatient.cancel()
    first.cancel()
    await asyncio.wait({impatient, first})
    failing.set()
    assert (await asyncio.wait_for(patient, 10)).status is DOWN
    assert runs == 2
    entered.clear()
    failing.clear()
    alone = asyncio.ensure_future(watcher.check_now())
    await asyncio.wait_for(entered.wait(), 10)
    alone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await alone
    assert runs == 3
    # The last caller to leave stopped the check and waited for it to end.
    assert not watcher._check_flight._running
    await watcher.stop()


async def test_concurrent_stops_all_return_once_the_watcher_has_stopped(
    memory_client: Client, loop_errors: list[dict[str, Any]]
) -> None:
    # An explicit stop() (a signal handler's) and the 'async with' exit, say.
    before = asyncio.all_tasks()
    check = SlowToCancel()
    check.hang = False
    watcher = HealthWatcher(memory_client, interval=0.05, timeout=WAIT, checks=[check])
    try:
        await asyncio.wait_for(watcher.start(), WAIT)
        [task] = watcher_tasks()
        check.hang = True
        await asyncio.wait_for(check.entered.wait(), WAIT)  # the background task is inside a check
        stops = [asyncio.create_task(watcher.stop()) for _ in range(2)]
        await asyncio.sleep(0.1)
        assert not [stop for stop in stops if stop.done()]  # the check's cleanup has not ended
        assert watcher.running
        check.cleanup_may_end.set()
        await asyncio.wait_for(asyncio.gather(*stops), WAIT)
        assert task.done()
        assert check.cleaned_up.is_set()
        assert not watcher.running
        await watcher.stop()  # once stopped, at once
    finally:
        check.cleanup_may_end.set()
        await asyncio.wait_for(watcher.stop(), WAIT)
    assert asyncio.all_tasks() == before
    assert loop_errors == []


async def test_a_cancelled_stop_goes_on_and_a_later_stop_waits_for_it(
    memory_client: Client, loop_errors: list[dict[str, Any]]
) -> None:
    before = asyncio.all_tasks()
    check = SlowToCancel()
    check.hang = False
    switch = Switch()
    release = asyncio.Event()
    heard: list[HealthStatus] = []

    async def pager(report: HealthReport) -> None:
        heard.append(report.status)
        await release.wait()

    watcher = HealthWatcher(
        memory_client,
        interval=0.05,
        timeout=WAIT,
        degraded_latency=None,
        listener_timeout=WAIT,
        checks=[check, switch],
        on_change=pager,
    )
    try:
        await asyncio.wait_for(watcher.start(), WAIT)  # the pager hangs on HEALTHY
        switch.ok = False
        assert (await asyncio.wait_for(watcher.check_now(), WAIT)).status is DEGRADED  # not told yet
        check.hang = True
        await asyncio.wait_for(check.entered.wait(), WAIT)  # the background task is inside a check
        stopping = asyncio.create_task(watcher.stop())
        await asyncio.sleep(0.1)
        stopping.cancel()  # a shutdown timeout around stop(), say
        with pytest.raises(asyncio.CancelledError):
            await stopping
        # The stopping went on; a later stop() waits for it rather than returning at once.
        second = asyncio.create_task(watcher.stop())
        await asyncio.sleep(0.1)
        assert not second.done()
        check.cleanup_may_end.set()
        release.set()
        await asyncio.wait_for(second, WAIT)
        assert check.cleaned_up.is_set()
        told = list(heard)
        assert told == [HEALTHY, DEGRADED]  # the change already seen was told before stop() returned
        assert watcher._delivery is None
        await asyncio.sleep(0.1)
        assert heard == told  # and nothing after
    finally:
        check.cleanup_may_end.set()
        release.set()
        await asyncio.wait_for(watcher.stop(), WAIT)
    assert asyncio.all_tasks() == before
    assert loop_errors == []


async def test_stop_before_start(memory_client: Client) -> None:
    watcher = HealthWatcher(memory_client, interval=60)
    await watcher.stop()
    await watcher.stop()
    assert watcher.status is HealthStatus.UNKNOWN
    with pytest.raises(KivigoError):
        await watcher.start()


@pytest.mark.server
async def test_cancelling_the_owner_stops_the_background_task(
    valkey_client: Client, loop_errors: list[dict[str, Any]]
) -> None:
    before = asyncio.all_tasks()
    entered = asyncio.Event()
    ended: list[HealthStatus] = []

    async def owner() -> None:
        async with HealthWatcher(valkey_client, interval=0.05) as watcher:
            iterator = watcher.__aiter__()
            entered.set()
            async for report in iterator:
                ended.append(report.status)

    task = asyncio.create_task(owner())
    await asyncio.wait_for(entered.wait(), WAIT)
    assert len(watcher_tasks()) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert watcher_tasks() == []
    assert asyncio.all_tasks() == before
    assert loop_errors == []


async def test_cancelling_during_the_first_check_leaves_nothing_behind(
    memory_client: Client, loop_errors: list[dict[str, Any]]
) -> None:
    started = asyncio.Event()

    async def stuck(client: Client) -> None:
        started.set()
        await asyncio.sleep(60)

    before = asyncio.all_tasks()
    watcher = HealthWatcher(memory_client, interval=0.05, timeout=60, checks=[stuck])

    async def owner() -> None:
        async with watcher:
            pytest.fail("the first check cannot have completed")

    task = asyncio.create_task(owner())
    await asyncio.wait_for(started.wait(), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert asyncio.all_tasks() == before
    assert not watcher.running
    assert [r async for r in watcher] == [watcher.report]
    assert loop_errors == []


async def test_stop_ends_the_task_of_a_hung_listener(
    memory_client: Client, loop_errors: list[dict[str, Any]]
) -> None:
    before = asyncio.all_tasks()
    cancelled = asyncio.Event()

    async def hang(report: HealthReport) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    watcher = HealthWatcher(memory_client, interval=0.05, listener_timeout=0.5, on_change=hang)
    try:
        await asyncio.wait_for(watcher.start(), WAIT)
    finally:
        await asyncio.wait_for(watcher.stop(), WAIT)
    assert cancelled.is_set()
    assert asyncio.all_tasks() == before
    gc.collect()
    await asyncio.sleep(0)
    assert loop_errors == []


async def test_stop_from_a_listener(memory_client: Client, loop_errors: list[dict[str, Any]]) -> None:
    switch = Switch()
    watcher = HealthWatcher(memory_client, interval=0.05, degraded_latency=None, checks=[switch])

    stopped = asyncio.Event()

    async def stop_when_down(report: HealthReport) -> None:
        if report.status is DOWN:
            await watcher.stop()
            stopped.set()

    watcher.add_listener(stop_when_down)
    async with watcher:
        [task] = watcher_tasks()
        switch.ok = False
        await asyncio.wait_for(stopped.wait(), WAIT)
        assert not watcher.running
        assert watcher.status is DOWN
        await asyncio.wait({task}, timeout=WAIT)
        assert task.cancelled()
    assert watcher_tasks() == []
    assert loop_errors == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"interval": 0}, "interval"),
        ({"interval": float("nan")}, "interval"),
        ({"timeout": -1}, "timeout"),
        ({"degraded_latency": 0}, "degraded_latency"),
        ({"max_backoff": float("inf")}, "max_backoff"),
        ({"listener_timeout": 0}, "listener_timeout"),
        ({"listener_timeout": None}, "listener_timeout"),
        ({"interval": "5"}, "interval"),
        ({"interval": True}, "interval"),
        ({"checks": [passing, 3]}, "callable"),
        ({"checks": passing}, "sequence"),
        ({"on_change": "print"}, "on_change"),
    ],
)
async def test_bad_options_raise(memory_client: Client, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        HealthWatcher(memory_client, **kwargs)


def test_needs_a_client() -> None:
    with pytest.raises(ConfigurationError, match="Client"):
        HealthWatcher(MemoryBackend())  # type: ignore[arg-type]


async def test_stop_just_as_a_check_finishes(
    memory_client: Client, loop_errors: list[dict[str, Any]]
) -> None:
    # The check ends in the same loop step that wakes us, so stop() cancels the
    # background task while its check's result is ready but not yet read: a
    # cancellation asyncio.wait_for (before 3.12) would swallow, looping forever.
    finished = asyncio.Event()
    calls = 0

    async def signal(client: Client) -> None:
        nonlocal calls
        calls += 1
        if calls >= 2:
            finished.set()

    watcher = HealthWatcher(memory_client, interval=0.01, degraded_latency=None, checks=[signal])
    async with watcher:
        [task] = watcher_tasks()
        await finished.wait()
        await asyncio.wait_for(watcher.stop(), WAIT)
    assert task.done()
    assert watcher_tasks() == []
    assert loop_errors == []


# -- listeners that ignore cancellation ----------------------------------------


class Stubborn:
    """An async listener that swallows every cancellation until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.ended = asyncio.Event()

    async def pager(self, report: HealthReport, *, token: str) -> None:
        try:
            while not self.release.is_set():
                try:
                    await self.release.wait()
                except asyncio.CancelledError:
                    self.cancelled.set()  # swallowed: the listener carries on
        finally:
            self.ended.set()


async def test_stop_returns_in_bounded_time_when_a_listener_ignores_cancellation(
    memory_client: Client, caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    before = asyncio.all_tasks()
    stubborn = Stubborn()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    # A partial holding a secret: the log must name the function, never show its arguments.
    listener = functools.partial(stubborn.pager, token="s3cr3t-token")
    watcher = HealthWatcher(memory_client, interval=60, listener_timeout=0.2, on_change=listener)
    try:
        await asyncio.wait_for(watcher.start(), WAIT)
        await asyncio.wait_for(stubborn.cancelled.wait(), WAIT)  # overran, cancelled, carried on
        # Before the fix, stop() waited for the listener forever: shutdown hung.
        await asyncio.wait_for(watcher.stop(), WAIT)
        assert not watcher.running
        assert not stubborn.ended.is_set()  # left behind, not waited for
        left = [r for r in caplog.records if r.name == LOGGER and "did not end" in r.getMessage()]
        assert left
        assert all(r.levelno == logging.WARNING for r in left)
        assert all("Stubborn.pager" in r.getMessage() for r in left)
        assert "s3cr3t-token" not in caplog.text
    finally:
        stubborn.release.set()
        await asyncio.wait_for(stubborn.ended.wait(), WAIT)
        await asyncio.wait_for(watcher.stop(), WAIT)
    await eventually(lambda: asyncio.all_tasks() == before, WAIT, "a listener task was left running")
    assert loop_errors == []


async def test_a_listener_ignoring_cancellation_does_not_starve_the_others(
    memory_client: Client, caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    stubborn = Stubborn()
    heard: list[HealthStatus] = []
    caplog.set_level(logging.WARNING, logger=LOGGER)
    watcher = HealthWatcher(
        memory_client,
        interval=60,
        listener_timeout=0.2,
        on_change=functools.partial(stubborn.pager, token="x"),
    )
    watcher.add_listener(lambda report: heard.append(report.status))
    try:
        await asyncio.wait_for(watcher.start(), WAIT)
        # Before the fix, the listeners' task waited for the stubborn one forever.
        await asyncio.wait_for(watcher.drain(), WAIT)
        assert heard == [watcher.status]
        assert stubborn.cancelled.is_set()
        assert not stubborn.ended.is_set()
        assert any("did not end" in r.getMessage() for r in caplog.records if r.name == LOGGER)
    finally:
        stubborn.release.set()
        await asyncio.wait_for(stubborn.ended.wait(), WAIT)
        await asyncio.wait_for(watcher.stop(), WAIT)
    assert loop_errors == []


# -- iterators that stop reading -----------------------------------------------


async def test_an_iterator_that_stops_reading_keeps_only_the_latest_changes(
    memory_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    switch = Switch()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    watcher = HealthWatcher(memory_client, interval=60, degraded_latency=None, checks=[switch])
    async with watcher:
        iterator = watcher.__aiter__()
        for _ in range(1001):  # the backend flaps; nobody reads the iterator
            switch.ok = not switch.ok
            await watcher.check_now()
        latest = watcher.report
        assert latest.status is DOWN
    reports = [report async for report in iterator]
    # Before the fix every change was kept: 1002 reports, and memory grew without bound.
    assert len(reports) <= 101
    assert reports[-1] is latest  # the most recent status is never dropped
    assert all(a.status is not b.status for a, b in itertools.pairwise(reports))  # changes only
    behind = [r for r in caplog.records if r.name == LOGGER and "behind" in r.getMessage()]
    assert len(behind) == 1  # one warning per episode, not one per dropped change


async def test_an_iterator_that_catches_up_gets_every_change_again(memory_client: Client) -> None:
    switch = Switch()
    watcher = HealthWatcher(memory_client, interval=60, degraded_latency=None, checks=[switch])
    async with watcher:
        iterator = watcher.__aiter__()
        for _ in range(300):
            switch.ok = not switch.ok
            await watcher.check_now()
        backlog: list[HealthReport] = []
        while len(backlog) < 101 and (not backlog or backlog[-1] is not watcher.report):
            backlog.append(await asyncio.wait_for(iterator.__anext__(), WAIT))
        assert backlog[-1] is watcher.report
        assert backlog[-1].status is HEALTHY
        # Caught up: from here on nothing is dropped.
        for ok in (False, True, False):
            switch.ok = ok
            await watcher.check_now()
    after = [report.status async for report in iterator]
    assert after == [DOWN, HEALTHY, DOWN]
