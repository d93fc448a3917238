"""Shared fixtures: Redis backends on every server variant this machine can start."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import subprocess
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import msgspec
import pytest
import redis

from kivigo_async import AsyncBackend, Client
from kivigo_async.backends.redis import LocalCache, RedisBackend, RedisOptions
from kivigo_async.errors import BackendUnavailableError, HealthCheckError
from kivigo_async.testing.pytest_plugin import require_server
from kivigo_async.testing.servers import EXTERNAL_URL_ENV, Server, ServerPool

#: Every (kind, variant, transport) the conformance suite runs on: the default
#: multiplexed connection everywhere, and the connection pool (auto_pipeline=False)
#: on one server of each kind and on TLS. Unavailable ones skip locally and fail
#: in CI; "external" is there only when KIVIGO_TEST_REDIS_URL names a server.
REDIS_TARGETS = [
    ("valkey", "plain", "mux"),
    ("valkey", "password", "mux"),
    ("valkey", "acl", "mux"),
    ("redis", "plain", "mux"),
    ("redis", "password", "mux"),
    ("redis", "acl", "mux"),
    ("redis", "tls", "mux"),
    ("valkey", "plain", "pool"),
    ("redis", "acl", "pool"),
    ("redis", "tls", "pool"),
]
if os.environ.get(EXTERNAL_URL_ENV):
    REDIS_TARGETS.append(("external", "plain", "mux"))


def pytest_configure(config: pytest.Config) -> None:
    workers = getattr(config.option, "numprocesses", None)
    if os.environ.get(EXTERNAL_URL_ENV) and workers not in (None, 0, 1):
        # Every worker would flush that one database under the others' tests.
        raise pytest.UsageError(f"{EXTERNAL_URL_ENV} names one shared server: run the tests with -n 0")


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = 15.0, what: str | None = None
) -> None:
    """Poll ``check`` (plain or async) until it is true, in the calling task.

    Fails with ``what`` (what never happened) after ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if result if isinstance(result, bool) else await result:
            return
        if loop.time() > deadline:
            raise AssertionError(what or f"still false after {timeout} s")
        await asyncio.sleep(0.02)


def chain_text(exc: BaseException) -> str:
    """Everything a log line could show about ``exc``: messages, reprs, causes, traceback."""
    parts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts += [str(current), repr(current)]
        if isinstance(current, HealthCheckError):
            parts += [chain_text(e) for e in current.errors]
        # The chain a traceback prints: an explicit cause, else an unsuppressed context.
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return "\n".join(parts)


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections while the block runs.

    Bound but not listening: the kernel refuses every connection to it, and no
    other process can take it meanwhile, as it could a port merely found free.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def run_child(
    args: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a child process that may start servers, and fail the test if it outlives ``timeout``.

    Unlike ``subprocess.run``, which kills a child that times out (SIGKILL: the
    servers it started outlive it), this asks it to stop with SIGTERM first,
    which our scripts turn into a clean exit that stops their servers.
    """
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:  # a timeout, or this test run being interrupted
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            pytest.fail(f"{list(args)} ran past {timeout} s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
        raise
    return subprocess.CompletedProcess(list(args), proc.returncode, out, err)


async def cancel_close_after(client: Client, turns: int) -> None:
    """Start ``client.close()``, cancel it after ``turns`` loop iterations, then close again."""
    closing = asyncio.ensure_future(client.close())
    for _ in range(turns):
        await asyncio.sleep(0)
    closing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await closing
    await client.close()  # returns at once: the first call was the one that counted


async def check_a_failed_close_is_reported_once(
    backend: AsyncBackend, driver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Make ``driver.aclose()`` (redis-py's, under ``backend``) fail: the calls under way
    get the error, later ones do not."""
    real = driver.aclose

    async def failing_aclose() -> None:
        await real()  # the connections are released; the error is what is being tested
        raise redis.ConnectionError("connection reset")

    monkeypatch.setattr(driver, "aclose", failing_aclose)
    first, second = await asyncio.gather(backend.close(), backend.close(), return_exceptions=True)
    assert isinstance(first, BackendUnavailableError), first
    assert second is first
    await backend.close()  # it was reported: closing again raises nothing


# Types whose own code refuses a stored value with a message that quotes it: what
# a decode error must not repeat (the value may be a secret).


@dataclasses.dataclass
class CheckedCard:
    number: str

    def __post_init__(self) -> None:
        if not self.number.isdigit():
            raise ValueError(f"not a card number: {self.number!r}")


class CheckedStruct(msgspec.Struct):
    number: str

    def __post_init__(self) -> None:
        if not self.number.isdigit():
            # Text that reads like msgspec's location, to be taken for it.
            raise TypeError(f"not a card number: {self.number} - at `$.{self.number}`")


def checked_card_models() -> Any:
    """``list[CardModel]``: a pydantic model whose validator refuses with a TypeError
    (pydantic lets those through), inside a msgspec type."""
    pydantic = pytest.importorskip("pydantic")

    class CardModel(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        number: str

        @pydantic.field_validator("number")  # type: ignore[untyped-decorator]
        @classmethod
        def digits(cls, number: str) -> str:
            if not number.isdigit():
                raise TypeError(f"not a card number: {number!r}")
            return number

    return list[CardModel]


def redis_options(server: Server, **overrides: Any) -> RedisOptions:
    """RedisOptions that reach ``server`` with its credentials and CA."""
    return RedisOptions(
        addr=f"{server.host}:{server.port}",
        username=server.username,
        password=server.password,
        db=server.db,
        tls=server.ssl_context() if server.tls else False,
        **overrides,
    )


@pytest.fixture(params=REDIS_TARGETS, ids=lambda t: "-".join(t))
def redis_target(request: pytest.FixtureRequest, kivigo_server_pool: ServerPool) -> tuple[Server, bool]:
    """A target server, and whether to use the multiplexed connection on it."""
    kind, variant, transport = request.param
    server: Server = require_server(kivigo_server_pool, kind, variant)
    return server, transport == "mux"


@pytest.fixture
async def redis_backend(redis_target: tuple[Server, bool]) -> AsyncIterator[RedisBackend]:
    """A RedisBackend on an empty database of each target server."""
    server, auto_pipeline = redis_target
    backend = RedisBackend(redis_options(server, auto_pipeline=auto_pipeline))
    await backend.redis.flushdb()
    yield backend
    await backend.close()


class Invalidations:
    """Waits for client-cache invalidations of given keys (``None``: a flush), never by sleeping."""

    def __init__(self, cache: LocalCache) -> None:
        self.seen: list[str | None] = []
        self._event = asyncio.Event()
        self.remove = cache.add_listener(self._on)

    def _on(self, key: str | None) -> None:
        self.seen.append(key)
        self._event.set()

    async def wait_for(self, key: str | None, timeout: float = 10.0, *, count: int = 1) -> None:
        async def until() -> None:
            while self.seen.count(key) < count:
                self._event.clear()
                await self._event.wait()

        await asyncio.wait_for(until(), timeout)

    async def wait_for_more(self, before: dict[str, int], more: int = 1) -> None:
        """Wait until each key of ``before`` (key -> count seen then) is seen ``more`` times again."""
        for key, count in before.items():
            await self.wait_for(key, count=count + more)

    def counts(self, keys: list[str]) -> dict[str, int]:
        return {key: self.seen.count(key) for key in keys}
