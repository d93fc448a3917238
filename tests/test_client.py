"""Tests of the Client itself, without a server: capability fallbacks, lifecycle, hooks, health, typing."""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import msgspec
import pytest

from kivigo_async import Client
from kivigo_async.backend import (
    AsyncBackend,
    BatchBackend,
    ConnectableBackend,
    HealthBackend,
    TransactionBackend,
    TTLBackend,
)
from kivigo_async.backends.memory import MemoryBackend
from kivigo_async.codecs import JsonCodec
from kivigo_async.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    DecodeError,
    HealthCheckError,
    InvalidArgumentError,
    InvalidKeyError,
    KeyNotFoundError,
    TransactionConflictError,
    UnsupportedOperationError,
)
from kivigo_async.hooks import EventType, HookEvent
from kivigo_async.watch import DEFAULT_MAX_PENDING, ChangeFeed, ChangeStream


class MinimalBackend:
    """Only the required AsyncBackend methods, recording every call."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.calls: list[tuple[str, str]] = []
        self.ttls: dict[str, int | None] = {}
        self.close_calls = 0
        self.fail_reads: Exception | None = None

    async def get(self, key: str) -> bytes | None:
        self.calls.append(("get", key))
        if self.fail_reads is not None:
            raise self.fail_reads
        return self.data.get(key)

    async def set(self, key: str, value: bytes, ttl_ms: int | None = None) -> None:
        self.calls.append(("set", key))
        self.data[key] = value
        self.ttls[key] = ttl_ms

    async def delete(self, key: str) -> bool:
        self.calls.append(("delete", key))
        return self.data.pop(key, None) is not None

    async def scan(self, prefix: str) -> AsyncIterator[str]:
        for key in list(self.data):
            if key.startswith(prefix):
                yield key

    async def close(self) -> None:
        self.close_calls += 1


class ConnectingBackend(MinimalBackend):
    """A backend that connects eagerly, optionally failing to."""

    def __init__(self, fail: Exception | None = None) -> None:
        super().__init__()
        self.fail = fail
        self.connect_calls = 0

    async def connect(self) -> None:
        self.connect_calls += 1
        if self.fail is not None:
            raise self.fail


# --------------------------------------------------------------------------- capabilities


def test_minimal_backend_has_only_the_required_capability() -> None:
    backend = MinimalBackend()
    assert isinstance(backend, AsyncBackend)
    for protocol in (BatchBackend, TTLBackend, HealthBackend, TransactionBackend, ConnectableBackend):
        assert not isinstance(backend, protocol), protocol


async def test_batches_are_emulated() -> None:
    backend = MinimalBackend()
    client = Client(backend)
    await client.batch_set({"a": 1, "b": [2], "c": {"x": 3}}, ttl=1.5)
    assert backend.ttls == {"a": 1500, "b": 1500, "c": 1500}
    assert sorted(k for op, k in backend.calls if op == "set") == ["a", "b", "c"]

    assert await client.batch_get(["c", "missing", "a", "a"]) == {"c": {"x": 3}, "a": 1}
    assert list(await client.batch_get(["c", "a"])) == ["c", "a"]  # input order
    assert await client.batch_get([]) == {}

    assert await client.has_keys(["a", "b"]) is True
    assert await client.has_keys(["a", "missing"]) is False
    assert await client.has_keys([]) is True
    assert await client.has_key("a") is True
    assert await client.has_key("missing") is False

    assert await client.batch_delete(["a", "b", "missing", "a"]) == 2
    assert list(backend.data) == ["c"]
    assert await client.list() == ["c"]


async def test_emulated_batches_run_concurrently() -> None:
    """Without BatchBackend the client gathers single calls rather than awaiting them in turn."""
    started: list[str] = []
    all_started, release = asyncio.Event(), asyncio.Event()

    class SlowBackend(MinimalBackend):
        async def get(self, key: str) -> bytes | None:
            started.append(key)
            if len(started) == 3:
                all_started.set()
            await release.wait()
            return await super().get(key)

    client = Client(SlowBackend())
    task = asyncio.create_task(client.batch_get(["a", "b", "c"]))
    # All three in flight before any of them returns; one at a time would never get there.
    await asyncio.wait_for(all_started.wait(), 10)
    release.set()
    assert await task == {}
    assert sorted(started) == ["a", "b", "c"]


@pytest.mark.parametrize("operation", ["batch_set", "batch_set_raw", "batch_delete"])
async def test_an_emulated_batch_that_fails_half_way_waits_for_every_call_and_tells_the_hooks(
    operation: str,
) -> None:
    # Key by key, a failed write does not undo the others: the batch returns only
    # once every call has ended (none still writing behind the caller's back), and
    # the hooks hear of the writes that were applied.
    finished: list[str] = []

    class OneKeyFails(MinimalBackend):
        async def set(self, key: str, value: bytes, ttl_ms: int | None = None) -> None:
            await self._slowly(key)
            await super().set(key, value, ttl_ms)
            finished.append(key)

        async def delete(self, key: str) -> bool:
            await self._slowly(key)
            existed = await super().delete(key)
            finished.append(key)
            return existed

        async def _slowly(self, key: str) -> None:
            if key == "bad":
                raise BackendError("refused")
            await asyncio.sleep(0.05)  # still running when "bad" fails

    backend = OneKeyFails()
    backend.data = {"a": b"1", "c": b"3"}
    client = Client(backend)
    events: list[tuple[EventType, str]] = []
    client.hooks.register(lambda e: events.append((e.type, e.key)))
    with pytest.raises(BackendError, match="refused"):
        if operation == "batch_set":
            await client.batch_set({"a": 1, "bad": 2, "c": 3})
        elif operation == "batch_set_raw":
            await client.batch_set_raw({"a": b"1", "bad": b"2", "c": b"3"})
        else:
            await client.batch_delete(["a", "bad", "c"])
    assert sorted(finished) == ["a", "c"]
    kind = EventType(operation)
    assert events == [(kind, "a"), (kind, "c")]


async def test_missing_capabilities_raise_unsupported() -> None:
    client = Client(MinimalBackend())
    await client.set("k", 1)
    with pytest.raises(UnsupportedOperationError, match="expire"):
        await client.expire("k", 10)
    with pytest.raises(UnsupportedOperationError, match="ttl"):
        await client.ttl("k")
    with pytest.raises(UnsupportedOperationError, match="persist"):
        await client.persist("k")
    with pytest.raises(UnsupportedOperationError, match="transaction"):
        client.transaction()
    with pytest.raises(NotImplementedError):  # UnsupportedOperationError is one
        await client.ttl("k")


async def test_health_falls_back_to_a_probe_read() -> None:
    backend = MinimalBackend()
    client = Client(backend)
    await client.health()
    assert [op for op, _ in backend.calls] == ["get"]

    down = BackendUnavailableError("backend down")
    backend.fail_reads = down
    with pytest.raises(HealthCheckError) as info:
        await client.health()
    assert info.value.errors == [down]
    assert info.value.__cause__ is down


# --------------------------------------------------------------------------- construction


class NoDecode:
    def encode(self, value: object) -> bytes:
        return b""


class NotCallable:
    encode = b"x"
    decode = b"y"


@pytest.mark.parametrize("backend", [object(), "redis://localhost", None, MemoryBackend])
def test_backend_must_implement_async_backend(backend: object) -> None:
    with pytest.raises(ConfigurationError, match="backend must"):
        Client(backend)  # type: ignore[arg-type]


@pytest.mark.parametrize("codec", [object(), NoDecode(), NotCallable(), JsonCodec])
def test_codec_must_encode_and_decode(codec: object) -> None:
    with pytest.raises(ConfigurationError, match="codec"):
        Client(MemoryBackend(), codec=codec)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- lifecycle


async def test_async_with_connects_and_closes() -> None:
    backend = ConnectingBackend()
    async with Client(backend) as client:
        assert backend.connect_calls == 1
        assert backend.close_calls == 0
        await client.set("k", 1)
    assert backend.close_calls == 1
    await client.close()
    await client.close()
    assert backend.close_calls == 1


async def test_a_closed_client_cannot_be_entered_again() -> None:
    backend = ConnectingBackend()
    client = Client(backend)
    async with client:
        pass
    with pytest.raises(BackendUnavailableError, match="was closed; create a new one"):
        async with client:
            pytest.fail("the body must not run")
    assert backend.connect_calls == 1  # the closed backend was not reconnected
    assert backend.close_calls == 1


async def test_async_with_closes_on_error() -> None:
    backend = MinimalBackend()
    with pytest.raises(KeyNotFoundError):
        async with Client(backend) as client:
            await client.get("missing")
    assert backend.close_calls == 1


async def test_failed_connect_closes_the_backend_and_raises() -> None:
    down = BackendUnavailableError("refused")
    backend = ConnectingBackend(fail=down)
    client = Client(backend)
    with pytest.raises(BackendUnavailableError) as info:
        async with client:
            pytest.fail("the body must not run")
    assert info.value is down
    assert backend.close_calls == 1


async def test_memory_backend_is_closed_by_the_client() -> None:
    backend = MemoryBackend()
    async with Client(backend) as client:
        await client.set("k", 1)
    with pytest.raises(BackendUnavailableError):
        await backend.get("k")


async def test_a_listing_under_way_fails_once_the_memory_backend_is_closed() -> None:
    # As on Redis, where the next page fails: no key is yielded after close().
    client = Client(MemoryBackend())
    await client.batch_set({f"k{i}": i for i in range(10)})
    keys = client.iter_keys("k")
    assert await keys.__anext__() == "k0"
    await client.close()
    with pytest.raises(BackendUnavailableError):
        await keys.__anext__()


class SlowWatchBackend(MemoryBackend):
    """A memory backend whose subscriptions take a while to release (like an UNSUBSCRIBE)."""

    def __init__(self) -> None:
        super().__init__()
        self.releasing = asyncio.Event()
        self.on_release: Callable[[], Awaitable[object]] | None = None

    async def watch(
        self, prefix: str, *, max_pending: int = DEFAULT_MAX_PENDING, configure_server: bool = True
    ) -> ChangeStream:
        async def release() -> None:
            self.releasing.set()
            if self.on_release is not None:
                await self.on_release()
            await asyncio.sleep(0.5)

        return ChangeFeed(max_pending=max_pending, release=release)


async def closing_in_a_watch_release(backend: SlowWatchBackend) -> tuple[Client, asyncio.Task[None]]:
    """A client on ``backend`` whose close() has started and waits for a watch to be released."""
    client = Client(backend)
    await client.watch("k").__aenter__()
    closing = asyncio.create_task(client.close())
    await asyncio.wait_for(backend.releasing.wait(), 10)
    return client, closing


async def test_close_releases_the_backend_even_when_cancelled() -> None:
    backend = SlowWatchBackend()
    client, closing = await closing_in_a_watch_release(backend)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    # The cancelled close() was the only one that could release the backend (a second
    # call would wait for it), so it must have closed it on the way out.
    with pytest.raises(BackendUnavailableError):
        await backend.get("k")
    await client.close()


async def test_a_second_close_returns_once_the_first_has_closed_the_backend() -> None:
    # An application that closes from two places (its shutdown hook and a signal
    # handler) must not go on to stop the loop with the connections still open.
    backend = SlowWatchBackend()
    client, closing = await closing_in_a_watch_release(backend)
    await asyncio.wait_for(client.close(), 10)
    with pytest.raises(BackendUnavailableError):
        await backend.get("k")
    await closing
    await client.close()  # and later calls return at once


async def test_a_second_close_that_gives_up_leaves_the_first_to_finish() -> None:
    backend = SlowWatchBackend()
    release = asyncio.Event()
    backend.on_release = release.wait  # the first close waits until the second has given up
    client, closing = await closing_in_a_watch_release(backend)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(client.close(), 0.05)
    release.set()
    await asyncio.wait_for(closing, 10)
    with pytest.raises(BackendUnavailableError):
        await backend.get("k")


async def test_a_close_waiting_for_the_first_gets_its_error() -> None:
    class FailingClose(MemoryBackend):
        async def close(self) -> None:
            await asyncio.sleep(0.1)
            await super().close()
            raise BackendUnavailableError("the connections could not be closed cleanly")

    client = Client(FailingClose())
    first, *others = await asyncio.gather(*(client.close() for _ in range(3)), return_exceptions=True)
    assert isinstance(first, BackendUnavailableError), first
    assert all(other is first for other in others)
    # Raised as the first close left it, plus one waiter's frames: not every waiter's.
    waiting = [frame for frame in traceback.extract_tb(first.__traceback__) if frame.name == "_wait_closed"]
    assert len(waiting) <= 1
    await client.close()  # reported to all: closing again raises nothing


async def test_a_close_waiting_for_a_cancelled_one_waits_for_the_backend() -> None:
    # The first close is cancelled while the backend closes, which goes on detached
    # (as the Redis backends' close does): the one waiting must wait for that too.
    class DetachedClose(MemoryBackend):
        def __init__(self) -> None:
            super().__init__()
            self.closing = asyncio.Event()
            self._task: asyncio.Task[None] | None = None

        async def close(self) -> None:
            if self._task is None:
                self._task = asyncio.ensure_future(self._close_slowly())
            await asyncio.shield(self._task)

        async def _close_slowly(self) -> None:
            self.closing.set()
            await asyncio.sleep(0.3)
            await MemoryBackend.close(self)

    backend = DetachedClose()
    client = Client(backend)
    first = asyncio.create_task(client.close())
    await asyncio.wait_for(backend.closing.wait(), 10)
    second = asyncio.create_task(client.close())
    await asyncio.sleep(0)  # the second is waiting
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 10)
    with pytest.raises(BackendUnavailableError):
        await backend.get("k")


async def test_a_close_from_inside_the_first_close_returns_at_once() -> None:
    # The watch release runs in the closing task: waiting there for the close to
    # finish would never end.
    backend = SlowWatchBackend()
    client = Client(backend)
    backend.on_release = client.close
    await client.watch("k").__aenter__()
    await asyncio.wait_for(client.close(), 10)
    with pytest.raises(BackendUnavailableError):
        await backend.get("k")


@pytest.mark.parametrize("timeout", [None, 30.0])  # with a timeout, 3.10 runs the call in a task of its own
async def test_a_close_from_a_stopped_background_hook_returns_at_once(timeout: float | None) -> None:
    client = Client(MemoryBackend())
    started = asyncio.Event()
    closed_inside: list[bool] = []

    async def hook(event: HookEvent) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        finally:  # the first close cancels this call and waits for it to end
            await client.close()
            closed_inside.append(True)

    client.hooks.register(hook, background=True, timeout=timeout)
    await client.set("k", 1)
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.wait_for(client.close(), 10)
    assert closed_inside == [True]


async def test_a_close_from_a_stopped_get_or_set_factory_returns_at_once() -> None:
    client = Client(MemoryBackend())
    started = asyncio.Event()

    async def factory() -> int:
        started.set()
        try:
            await asyncio.sleep(60)
        finally:  # the first close cancels the fill and waits for it to end
            await client.close()
        return 1

    fill = asyncio.create_task(client.get_or_set("k", factory))
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.wait_for(client.close(), 10)
    with pytest.raises(BackendUnavailableError):
        await fill


# --------------------------------------------------------------------------- hooks


@pytest.fixture
async def memory_client() -> AsyncIterator[Client]:
    async with Client(MemoryBackend()) as client:
        yield client


async def test_hook_events_for_ttl_changes(memory_client: Client) -> None:
    events: list[HookEvent] = []
    memory_client.hooks.register(events.append, events=[EventType.EXPIRE, EventType.PERSIST])
    await memory_client.set("k", 1)
    assert await memory_client.expire("k", 30)
    assert await memory_client.persist("k")
    assert not await memory_client.persist("k")  # no TTL left: nothing changed, no event
    assert not await memory_client.expire("missing", 30)
    assert [(e.type, e.key, e.value) for e in events] == [
        (EventType.EXPIRE, "k", None),
        (EventType.PERSIST, "k", None),
    ]


async def test_hook_events_for_deletes_of_present_and_missing_keys(memory_client: Client) -> None:
    # The key is gone afterwards either way: an invalidating hook hears of both.
    events: list[HookEvent] = []
    memory_client.hooks.register(events.append, events=[EventType.DELETE, EventType.BATCH_DELETE])
    await memory_client.set("here", 1)
    assert await memory_client.delete("here")
    assert not await memory_client.delete("missing")
    await memory_client.set("a", 1)
    assert await memory_client.batch_delete(["a", "b", "a"]) == 1
    assert [(e.type, e.key) for e in events] == [
        (EventType.DELETE, "here"),
        (EventType.DELETE, "missing"),
        (EventType.BATCH_DELETE, "a"),
        (EventType.BATCH_DELETE, "b"),
    ]
    events.clear()
    with pytest.raises(InvalidKeyError):
        await memory_client.delete("")
    assert events == []  # a refused call fires nothing


async def test_hook_events_for_transaction_writes(memory_client: Client) -> None:
    events: list[HookEvent] = []
    memory_client.hooks.register(events.append)
    await memory_client.set("old", 1)
    events.clear()

    async with memory_client.transaction() as tx:
        tx.set("a", 1)
        tx.delete("old")
        assert events == []  # queued, not yet applied
    assert [(e.type, e.key) for e in events] == [(EventType.SET, "a"), (EventType.DELETE, "old")]
    assert events[0].value == b"1"

    events.clear()
    with pytest.raises(RuntimeError):
        async with memory_client.transaction() as tx:
            tx.set("b", 2)
            raise RuntimeError("abandon")
    assert events == []

    await memory_client.set("w", 1)
    events.clear()
    with pytest.raises(TransactionConflictError):
        async with memory_client.transaction(watch=["w"]) as tx:
            await memory_client.set("w", 2)  # a concurrent writer
            events.clear()
            tx.set("c", 3)
    assert events == []
    assert not await memory_client.has_key("c")


async def test_failing_hooks_never_fail_the_operation(
    memory_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    def sync_fails(event: HookEvent) -> None:
        raise ValueError("sync hook broke")

    async def async_fails(event: HookEvent) -> None:
        raise RuntimeError("async hook broke")

    seen: list[str] = []
    memory_client.hooks.register(sync_fails)
    memory_client.hooks.register(async_fails)
    memory_client.hooks.register(async_fails, background=True)
    memory_client.hooks.register(lambda e: seen.append(e.key))  # later hooks still run

    with caplog.at_level(logging.ERROR, logger="kivigo_async.hooks"):
        await memory_client.set("k", 1, ttl=60)
        await memory_client.batch_set({"a": 1, "b": 2})
        assert await memory_client.expire("k", 30)
        assert await memory_client.persist("k")
        async with memory_client.transaction() as tx:
            tx.set("t", 1)
        assert await memory_client.delete("k")
        await memory_client.hooks.drain()

    assert seen == ["k", "a", "b", "k", "k", "t", "k"]
    assert await memory_client.batch_get(["a", "b", "t"]) == {"a": 1, "b": 2, "t": 1}
    assert "sync hook broke" in caplog.text
    assert "async hook broke" in caplog.text


# --------------------------------------------------------------------------- health


async def test_health_extra_checks(memory_client: Client) -> None:
    seen: list[Client] = []

    async def ok(client: Client) -> None:
        seen.append(client)

    async def broken(client: Client) -> None:
        raise RuntimeError("queue unreachable")

    await memory_client.health()
    await memory_client.health(ok, ok)
    assert seen == [memory_client, memory_client]

    with pytest.raises(HealthCheckError, match="queue unreachable") as info:
        await memory_client.health(ok, broken, broken)
    assert len(info.value.errors) == 2
    assert all(isinstance(e, RuntimeError) for e in info.value.errors)


async def test_health_collects_backend_and_check_failures() -> None:
    backend = MinimalBackend()
    backend.fail_reads = BackendUnavailableError("down")

    async def broken(client: Client) -> None:
        raise RuntimeError("also down")

    with pytest.raises(HealthCheckError) as info:
        await Client(backend).health(broken)
    assert [type(e) for e in info.value.errors] == [BackendUnavailableError, RuntimeError]


async def test_health_accepts_plain_function_checks(memory_client: Client) -> None:
    calls: list[str] = []

    def ok(client: Client) -> None:
        calls.append("ok")

    def broken(client: Client) -> None:
        raise RuntimeError("flag store unreachable")

    await memory_client.health(ok)
    with pytest.raises(HealthCheckError, match="flag store unreachable") as info:
        await memory_client.health(ok, broken)
    assert calls == ["ok", "ok"]
    assert [type(e) for e in info.value.errors] == [RuntimeError]


@pytest.mark.parametrize("check", [None, "ping", 42])
async def test_health_rejects_a_check_that_is_not_callable(memory_client: Client, check: object) -> None:
    with pytest.raises(InvalidArgumentError, match="health check must be callable"):
        await memory_client.health(check)  # type: ignore[arg-type]


async def test_health_checks_run_concurrently(memory_client: Client) -> None:
    # Each check waits for the other to start: run one after the other, they would never finish.
    first, second = asyncio.Event(), asyncio.Event()

    async def check_a(client: Client) -> None:
        first.set()
        await second.wait()

    async def check_b(client: Client) -> None:
        second.set()
        await first.wait()

    await asyncio.wait_for(memory_client.health(check_a, check_b), 10)


async def test_health_does_not_swallow_cancellation(memory_client: Client) -> None:
    async def hangs(client: Client) -> None:
        await asyncio.sleep(3600)

    task = asyncio.create_task(memory_client.health(hangs))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_get_with_none_as_the_type_points_to_default(memory_client: Client) -> None:
    await memory_client.set("k", {"a": 1})
    async with memory_client.transaction() as tx:
        with pytest.raises(InvalidArgumentError, match="did you mean default=None"):
            await tx.get("k", None)  # type: ignore[call-overload]
    for key in ("k", "missing"):
        with pytest.raises(InvalidArgumentError, match="did you mean default=None"):
            await memory_client.get(key, None)  # type: ignore[call-overload]
    await memory_client.set("null", None)
    assert await memory_client.get("null", type(None)) is None  # type: ignore[func-returns-value]


# --------------------------------------------------------------------------- typing


class User(msgspec.Struct):
    name: str
    age: int


@dataclass
class Point:
    x: int
    y: int


async def test_typed_api(memory_client: Client) -> None:
    """Checked by mypy --strict: each annotation must match the overload picked."""
    await memory_client.batch_set({"n": 7, "u": {"name": "Ada", "age": 36}, "p": {"x": 1, "y": 2}})

    n: int = await memory_client.get("n", int)
    user: User = await memory_client.get("u", User)
    point: Point = await memory_client.get("p", Point)
    maybe: int | None = await memory_client.get("missing", int, default=None)
    fallback: int = await memory_client.get("missing", int, default=0)
    many: dict[str, int] = await memory_client.batch_get(["n", "missing"], int)
    keys: list[str] = await memory_client.list()
    existed: bool = await memory_client.delete("n")
    removed: int = await memory_client.batch_delete(["u"])
    remaining: float | None = await memory_client.ttl("p")
    raw: bytes = await memory_client.get_raw("p")

    assert n == 7
    assert user == User("Ada", 36)
    assert point == Point(1, 2)
    assert maybe is None
    assert fallback == 0
    assert many == {"n": 7}
    assert keys == ["n", "p", "u"]
    assert existed is True
    assert removed == 1
    assert remaining is None
    assert raw == b'{"x":1,"y":2}'


async def test_a_union_type_is_accepted_by_the_type_checker_and_decoded(memory_client: Client) -> None:
    # mypy --strict checks these calls: a union is not a class (type[T] refuses it).
    await memory_client.batch_set({"n": 5, "none": None})
    assert await memory_client.get("n", int | None) == 5
    assert await memory_client.get("none", int | None) is None
    assert await memory_client.get("missing", int | None, default=0) == 0
    assert await memory_client.batch_get(["n", "none"], int | None) == {"n": 5, "none": None}
    with pytest.raises(DecodeError):
        await memory_client.get("n", str | None)

    async def load() -> int | None:
        return 7

    assert await memory_client.get_or_set("filled", load, type=int | None) == 7
    assert await memory_client.get_or_set("filled", load, type=int | None) == 7
    async with memory_client.transaction() as tx:
        assert await tx.get("n", int | None) == 5
