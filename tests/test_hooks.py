"""Tests of kivigo_async.hooks: registration, filtering, sync/background runs, failures and shutdown."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import logging
import re
import secrets
import sys
from typing import TYPE_CHECKING, Any

import pytest
from conftest import redis_options

from kivigo_async import Client
from kivigo_async import hooks as hooks_module
from kivigo_async.backends.memory import MemoryBackend
from kivigo_async.backends.redis import RedisBackend
from kivigo_async.errors import BackendUnavailableError, InvalidArgumentError
from kivigo_async.hooks import (
    EventType,
    HookEvent,
    HookHandle,
    HookRegistry,
    KeyFilter,
    key_list_filter,
    prefix_filter,
    regex_filter,
    suffix_filter,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from kivigo_async.testing.servers import RedisServer

LOGGER = "kivigo_async.hooks"
SECRET = b"s3cr3t-value-bytes"
WAIT = 30.0  # generous bound on anything that should take well under a second

#: What a web framework or a tracer would keep per request.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class Recorder:
    """A plain-function hook that records the events it sees."""

    def __init__(self) -> None:
        self.events: list[HookEvent] = []

    def __call__(self, event: HookEvent) -> None:
        self.events.append(event)

    @property
    def keys(self) -> list[str]:
        return [event.key for event in self.events]


@pytest.fixture
def registry() -> HookRegistry:
    return HookRegistry()


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Collect what the loop reports ("Task exception was never retrieved"...)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(previous)


async def wait_for_flag(flag: asyncio.Event) -> None:
    await asyncio.wait_for(flag.wait(), 5)


# -- registration ------------------------------------------------------------


def test_bool_and_len_track_registration(registry: HookRegistry) -> None:
    assert not registry
    assert len(registry) == 0
    first = registry.register(Recorder())
    second = registry.register(Recorder(), background=True)
    assert registry
    assert len(registry) == 2
    first.remove()
    assert registry
    assert len(registry) == 1
    second.remove()
    assert not registry
    assert len(registry) == 0


def test_handle_id_and_repr(registry: HookRegistry) -> None:
    one = registry.register(Recorder())
    two = registry.register(Recorder())
    assert isinstance(one, HookHandle)
    assert re.fullmatch(r"[0-9a-f]{16}", one.id)
    assert one.id != two.id
    assert one.id in repr(one)
    assert one.active


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fn": 42}, "callable"),
        ({"events": ["set", "nope"]}, "unknown event type 'nope'"),
        ({"events": "nope"}, "unknown event type"),
        ({"events": [1]}, "EventType or str"),
        ({"events": 5}, "iterable"),
        ({"key_filter": "user:"}, "key_filter must be callable"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1.0}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"timeout": "1"}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"max_pending": 0}, "max_pending"),
        ({"max_pending": -3}, "max_pending"),
        ({"max_pending": 2.5}, "max_pending"),
        ({"max_pending": True}, "max_pending"),
        ({"max_pending": "10"}, "max_pending"),
    ],
)
def test_invalid_registration_raises(registry: HookRegistry, kwargs: dict[str, Any], message: str) -> None:
    fn = kwargs.pop("fn", Recorder())
    with pytest.raises(InvalidArgumentError, match=message):
        registry.register(fn, **kwargs)
    assert not registry


def test_invalid_argument_error_is_a_value_error(registry: HookRegistry) -> None:
    with pytest.raises(ValueError, match="timeout"):
        registry.register(Recorder(), timeout=-5)


# -- event and key filtering ---------------------------------------------------


async def test_events_filter(registry: HookRegistry) -> None:
    sets, deletes, everything, empty = Recorder(), Recorder(), Recorder(), Recorder()
    registry.register(sets, events=[EventType.SET])
    registry.register(deletes, events=["delete", "batch_delete"])  # strings by value
    registry.register(everything)
    registry.register(empty, events=[])

    await registry.emit(EventType.SET, "a", b"1")
    await registry.emit(EventType.DELETE, "b", None)
    await registry.emit(EventType.EXPIRE, "c", None)
    await registry.emit_many(EventType.BATCH_DELETE, [("d", None)])

    assert sets.keys == ["a"]
    assert deletes.keys == ["b", "d"]
    assert everything.keys == ["a", "b", "c", "d"]
    assert empty.keys == ["a", "b", "c", "d"]
    assert [e.type for e in everything.events] == [
        EventType.SET,
        EventType.DELETE,
        EventType.EXPIRE,
        EventType.BATCH_DELETE,
    ]


async def test_single_event_type_is_not_split_into_letters(registry: HookRegistry) -> None:
    rec = Recorder()
    registry.register(rec, events=EventType.PERSIST)
    await registry.emit(EventType.PERSIST, "k", None)
    await registry.emit(EventType.SET, "k", b"v")
    assert rec.keys == ["k"]


@pytest.mark.parametrize(
    ("key_filter", "matching", "other"),
    [
        (prefix_filter("user:"), "user:42", "session:user:42"),
        (suffix_filter(":lock"), "job:7:lock", "job:7:lock:owner"),
        (regex_filter(r"^session:[0-9a-f]+$"), "session:abc123", "session:xyz"),
        (regex_filter(re.compile(r"\d{3}")), "order-123-x", "order-12"),
        (key_list_filter(["config", "flags"]), "flags", "flag"),
        (key_list_filter(iter(["only"])), "only", "only2"),
    ],
)
async def test_key_filters(registry: HookRegistry, key_filter: KeyFilter, matching: str, other: str) -> None:
    rec = Recorder()
    registry.register(rec, key_filter=key_filter)
    await registry.emit(EventType.SET, other, b"x")
    await registry.emit(EventType.SET, matching, b"x")
    await registry.emit_many(EventType.BATCH_SET, [(other, b"1"), (matching, b"2")])
    assert rec.keys == [matching, matching]


def test_regex_filter_uses_search_semantics() -> None:
    assert regex_filter("b")("abc")
    assert not regex_filter("^b")("abc")


@pytest.mark.parametrize(
    ("factory", "argument"),
    [
        (prefix_filter, 1),
        (suffix_filter, b"x"),
        (regex_filter, "("),
        (regex_filter, re.compile(b"x")),
        (regex_filter, 3),
        (key_list_filter, "abc"),  # a lone string is not a list of keys
        (key_list_filter, [1, 2]),
        (key_list_filter, 7),
    ],
)
def test_invalid_filter_arguments(factory: Any, argument: Any) -> None:
    with pytest.raises(InvalidArgumentError):
        factory(argument)


async def test_raising_key_filter_is_logged_and_skips_the_hook(
    registry: HookRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)

    def bad_filter(key: str) -> bool:
        raise RuntimeError("filter broke")

    skipped, other = Recorder(), Recorder()
    registry.register(skipped, key_filter=bad_filter)
    registry.register(other)
    await registry.emit(EventType.SET, "k", SECRET)
    assert skipped.events == []
    assert other.keys == ["k"]
    assert "key filter" in caplog.text
    assert "filter broke" in caplog.text


# -- synchronous and background runs ---------------------------------------------


async def test_sync_hook_runs_before_emit_returns(registry: HookRegistry) -> None:
    seen: list[HookEvent] = []

    async def hook(event: HookEvent) -> None:
        await asyncio.sleep(0.01)
        seen.append(event)

    registry.register(hook)
    await registry.emit(EventType.SET, "k", b"v")
    assert seen == [HookEvent(EventType.SET, "k", b"v")]


async def test_sync_hooks_run_in_registration_order(registry: HookRegistry) -> None:
    order: list[str] = []

    async def first(event: HookEvent) -> None:
        await asyncio.sleep(0.01)
        order.append("first")

    registry.register(first)
    registry.register(lambda event: order.append("second"))
    registry.register(lambda event: order.append("third"))
    await registry.emit(EventType.SET, "k", b"v")
    assert order == ["first", "second", "third"]


async def test_background_hook_runs_after_emit(registry: HookRegistry) -> None:
    seen: list[str] = []
    release = asyncio.Event()

    async def hook(event: HookEvent) -> None:
        await release.wait()
        seen.append(event.key)

    registry.register(hook, background=True)
    await registry.emit(EventType.SET, "k", b"v")
    assert seen == []  # emit did not wait for it
    release.set()
    await registry.drain()
    assert seen == ["k"]
    assert "running=0" in repr(registry)


async def test_background_batch_keeps_key_order(registry: HookRegistry) -> None:
    seen: list[str] = []

    async def hook(event: HookEvent) -> None:
        await asyncio.sleep(0)
        seen.append(event.key)

    registry.register(hook, background=True, key_filter=prefix_filter("k"))
    await registry.emit_many(EventType.BATCH_SET, [("k1", b"1"), ("x", b"2"), ("k2", b"3"), ("k3", b"4")])
    await registry.drain()
    assert seen == ["k1", "k2", "k3"]


async def test_background_hook_sees_separate_writes_in_write_order(registry: HookRegistry) -> None:
    seen: list[tuple[str, bytes | None]] = []
    delays = iter([0.05, 0.0, 0.0, 0.0])  # the first call is the slowest

    async def publish(event: HookEvent) -> None:
        await asyncio.sleep(next(delays))
        seen.append((str(event.type), event.value))

    registry.register(publish, background=True)
    await registry.emit(EventType.SET, "cfg", b"1")
    await registry.emit(EventType.SET, "cfg", b"2")
    await registry.emit_many(EventType.BATCH_SET, [("cfg", b"3")])
    await registry.emit(EventType.DELETE, "cfg", None)
    await asyncio.wait_for(registry.drain(), 5)
    # A publisher forwarding values must end on the last write, not on a slow first one.
    assert seen == [("set", b"1"), ("set", b"2"), ("batch_set", b"3"), ("delete", None)]


async def test_a_partial_hook_is_named_after_its_function_not_its_arguments(
    registry: HookRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    async def post_webhook(event: HookEvent, *, token: str) -> None:
        raise RuntimeError("endpoint down")

    handle = registry.register(functools.partial(post_webhook, token="tok-s3cr3t"))
    assert "post_webhook" in repr(handle)
    assert "tok-s3cr3t" not in repr(handle)
    with caplog.at_level(logging.ERROR, LOGGER):
        await registry.emit(EventType.SET, "k", b"v")
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "post_webhook" in record.getMessage()
    assert "tok-s3cr3t" not in caplog.text


async def test_a_slow_background_hook_drops_its_oldest_events_and_says_so(
    registry: HookRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    release = asyncio.Event()

    async def slow(event: HookEvent) -> None:
        await release.wait()
        seen.append(event.key)

    handle = registry.register(slow, background=True, max_pending=3)
    with caplog.at_level(logging.WARNING, LOGGER):
        await registry.emit(EventType.SET, "k0", SECRET)
        await asyncio.sleep(0)  # the worker takes k0 and waits in the hook
        for i in range(1, 6):
            await registry.emit(EventType.SET, f"k{i}", SECRET)
        await registry.emit_many(EventType.BATCH_SET, [("k6", SECRET), ("k7", SECRET)])
        # Queued: k1..k7 (7 events) for 3 places: k1..k4 were dropped, oldest first.
        assert handle.dropped == 4
        release.set()
        await asyncio.wait_for(registry.drain(), 5)
    assert seen == ["k0", "k5", "k6", "k7"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one per episode of falling behind, not one per event
    message = warnings[0].getMessage()
    assert "fell more than 3 events behind" in message
    assert handle.id in message
    assert "s3cr3t" not in message

    # Caught up: the next episode warns again, and the count keeps growing.
    release.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, LOGGER):
        await registry.emit_many(EventType.BATCH_SET, [(f"b{i}", SECRET) for i in range(10)])
        assert handle.dropped == 4 + 7
        release.set()
        await asyncio.wait_for(registry.drain(), 5)
    assert seen[-3:] == ["b7", "b8", "b9"]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


async def test_background_queue_bounds(registry: HookRegistry) -> None:
    release = asyncio.Event()

    async def slow(event: HookEvent) -> None:
        await release.wait()

    default = registry.register(slow, background=True)
    unbounded = registry.register(slow, background=True, max_pending=None)
    inline = registry.register(Recorder(), max_pending=1)  # only background hooks queue
    await registry.emit_many(
        EventType.BATCH_SET, [(f"k{i}", b"v") for i in range(hooks_module.DEFAULT_HOOK_MAX_PENDING + 5)]
    )
    # The first event is taken by each worker only once it runs: all of them were queued.
    assert default.dropped == 5
    assert unbounded.dropped == 0
    assert inline.dropped == 0
    release.set()
    await asyncio.wait_for(registry.drain(), 30)


async def test_a_worker_cancelled_before_it_started_does_not_stall_the_hook(registry: HookRegistry) -> None:
    seen: list[str] = []
    registry.register(lambda event: seen.append(event.key), background=True)
    await registry.emit(EventType.SET, "x", b"1")
    for task in asyncio.all_tasks():
        if task.get_name().startswith("kivigo-hook-"):
            task.cancel()  # before its first step: its cleanup never runs
    await asyncio.sleep(0)
    await registry.emit(EventType.SET, "y", b"2")
    await asyncio.wait_for(registry.drain(), 5)
    assert seen == ["x", "y"]  # a new worker took over the queue


@pytest.mark.server
async def test_background_hooks_run_in_the_context_of_their_write(valkey_server: RedisServer) -> None:
    prefix = f"hook-context:{secrets.token_hex(4)}:"
    seen: dict[str, list[tuple[str, str]]] = {"async": [], "timeout": [], "plain": [], "lambda": []}

    async def audit(event: HookEvent) -> None:
        await asyncio.sleep(0.01)  # a slow first call: later writes queue behind it
        seen["async"].append((event.key, request_id.get()))
        request_id.set("set by a hook")  # must reach neither the next call nor the write

    async def audit_bounded(event: HookEvent) -> None:
        await asyncio.sleep(0)
        seen["timeout"].append((event.key, request_id.get()))
        request_id.set("set by a hook")

    def count(event: HookEvent) -> None:
        seen["plain"].append((event.key, request_id.get()))
        request_id.set("set by a hook")

    async def publish(event: HookEvent) -> None:
        seen["lambda"].append((event.key, request_id.get()))

    async with Client(RedisBackend(redis_options(valkey_server))) as client:
        client.hooks.register(audit, background=True)
        client.hooks.register(audit_bounded, background=True, timeout=WAIT)
        client.hooks.register(count, background=True)
        client.hooks.register(lambda event: publish(event), background=True)  # returns a coroutine

        async def handle_request(number: int) -> None:
            request_id.set(f"req-{number}")
            await client.set(f"{prefix}{number}", number)
            await client.batch_set({f"{prefix}{number}:a": 1, f"{prefix}{number}:b": 2})

        await asyncio.gather(*(handle_request(n) for n in range(5)))
        await asyncio.wait_for(client.hooks.drain(), WAIT)
        expected = sorted(
            (f"{prefix}{n}{suffix}", f"req-{n}") for n in range(5) for suffix in ("", ":a", ":b")
        )
        for kind, calls in seen.items():
            assert sorted(calls) == expected, kind
        assert request_id.get() == "-"
        await client.hooks.aclose()
        await client.batch_delete([key for key, _ in expected])


class Unorderable:
    """A context value whose ``==`` raises, as a numpy array's or an SQL expression's truth does."""

    def __eq__(self, other: object) -> bool:
        raise TypeError("boolean value of this object is not defined")

    __hash__ = object.__hash__


#: Per-request objects a hook may use: equal values, distinct objects.
request_log: contextvars.ContextVar[list[str]] = contextvars.ContextVar("request_log")
request_marker: contextvars.ContextVar[Unorderable] = contextvars.ContextVar("request_marker")


@pytest.mark.parametrize("timeout", [None, 10.0])
async def test_background_hooks_get_the_very_objects_of_their_write(
    registry: HookRegistry, loop_errors: list[dict[str, Any]], timeout: float | None
) -> None:
    # Contexts are told apart by the identity of their values: comparing them with ==
    # raised in the worker (losing the queue) or mixed up equal objects of two writes.
    markers: list[tuple[str, Unorderable]] = []

    async def hook(event: HookEvent) -> None:
        request_log.get().append(event.key)
        markers.append((event.key, request_marker.get()))

    registry.register(hook, background=True, timeout=timeout)
    logs: dict[str, list[str]] = {}
    sent: dict[str, Unorderable] = {}

    async def write(key: str) -> None:
        logs[key] = []
        sent[key] = Unorderable()
        request_log.set(logs[key])
        request_marker.set(sent[key])
        await registry.emit(EventType.SET, key, b"v")

    await asyncio.gather(write("a"), write("b"), write("c"))
    await asyncio.wait_for(registry.drain(), WAIT)
    assert logs == {"a": ["a"], "b": ["b"], "c": ["c"]}
    assert [key for key, _ in markers] == ["a", "b", "c"]
    assert all(marker is sent[key] for key, marker in markers)
    assert loop_errors == []


@pytest.mark.server
async def test_registering_a_background_hook_on_a_closed_client_raises(valkey_server: RedisServer) -> None:
    client = Client(RedisBackend(redis_options(valkey_server)))
    async with client:
        pass
    with pytest.raises(BackendUnavailableError, match="closed"):
        client.hooks.register(Recorder(), background=True)
    assert len(client.hooks) == 0
    registry = HookRegistry()
    await registry.aclose()
    with pytest.raises(BackendUnavailableError, match="closed"):
        registry.register(Recorder(), background=True)
    inline = Recorder()
    registry.register(inline)  # inline hooks still run on a closed registry
    await registry.emit(EventType.SET, "k", b"v")
    assert inline.keys == ["k"]


async def test_emit_many_sends_one_event_per_key(registry: HookRegistry) -> None:
    rec = Recorder()
    registry.register(rec)
    await registry.emit_many(EventType.BATCH_SET, [("a", b"1"), ("b", b"2")])
    await registry.emit_many(EventType.BATCH_SET, [])
    assert rec.events == [
        HookEvent(EventType.BATCH_SET, "a", b"1"),
        HookEvent(EventType.BATCH_SET, "b", b"2"),
    ]


async def test_async_plain_and_other_callables(registry: HookRegistry) -> None:
    seen: list[str] = []

    async def coroutine_fn(event: HookEvent) -> None:
        seen.append("async")

    def plain_fn(event: HookEvent) -> None:
        seen.append("plain")

    class AsyncCallable:
        async def __call__(self, event: HookEvent) -> None:
            seen.append("async-callable")

    async def tagged(tag: str, event: HookEvent) -> None:
        seen.append(tag)

    registry.register(coroutine_fn)
    registry.register(plain_fn)
    registry.register(AsyncCallable())
    registry.register(functools.partial(tagged, "partial"))
    registry.register(lambda event: tagged("lambda", event))  # a plain function returning a coroutine
    registry.register(coroutine_fn, background=True)
    registry.register(plain_fn, background=True)
    registry.register(lambda event: tagged("background-lambda", event), background=True)
    await registry.emit(EventType.SET, "k", b"v")
    await registry.drain()
    assert seen[:5] == ["async", "plain", "async-callable", "partial", "lambda"]
    # Each background hook has a task of its own: no order between them.
    assert sorted(seen[5:]) == ["async", "background-lambda", "plain"]


async def test_hooks_returning_a_value_are_accepted_and_the_value_ignored(registry: HookRegistry) -> None:
    # The public type must accept what the docs allow (the return value is ignored):
    # mypy --strict checks this test, and rejected these when hooks had to return None.
    cache = {"a": 1, "b": 2}

    async def invalidate(event: HookEvent) -> bool:
        return cache.pop(event.key, None) is not None

    registry.register(invalidate, events=["set"])
    registry.register(lambda event: cache.pop(event.key, None), events=["delete"])
    await registry.emit(EventType.SET, "a", b"1")
    await registry.emit(EventType.DELETE, "b", None)
    assert cache == {}


async def test_event_type_strings_are_coerced(registry: HookRegistry) -> None:
    rec = Recorder()
    registry.register(rec)
    await registry.emit("set", "k", b"v")  # type: ignore[arg-type]
    assert rec.events[0].type is EventType.SET


def test_event_repr_hides_the_value() -> None:
    event = HookEvent(EventType.SET, "user:42", SECRET)
    assert "user:42" in repr(event)
    assert f"<{len(SECRET)} bytes>" in repr(event)
    assert "s3cr3t" not in repr(event)
    assert "value=None" in repr(HookEvent(EventType.DELETE, "k", None))
    assert str(EventType.BATCH_SET) == "batch_set"
    assert {"set": 1}[EventType.SET] == 1  # members are their string values


# -- failures ----------------------------------------------------------------------


async def test_raising_hook_is_logged_and_others_still_run(
    registry: HookRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    before, after = Recorder(), Recorder()

    async def broken(event: HookEvent) -> None:
        raise RuntimeError("hook exploded")

    registry.register(before)
    registry.register(broken)
    registry.register(after)
    await registry.emit(EventType.SET, "user:42", SECRET)  # must not raise

    assert before.keys == ["user:42"]
    assert after.keys == ["user:42"]
    [record] = [r for r in caplog.records if r.name == LOGGER]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
    message = record.getMessage()
    assert "user:42" in message
    assert "set" in message
    assert "broken" in message


async def test_log_contains_key_but_never_the_value(
    registry: HookRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    def broken(event: HookEvent) -> None:
        raise ValueError("nope")

    async def slow(event: HookEvent) -> None:
        await asyncio.sleep(30)

    registry.register(broken)
    registry.register(broken, background=True)
    registry.register(slow, timeout=0.01)
    await registry.emit(EventType.SET, "secret-holder", SECRET)
    await registry.emit_many(EventType.BATCH_SET, [("batch-key", SECRET)])
    await registry.drain()

    assert len(caplog.records) == 6
    for record in caplog.records:
        assert "s3cr3t" not in record.getMessage()
    assert "s3cr3t" not in caplog.text  # tracebacks included
    assert "secret-holder" in caplog.text
    assert "batch-key" in caplog.text


async def test_plain_function_returning_a_non_awaitable_is_fine(
    registry: HookRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    store: dict[str, bytes | None] = {}
    registry.register(lambda event: store.setdefault(event.key, event.value))
    await registry.emit(EventType.SET, "k", b"v")
    assert store == {"k": b"v"}
    assert caplog.records == []


@pytest.mark.parametrize("background", [False, True])
async def test_timeout_is_logged_and_bounded(
    registry: HookRegistry, caplog: pytest.LogCaptureFixture, background: bool
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    after = Recorder()

    async def slow(event: HookEvent) -> None:
        await asyncio.sleep(30)

    registry.register(slow, timeout=0.05, background=background)
    registry.register(after)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await registry.emit(EventType.DELETE, "slow-key", None)
    await registry.drain()
    assert loop.time() - start < 5
    assert after.keys == ["slow-key"]
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "timed out" in record.getMessage()
    assert "slow-key" in record.getMessage()
    assert record.exc_info is not None


async def test_timeout_fallback_for_python_3_10(
    registry: HookRegistry, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hooks_module, "_bounded", hooks_module._bounded_wait_for)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    seen: list[str] = []

    async def slow(event: HookEvent) -> None:
        await asyncio.sleep(30)

    async def quick(event: HookEvent) -> None:
        seen.append(event.key)

    registry.register(slow, timeout=0.05)
    registry.register(quick, timeout=5)
    await asyncio.wait_for(registry.emit(EventType.SET, "k", b"v"), 5)
    assert seen == ["k"]
    [record] = caplog.records
    assert "timed out" in record.getMessage()


async def test_fast_hook_with_timeout_is_not_logged(
    registry: HookRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    rec = Recorder()
    registry.register(rec, timeout=5)
    await registry.emit(EventType.SET, "k", b"v")
    assert rec.keys == ["k"]
    assert caplog.records == []


@pytest.mark.skipif(sys.version_info < (3, 11), reason="needs asyncio.timeout")
async def test_hooks_own_timeout_error_is_a_failure_not_a_timeout(
    registry: HookRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)

    async def hook(event: HookEvent) -> None:
        raise TimeoutError("upstream timed out")

    registry.register(hook, timeout=5)
    await registry.emit(EventType.SET, "k", b"v")
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert "failed" in record.getMessage()


# -- cancellation ------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [None, 10.0])
async def test_caller_cancellation_propagates(registry: HookRegistry, timeout: float | None) -> None:
    started = asyncio.Event()
    after = Recorder()

    async def hook(event: HookEvent) -> None:
        started.set()
        await asyncio.sleep(30)

    registry.register(hook, timeout=timeout)
    registry.register(after)
    task = asyncio.create_task(registry.emit(EventType.SET, "k", b"v"))
    await wait_for_flag(started)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert after.events == []


@pytest.mark.skipif(sys.version_info < (3, 11), reason="needs Task.cancelling()")
async def test_cancelled_error_raised_by_the_hook_itself_is_contained(
    registry: HookRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    after = Recorder()

    async def hook(event: HookEvent) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.cancel()
        await future

    registry.register(hook)
    registry.register(after)
    await registry.emit(EventType.SET, "k", b"v")
    assert after.keys == ["k"]
    assert len(caplog.records) == 1


# -- removal -----------------------------------------------------------------------


async def test_remove_is_idempotent_and_removed_hook_is_not_called(registry: HookRegistry) -> None:
    rec, other = Recorder(), Recorder()
    handle = registry.register(rec)
    registry.register(other)
    await registry.emit(EventType.SET, "a", b"1")
    handle.remove()
    handle.remove()
    assert not handle.active
    assert len(registry) == 1
    await registry.emit(EventType.SET, "b", b"2")
    await registry.emit_many(EventType.BATCH_SET, [("c", b"3")])
    assert rec.keys == ["a"]
    assert other.keys == ["a", "b", "c"]


async def test_removing_a_background_hook_mid_run_is_safe(
    registry: HookRegistry, loop_errors: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[str] = []

    async def hook(event: HookEvent) -> None:
        started.set()
        await release.wait()
        finished.append(event.key)

    handle = registry.register(hook, background=True)
    await registry.emit(EventType.SET, "k", b"v")
    await wait_for_flag(started)
    handle.remove()
    handle.remove()
    release.set()
    await registry.drain()
    await registry.emit(EventType.SET, "later", b"v")
    await registry.drain()
    gc.collect()
    await asyncio.sleep(0)

    assert finished == ["k"]  # the running call finished; no later call
    assert loop_errors == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_removing_a_background_hook_mid_batch_stops_delivery(registry: HookRegistry) -> None:
    seen: list[str] = []
    handle: HookHandle | None = None

    async def hook(event: HookEvent) -> None:
        seen.append(event.key)
        assert handle is not None
        handle.remove()
        await asyncio.sleep(0)

    handle = registry.register(hook, background=True)
    await registry.emit_many(EventType.BATCH_SET, [("a", b"1"), ("b", b"2")])
    await registry.drain()
    assert seen == ["a"]


async def test_hook_removing_itself_during_emit(registry: HookRegistry) -> None:
    first, last = Recorder(), Recorder()
    calls: list[str] = []
    handle: HookHandle | None = None

    def once(event: HookEvent) -> None:
        calls.append(event.key)
        assert handle is not None
        handle.remove()

    registry.register(first)
    handle = registry.register(once)
    registry.register(last)
    await registry.emit(EventType.SET, "a", b"1")
    await registry.emit(EventType.SET, "b", b"2")
    assert calls == ["a"]
    assert first.keys == ["a", "b"]
    assert last.keys == ["a", "b"]


async def test_hook_removing_a_later_hook_during_emit(registry: HookRegistry) -> None:
    victim = Recorder()
    victim_handle: HookHandle | None = None

    def remover(event: HookEvent) -> None:
        assert victim_handle is not None
        victim_handle.remove()

    registry.register(remover)
    victim_handle = registry.register(victim)
    await registry.emit(EventType.SET, "a", b"1")
    assert victim.events == []


async def test_hook_registering_another_during_emit(registry: HookRegistry) -> None:
    added = Recorder()
    handles: list[HookHandle] = []

    def registrar(event: HookEvent) -> None:
        if not handles:
            handles.append(registry.register(added))

    registry.register(registrar)
    await registry.emit(EventType.SET, "a", b"1")
    assert added.events == []  # the snapshot taken by this emit did not include it
    await registry.emit(EventType.SET, "b", b"2")
    assert added.keys == ["b"]


# -- drain and aclose ----------------------------------------------------------------


async def test_drain_waits_for_hooks_started_by_hooks(registry: HookRegistry) -> None:
    seen: list[str] = []

    async def chain(event: HookEvent) -> None:
        await asyncio.sleep(0.01)
        seen.append(event.key)
        if event.type is EventType.SET:
            await registry.emit(EventType.DELETE, event.key, None)

    registry.register(chain, background=True)
    await registry.emit(EventType.SET, "k", b"v")
    await registry.drain()
    assert seen == ["k", "k"]


@pytest.mark.parametrize("timeout", [None, 30.0])  # with a timeout, 3.10 runs the call in a task of its own
async def test_drain_inside_a_background_hook_does_not_deadlock(
    registry: HookRegistry, timeout: float | None
) -> None:
    done: list[bool] = []

    async def hook(event: HookEvent) -> None:
        await registry.drain()
        done.append(True)

    registry.register(hook, background=True, timeout=timeout)
    await registry.emit(EventType.SET, "k", b"v")
    await asyncio.wait_for(registry.drain(), 5)
    assert done == [True]


async def test_aclose_inside_a_background_hook_does_not_deadlock(
    registry: HookRegistry, loop_errors: list[dict[str, Any]]
) -> None:
    other_started = asyncio.Event()
    cancelled: list[str] = []
    closed: list[str] = []

    async def slow(event: HookEvent) -> None:
        other_started.set()
        try:
            await asyncio.sleep(WAIT)
        except asyncio.CancelledError:
            cancelled.append(event.key)
            raise

    async def closer(event: HookEvent) -> None:
        await other_started.wait()
        await registry.aclose()
        closed.append(event.key)

    registry.register(slow, background=True)
    registry.register(closer, background=True)
    await registry.emit(EventType.SET, "k", b"v")
    await asyncio.wait_for(registry.drain(), 5)
    assert closed == ["k"]
    assert cancelled == ["k"]
    assert loop_errors == []


async def test_a_background_hook_closing_its_client_runs_to_its_end(
    loop_errors: list[dict[str, Any]],
) -> None:
    # Client.close() runs in a task of its own: it must spare the hook that asked for
    # it (neither cancel it nor wait for it), as a hook calling hooks.aclose() is.
    backend = MemoryBackend()
    client = Client(backend)
    closed: list[str] = []

    async def closer(event: HookEvent) -> None:
        await client.close()
        closed.append(event.key)  # reached: the closing did not cancel this call

    client.hooks.register(closer, background=True, events=[EventType.SET])
    await client.set("k", 1)
    await asyncio.wait_for(client.hooks.drain(), 5)
    assert closed == ["k"]
    with pytest.raises(BackendUnavailableError):
        await backend.get("k")
    assert loop_errors == []


async def test_drain_with_nothing_running(registry: HookRegistry) -> None:
    # Returns at once (bounded: a drain waiting on nothing would hang here).
    await asyncio.wait_for(registry.drain(), 5)
    await asyncio.wait_for(registry.aclose(), 5)
    assert "running=0" in repr(registry)


async def test_aclose_cancels_running_background_calls(
    registry: HookRegistry, loop_errors: list[dict[str, Any]]
) -> None:
    started = asyncio.Event()
    cancelled: list[str] = []
    background_seen: list[str] = []
    sync_seen = Recorder()

    async def hook(event: HookEvent) -> None:
        background_seen.append(event.key)
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(event.key)
            raise

    registry.register(hook, background=True)
    registry.register(sync_seen)
    await registry.emit(EventType.SET, "k", b"v")
    await wait_for_flag(started)
    await asyncio.wait_for(registry.aclose(), 5)
    assert cancelled == ["k"]
    assert "running=0" in repr(registry)

    await registry.emit(EventType.SET, "after-close", b"v")
    await registry.emit_many(EventType.SET, [("after-close-2", b"v")])
    await registry.drain()
    assert background_seen == ["k"]  # background hooks no longer start
    assert sync_seen.keys == ["k", "after-close", "after-close-2"]  # synchronous hooks still run
    await registry.aclose()  # idempotent
    gc.collect()
    await asyncio.sleep(0)
    assert loop_errors == []


async def test_aclose_counts_and_logs_the_events_it_drops(
    registry: HookRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    started = asyncio.Event()

    async def slow(event: HookEvent) -> None:
        started.set()
        await asyncio.sleep(WAIT)

    handle = registry.register(slow, background=True)
    await registry.emit(EventType.SET, "k0", SECRET)
    await wait_for_flag(started)  # k0 is running: it is cancelled, not dropped
    await registry.emit_many(EventType.BATCH_SET, [("k1", SECRET), ("k2", SECRET)])
    with caplog.at_level(logging.WARNING, LOGGER):
        await asyncio.wait_for(registry.aclose(), 5)
        assert handle.dropped == 2  # queued before the close, never delivered
        # A write finishing after the close does not reach a background hook either.
        await registry.emit(EventType.SET, "k3", SECRET)
        assert handle.dropped == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert handle.id in warnings[0]
    assert "2" in warnings[0]
    assert "s3cr3t" not in warnings[0]
    assert "k1" not in warnings[0]


def test_a_worker_left_on_a_closed_loop_does_not_stall_the_next_loop() -> None:
    # A loop closed without cancelling its tasks (run_until_complete then close, as
    # code calling async from sync code often does) leaves a worker that never ends.
    registry = HookRegistry()
    seen: list[str] = []
    started = asyncio.Event()

    async def hook(event: HookEvent) -> None:
        seen.append(event.key)
        if event.key == "first":
            started.set()
            await asyncio.sleep(WAIT)

    async def first() -> None:
        registry.register(hook, background=True)
        await registry.emit(EventType.SET, "first", b"v")
        await wait_for_flag(started)

    old = asyncio.new_event_loop()
    try:
        old.run_until_complete(first())
    finally:
        old.close()

    async def second() -> None:
        await registry.emit(EventType.SET, "second", b"v")
        await asyncio.wait_for(registry.drain(), WAIT)  # hung on the old loop's worker
        assert seen == ["first", "second"]
        await asyncio.wait_for(registry.aclose(), WAIT)  # raised "Event loop is closed"

    asyncio.run(second())
    assert "running=0" in repr(registry)
