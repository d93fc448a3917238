"""Redis-specific behaviour of RedisBackend, on real Valkey and Redis servers.

The conformance suite covers what every backend must do; these tests pin down
how the Redis backend does it (hiredis, one round trip per batch, SCAN,
millisecond TTLs, MULTI/EXEC with WATCH) and how it fails: configuration and
URL errors, refused and unauthenticated connections, ACL denials, timeouts,
cancellation and connection pool accounting.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import random
import ssl
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import hiredis
import pytest
import redis.asyncio as aioredis
import trustme
from conftest import chain_text, check_a_failed_close_is_reported_once, redis_options, refused_port
from redis._parsers import _AsyncHiredisParser

from kivigo_async import Client
from kivigo_async.backends.redis import RedisBackend, RedisClusterOptions, RedisOptions, RedisSentinelOptions
from kivigo_async.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    HealthCheckError,
    InvalidKeyError,
    KivigoError,
    OperationTimeoutError,
    PermissionDeniedError,
    TransactionConflictError,
)
from kivigo_async.testing.pytest_plugin import ServerFactory, require_server
from kivigo_async.testing.servers import BinaryKind, RedisServer, Server, ServerPool

# --------------------------------------------------------------------------- helpers

#: Every test it marks runs on both transports.
TRANSPORTS = pytest.mark.parametrize("auto_pipeline", [True, False], ids=["multiplexed", "pool"])


@pytest.fixture(params=["valkey", "redis"])
def kind(request: pytest.FixtureRequest) -> BinaryKind:
    value: BinaryKind = request.param
    return value


@pytest.fixture
def server(kivigo_server_pool: ServerPool, kind: BinaryKind) -> RedisServer:
    """A shared plain server of each kind (tests must leave it unpaused)."""
    return require_server(kivigo_server_pool, kind, "plain")


@pytest.fixture
def private_server(redis_server_factory: ServerFactory, kind: BinaryKind) -> RedisServer:
    """A server of our own, for tests that reset its statistics or pause it."""
    return redis_server_factory(kind)


def control_client(server: Server, db: int | None = None) -> aioredis.Redis:
    """A plain redis-py client to inspect and steer the server behind the backend's back."""
    return aioredis.Redis(
        host=server.host,
        port=server.port,
        db=server.db if db is None else db,
        username=server.username,
        password=server.password,
        ssl=server.tls,
        ssl_ca_certs=server.ca_path,
    )


@pytest.fixture
async def control(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = control_client(server)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def private_control(private_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = control_client(private_server)
    yield client
    await client.aclose()


@pytest.fixture
async def backend(server: RedisServer, control: aioredis.Redis) -> AsyncIterator[RedisBackend]:
    b = RedisBackend(redis_options(server))
    yield b
    await b.close()


def unique_name() -> str:
    return f"kivigo-test-{uuid.uuid4().hex[:10]}"


async def command_calls(control: aioredis.Redis) -> dict[str, int]:
    """Calls per command since the last ``CONFIG RESETSTAT`` (``{"mget": 1, ...}``)."""
    stats: dict[str, Any] = await control.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}


async def run(control: aioredis.Redis, *args: str) -> Any:
    """One command on the control client, by name (for those redis-py leaves untyped)."""
    execute: Callable[..., Awaitable[Any]] = control.execute_command
    return await execute(*args)


async def pause(control: aioredis.Redis, ms: int, mode: str = "ALL") -> None:
    """``CLIENT PAUSE ms ALL``: the server holds every client's replies (even ``UNPAUSE``) for ``ms``.

    ``mode="WRITE"`` holds only the clients that write.
    """
    await run(control, "CLIENT", "PAUSE", str(ms), mode)


async def named_connections(control: aioredis.Redis, name: str) -> int:
    clients: list[dict[str, Any]] = await control.client_list()
    return sum(1 for c in clients if c.get("name") == name)


async def wait_for_connections(control: aioredis.Redis, name: str, expected: int) -> int:
    """Poll ``CLIENT LIST`` until ``expected`` connections are named ``name`` (5 s at most)."""
    deadline = time.monotonic() + 5.0
    while True:
        count = await named_connections(control, name)
        if count == expected or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.02)


def assert_ours(exc: BaseException) -> None:
    """The error is one of ours, never a redis-py type leaking out."""
    assert type(exc).__module__.startswith("kivigo_async"), type(exc)
    assert isinstance(exc, KivigoError)


E = TypeVar("E", bound=BaseException)


async def raises_within(
    expected: type[E], call: Callable[[], Awaitable[object]], bound: float
) -> tuple[E, float]:
    """Await ``call()``, expect ``expected`` and return it with the time it took."""
    start = time.monotonic()
    with pytest.raises(expected) as info:
        # A hang must fail the test rather than stall the run.
        await asyncio.wait_for(call(), bound + 30)
    elapsed = time.monotonic() - start
    assert elapsed < bound, f"took {elapsed:.2f} s"
    return info.value, elapsed


# --------------------------------------------------------------------------- parser


@pytest.mark.server
@pytest.mark.parametrize("protocol", [2, 3])
async def test_pooled_connections_use_the_hiredis_parser(server: RedisServer, protocol: int) -> None:
    backend = RedisBackend(redis_options(server, protocol=protocol, auto_pipeline=False))
    try:
        await backend.set("parser:k", b"v")
        assert await backend.get("parser:k") == b"v"
        conns = backend.redis.connection_pool._available_connections
        assert conns, "the connection went back to the pool"
        for conn in conns:
            assert type(conn._parser) is _AsyncHiredisParser
        await backend.delete("parser:k")
    finally:
        await backend.close()


@pytest.mark.server
async def test_multiplexed_connection_uses_the_hiredis_parser(server: RedisServer) -> None:
    backend = RedisBackend(redis_options(server))
    try:
        await backend.set("parser:k", b"v")
        assert await backend.get("parser:k") == b"v"
        assert backend._mux is not None
        protocol = backend._mux._protocol
        assert protocol is not None
        assert type(protocol._reader) is hiredis.Reader
        await backend.delete("parser:k")
    finally:
        await backend.close()


# --------------------------------------------------------------------------- round trips


@pytest.mark.server
async def test_batch_calls_are_one_command_each(
    private_server: RedisServer, private_control: aioredis.Redis
) -> None:
    keys = [f"batch:{i}" for i in range(100)]
    async with Client(RedisBackend(redis_options(private_server))) as client:
        await private_control.config_resetstat()
        await client.batch_set({k: i for i, k in enumerate(keys)})
        calls = await command_calls(private_control)
        assert calls.get("mset") == 1
        assert "set" not in calls

        await private_control.config_resetstat()
        assert await client.batch_get(keys, int) == {k: i for i, k in enumerate(keys)}
        calls = await command_calls(private_control)
        assert calls.get("mget") == 1
        assert "get" not in calls

        await private_control.config_resetstat()
        start = time.monotonic()
        await client.batch_set({k: -i for i, k in enumerate(keys)}, ttl=30.5)
        pttls = await asyncio.gather(*(private_control.pttl(k) for k in keys))
        elapsed_ms = (time.monotonic() - start) * 1000
        calls = await command_calls(private_control)
        assert (calls.get("multi"), calls.get("set"), calls.get("exec")) == (1, 100, 1)
        assert "mset" not in calls
        # SET ... PX in the same command, not a separate (P)EXPIRE, and not whole seconds (EX).
        assert not {"expire", "pexpire"} & calls.keys()
        assert all(30_500 - elapsed_ms - 2 <= t <= 30_500 for t in pttls), (elapsed_ms, pttls)

        await private_control.config_resetstat()
        assert await client.batch_delete([*keys, "batch:missing"]) == 100
        calls = await command_calls(private_control)
        assert calls.get("unlink") == 1
        assert "del" not in calls


@pytest.mark.server
async def test_list_uses_scan_never_keys(
    private_server: RedisServer, private_control: aioredis.Redis
) -> None:
    async with Client(RedisBackend(redis_options(private_server))) as client:
        await client.batch_set({f"scan:{i:04d}": i for i in range(2500)} | {"other": 0})
        await private_control.config_resetstat()
        listed = await client.list("scan:")
        assert listed == [f"scan:{i:04d}" for i in range(2500)]
        assert [k async for k in client.iter_keys("oth")] == ["other"]
        calls = await command_calls(private_control)
        assert calls.get("scan", 0) >= 2
        assert "keys" not in calls


# --------------------------------------------------------------------------- TTL precision


@pytest.mark.server
async def test_ttl_keeps_millisecond_precision(backend: RedisBackend, control: aioredis.Redis) -> None:
    client = Client(backend)
    start = time.monotonic()
    await client.set("ttl:k", "v", ttl=1.234)
    pttl = await control.pttl("ttl:k")
    elapsed_ms = (time.monotonic() - start) * 1000
    # A whole-second EX would leave at most 1000 ms; the upper bound is what we asked for.
    assert 1234 - elapsed_ms - 2 <= pttl <= 1234
    if elapsed_ms < 130:
        assert pttl >= 1100

    await client.batch_set({"ttl:a": 1, "ttl:b": 2}, ttl=2.345)
    await client.expire("ttl:k", 3.456)
    pttls = [await control.pttl(k) for k in ("ttl:a", "ttl:b", "ttl:k")]
    elapsed_ms = (time.monotonic() - start) * 1000
    for got, wanted in zip(pttls, (2345, 2345, 3456), strict=True):
        assert wanted - elapsed_ms - 2 <= got <= wanted
    remaining = await client.ttl("ttl:k")
    elapsed = time.monotonic() - start  # measured after the read: the server's clock read earlier
    assert remaining is not None
    assert 3.456 - elapsed - 0.002 <= remaining <= 3.456


# --------------------------------------------------------------------------- transactions


@pytest.mark.server
async def test_transactions_use_multi_exec_and_watch(
    private_server: RedisServer, private_control: aioredis.Redis
) -> None:
    async with Client(RedisBackend(redis_options(private_server))) as client:
        await client.set("tx:stock", 5)
        await private_control.config_resetstat()
        async with client.transaction(watch=["tx:stock"]) as tx:
            stock = await tx.get("tx:stock", int)
            tx.set("tx:stock", stock - 1)
            tx.set("tx:order", {"item": 1}, ttl=60)
            tx.delete("tx:gone")
        calls = await command_calls(private_control)
        assert (calls.get("watch"), calls.get("multi"), calls.get("exec")) == (1, 1, 1)
        assert await client.get("tx:stock", int) == 4
        assert 0 < await private_control.pttl("tx:order") <= 60_000

        async with client.transaction() as tx:
            tx.set("tx:plain", 1)
        calls = await command_calls(private_control)
        assert (calls.get("watch"), calls.get("multi"), calls.get("exec")) == (1, 2, 2)


@pytest.mark.server
async def test_watch_conflict_writes_nothing(backend: RedisBackend, control: aioredis.Redis) -> None:
    client = Client(backend)
    await client.set("tx:stock", 5)
    with pytest.raises(TransactionConflictError) as info:
        async with client.transaction(watch=["tx:stock"]) as tx:
            stock = await tx.get("tx:stock", int)
            await control.set("tx:stock", b"99")  # another process wins the race
            tx.set("tx:stock", stock - 1)
            tx.set("tx:order", "placed")
            tx.delete("tx:keep")
    assert_ours(info.value)
    assert await control.get("tx:stock") == b"99"
    assert await control.exists("tx:order") == 0
    # The watching connection went back to the pool clean: later calls work.
    await client.set("tx:after", 1)
    assert await client.get("tx:after") == 1


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pool_size": -1},
        {"pool_size": 0},
        {"pool_size": 2, "min_idle_conns": 3},
        {"min_idle_conns": -1},
        {"max_retries": -1},
        {"db": -1},
        {"db": True},
        {"db": "1"},
        {"addr": ""},
        {"addr": "localhost"},
        {"addr": "localhost:abc"},
        {"addr": "localhost:0"},
        {"addr": "localhost:70000"},
        {"addr": ":6379"},
        {"network": "udp"},
        {"read_timeout": 1.0, "write_timeout": 2.0},
        {"read_timeout": None, "write_timeout": 2.0},
        {"dial_timeout": 0},
        {"read_timeout": -1.0},
        {"pool_timeout": float("nan")},
        {"dial_timeout": float("inf")},
        {"read_timeout": "3"},
        {"tls": "yes"},
        {"network": "unix", "addr": "/tmp/redis.sock", "tls": True},
        {"protocol": 1},
        {"protocol": 4},
        {"protocol": "3"},
        # Client names the server refuses on every connect: refused here instead.
        {"client_name": "my app"},
        {"client_name": "a\nb"},
        {"client_name": "caf\u00e9"},
        {"client_name": ""},
        {"client_name": 3},
    ],
)
def test_bad_options_raise_configuration_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        RedisOptions(**kwargs)


def test_good_options() -> None:
    default = RedisOptions.default()
    assert (default.addr, default.host, default.port, default.db) == ("localhost:6379", "localhost", 6379, 0)
    assert default.pool_size >= 1
    assert default.ssl_context() is None
    assert RedisOptions(read_timeout=2.0, write_timeout=2.0).write_timeout == 2.0
    v6 = RedisOptions(addr="[::1]:6380")
    assert (v6.host, v6.port) == ("::1", 6380)
    assert RedisOptions(network="unix", addr="/run/redis.sock").network == "unix"
    assert default.replace(db=3).db == 3
    with pytest.raises(ConfigurationError):
        default.replace(db=-3)
    with pytest.raises(ConfigurationError, match="bogus"):  # a misspelt option, as from_url says
        default.replace(bogus=1)
    assert RedisOptions(client_name="orders-api:v2").client_name == "orders-api:v2"


def test_tls_true_verifies_certificates() -> None:
    ctx = RedisOptions(tls=True).ssl_context()
    assert ctx is not None
    assert ctx.check_hostname is True
    assert ctx.verify_mode == ssl.CERT_REQUIRED


def test_credentials_never_in_repr() -> None:
    secret = "s3cret-" + uuid.uuid4().hex
    user = "user-" + uuid.uuid4().hex
    opts = RedisOptions(addr="cache:6379", username=user, password=secret)
    backend = RedisBackend(opts)
    from_url = RedisOptions.from_url(f"redis://{user}:{secret}@cache:6379/1")
    texts = [repr(opts), str(opts), repr(backend), repr(Client(backend)), repr(from_url)]
    assert all(secret not in t and user not in t for t in texts), texts
    assert "cache:6379" in repr(opts)


# --------------------------------------------------------------------------- URLs


def test_from_url_parses_credentials_port_and_db() -> None:
    opts = RedisOptions.from_url("redis://user:p%40ss@host:6380/2")
    assert (opts.addr, opts.username, opts.password, opts.db) == ("host:6380", "user", "p@ss", 2)
    assert opts.network == "tcp"
    assert opts.tls is False

    bare = RedisOptions.from_url("redis://:only-password@host")
    assert (bare.addr, bare.username, bare.password, bare.db) == ("host:6379", None, "only-password", 0)

    v6 = RedisOptions.from_url("redis://[::1]:6381/0?client_name=api&pool_size=7&read_timeout=0.5")
    assert (v6.host, v6.port, v6.client_name, v6.pool_size, v6.read_timeout) == ("::1", 6381, "api", 7, 0.5)

    assert RedisOptions.from_url("redis://host/1", db=4, pool_size=3).db == 4
    backend = RedisBackend.from_url("redis://user:p%40ss@host:6380/2")
    assert backend.options == opts


def test_rediss_url_verifies_by_default() -> None:
    ctx = RedisOptions.from_url("rediss://host:6380").ssl_context()
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.check_hostname is True
    assert ctx.verify_mode == ssl.CERT_REQUIRED

    off = RedisOptions.from_url("rediss://host:6380?ssl_cert_reqs=none").ssl_context()
    assert isinstance(off, ssl.SSLContext)
    assert off.check_hostname is False
    assert off.verify_mode == ssl.CERT_NONE

    required = RedisOptions.from_url("rediss://host?ssl_cert_reqs=required").ssl_context()
    assert isinstance(required, ssl.SSLContext)
    assert required.verify_mode == ssl.CERT_REQUIRED


def test_rediss_url_ssl_ca_certs(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ctx = RedisOptions.from_url(f"rediss://host?ssl_ca_certs={quote(str(ca_file))}").ssl_context()
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    loaded = ctx.get_ca_certs()
    assert len(loaded) == 1
    assert "trustme" in str(loaded[0]["subject"])

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigurationError, match="ssl_ca_certs"):
        RedisOptions.from_url(f"rediss://host?ssl_ca_certs={quote(str(garbage))}")


def test_unix_url() -> None:
    opts = RedisOptions.from_url("unix:///var/run/redis.sock?db=1&password=x")
    assert (opts.network, opts.addr, opts.db, opts.password, opts.username) == (
        "unix",
        "/var/run/redis.sock",
        1,
        "x",
        None,
    )
    with_user = RedisOptions.from_url("unix://app:s%40cret@/var/run/redis.sock")
    assert (with_user.username, with_user.password) == ("app", "s@cret")


@pytest.mark.parametrize(
    "url",
    [
        "redis://host?foo=1",
        "redis://host/0?socket_keepalive=true",
        "http://host:6379",
        "localhost:6379",
        "",
        "redis://host:notaport",
        "redis://host:99999",
        "redis://host/notadb",
        "redis://host?db=x",
        "redis://host?pool_size=-1",
        "redis://host?read_timeout=soon",
        "redis://host?ssl_ca_certs=/tmp/ca.pem",
        "redis://host?ssl_cert_reqs=none",
        "rediss://host?ssl_cert_reqs=maybe",
        "rediss://host?ssl_ca_certs=/nonexistent/kivigo/ca.pem",
        "unix://",
        "unix:///tmp/redis.sock?tls=1",
    ],
)
def test_bad_urls_raise_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError):
        RedisOptions.from_url(url)
    with pytest.raises(ConfigurationError):
        RedisBackend.from_url(url)


def test_unknown_override_raises_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        RedisOptions.from_url("redis://host", bogus=1)


@pytest.mark.parametrize(
    "url",
    [
        # An unescaped "/" or "?" in a password ends the host part early: the
        # password then reads as a port, and the error must not echo it.
        "redis://user:topsecret/x@host:6379",
        "redis://:topsecret?x@host",
        "redis://user:topsecret@host:badport",
        # A password of digits reads as a valid port: what follows must not be echoed
        # as a database number or an option name, nor be dropped without an error.
        "redis://app:1234/5678topsecret@cache:6379/0",
        "redis://:1234?5678topsecret@cache:6379/0",
        "redis://:1234#5678topsecret@cache:6379/0",
        "redis://:1234/topsecret",
    ],
)
def test_url_errors_never_show_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RedisOptions.from_url(url)
    assert "topsecret" not in chain_text(info.value)


@pytest.mark.parametrize(
    ("parse", "url"),
    [
        (RedisSentinelOptions.from_url, "redis+sentinel://app:2024/Tigersecret@s1:26379/cache"),
        (RedisSentinelOptions.from_url, "redis+sentinel://:2024?Tigersecret@s1:26379/cache"),
        (RedisClusterOptions.from_url, "redis://app:1234?Tigersecret@node1:7000"),
        (RedisClusterOptions.from_url, "redis://:1234#Tigersecret@node1:7000"),
    ],
)
def test_sentinel_and_cluster_urls_never_show_a_cut_password(parse: Any, url: str) -> None:
    # Both wrappers split or re-encode the URL before RedisOptions sees it: the
    # same guard runs on the URL as given.
    with pytest.raises(ConfigurationError, match="percent-encode") as info:
        parse(url)
    assert "Tiger" not in chain_text(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://cache:0/1",
        "redis://cache#fragment",
        "redis://cache/\u0663",
        "redis://cache//3/",
        "redis://cache/3//",
        "redis://cache/3?db=5",
        "redis://cache?db=5&db=7",
        "redis://cache?read_timeout=1&read_timeout=30",
    ],
)
def test_urls_that_used_to_be_misread_are_refused(url: str) -> None:
    # Port 0 became 6379, a fragment was ignored, a non-ASCII digit was a db number,
    # extra slashes were dropped, and of a database or an option given twice the
    # last one won without a word.
    with pytest.raises(ConfigurationError):
        RedisOptions.from_url(url)


@pytest.mark.parametrize(
    ("parse", "url"),
    [
        (RedisSentinelOptions.from_url, "redis+sentinel://s1:26379/cache?read_timeout=1&read_timeout=2"),
        (RedisClusterOptions.from_url, "redis://node1:7000?max_redirects=3&max_redirects=5"),
        (RedisClusterOptions.from_url, "redis://node1:7000?read_timeout=1&read_timeout=2"),
    ],
)
def test_sentinel_and_cluster_urls_refuse_an_option_given_twice(parse: Any, url: str) -> None:
    with pytest.raises(ConfigurationError, match="given 2 times"):
        parse(url)


def test_cluster_url_may_name_several_seeds() -> None:
    options = RedisClusterOptions.from_url("redis://node1:7000?addr=node2:7000&addr=node3:7000")
    assert options.addrs == ("node1:7000", "node2:7000", "node3:7000")


def test_a_plus_in_a_url_query_is_a_plus_not_a_space() -> None:
    # As in the user and password part: "+" meaning a space is an HTML forms rule.
    assert RedisOptions.from_url("unix:///run/redis.sock?password=a+b").password == "a+b"
    assert RedisOptions.from_url("redis://:a+b@h/0").password == "a+b"
    assert RedisOptions.from_url("redis://h?client_name=api+v2").client_name == "api+v2"
    assert RedisOptions.from_url("redis://h?client_name=api%2Bv2").client_name == "api+v2"
    with pytest.raises(ConfigurationError, match="client_name"):
        RedisOptions.from_url("redis://h?client_name=api%20v2")


def test_sentinel_options_refuse_an_unknown_replacement() -> None:
    options = RedisSentinelOptions(sentinels=["s1:26379"], service_name="cache")
    with pytest.raises(ConfigurationError, match="bogus"):
        options.replace(bogus=1)


def test_unix_url_keeps_at_signs_in_its_path_and_query() -> None:
    opts = RedisOptions.from_url("unix:///run/app@1/redis.sock?password=p@ss")
    assert (opts.addr, opts.password) == ("/run/app@1/redis.sock", "p@ss")


@pytest.mark.server
async def test_unix_socket_url(redis_server_factory: ServerFactory, kind: BinaryKind, tmp_path: Path) -> None:
    sock = tmp_path / "kv.sock"
    server = redis_server_factory(
        kind, "password", extra_config={"unixsocket": str(sock), "unixsocketperm": "700"}
    )
    assert server.password is not None
    url = f"unix://{quote(str(sock))}?db=1&password={quote(server.password, safe='')}"
    async with Client(RedisBackend.from_url(url)) as client:
        await client.set("unix:k", {"over": "unix"})
        assert await client.get("unix:k") == {"over": "unix"}
    db0, db1 = control_client(server, db=0), control_client(server, db=1)
    try:
        assert await db0.exists("unix:k") == 0
        assert await db1.get("unix:k") == b'{"over":"unix"}'
    finally:
        await db0.aclose()
        await db1.aclose()


# --------------------------------------------------------------------------- TLS


@pytest.fixture
def tls_server(kivigo_server_pool: ServerPool) -> RedisServer:
    return require_server(kivigo_server_pool, "redis", "tls")


@pytest.mark.server
async def test_rediss_url_with_private_ca(tls_server: RedisServer) -> None:
    assert tls_server.ca_path is not None
    url = f"{tls_server.url}?ssl_ca_certs={quote(tls_server.ca_path)}"
    async with Client(RedisBackend.from_url(url)) as client:
        await client.set("tls:k", 1)
        assert await client.get("tls:k") == 1
        assert await client.delete("tls:k")


@pytest.mark.server
async def test_rediss_without_the_ca_is_refused(tls_server: RedisServer) -> None:
    addr = f"{tls_server.host}:{tls_server.port}"
    for backend in (
        RedisBackend.from_url(tls_server.url),
        RedisBackend(RedisOptions(addr=addr, tls=True, max_retries=0)),
    ):
        try:
            err, _ = await raises_within(BackendUnavailableError, functools.partial(backend.get, "tls:k"), 10)
            assert_ours(err)
            assert "certificate" in str(err).lower()
            with pytest.raises(BackendUnavailableError):
                async with Client(backend):
                    pass
        finally:
            await backend.close()


@pytest.mark.server
async def test_rediss_verification_off_only_when_asked(tls_server: RedisServer) -> None:
    async with Client(RedisBackend.from_url(f"{tls_server.url}?ssl_cert_reqs=none")) as client:
        await client.set("tls:unverified", 1)
        assert await client.delete("tls:unverified")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("max_retries", [0, 3])
async def test_connection_refused_is_unavailable_quickly(max_retries: int) -> None:
    with refused_port() as port:
        backend = RedisBackend(RedisOptions(addr=f"127.0.0.1:{port}", max_retries=max_retries))
        try:
            err, _ = await raises_within(BackendUnavailableError, lambda: backend.get("k"), 10)
            assert_ours(err)
            assert isinstance(err, ConnectionError)
            assert f"127.0.0.1:{port}" in str(err)
            await raises_within(BackendUnavailableError, lambda: backend.set("k", b"v"), 10)
            health, _ = await raises_within(HealthCheckError, lambda: Client(backend).health(), 10)
            assert [type(e) for e in health.errors] == [BackendUnavailableError]
            await raises_within(BackendUnavailableError, backend.connect, 10)
        finally:
            await backend.close()


@pytest.mark.server
@pytest.mark.parametrize(("auto_pipeline", "protocol"), [(True, None), (False, None), (False, 2), (False, 3)])
async def test_a_password_for_a_server_without_one_connects_on_every_transport(
    server: RedisServer, auto_pipeline: bool, protocol: int | None
) -> None:
    # Clients given the password before the server requires it (a rolling change)
    # log in as the default user, whose password nothing checks yet: redis-py's
    # HELLO AUTH accepts that, and so must every transport, or they would differ.
    assert server.password is None
    options = redis_options(server, auto_pipeline=auto_pipeline, protocol=protocol)
    options = options.replace(password="not-required-yet")
    async with Client(RedisBackend(options)) as client:
        await client.set("auth:k", 1)
        assert await client.get("auth:k") == 1


@pytest.mark.server
@pytest.mark.parametrize("variant", ["password", "acl"])
async def test_wrong_password_never_shows_the_password(
    kivigo_server_pool: ServerPool, kind: BinaryKind, variant: Any
) -> None:
    server = require_server(kivigo_server_pool, kind, variant)
    wrong = "wrong-" + uuid.uuid4().hex
    backend = RedisBackend(redis_options(server).replace(password=wrong))
    try:
        for call in (lambda: backend.get("k"), backend.connect):
            err, _ = await raises_within(BackendUnavailableError, call, 10)
            assert_ours(err)
            text = chain_text(err)
            assert wrong not in text
            assert server.password is not None
            assert server.password not in text
            assert "auth" in str(err).lower()
    finally:
        await backend.close()


@pytest.mark.server
async def test_acl_denial_is_permission_denied(kivigo_server_pool: ServerPool, kind: BinaryKind) -> None:
    server = require_server(kivigo_server_pool, kind, "acl")
    backend = RedisBackend(
        redis_options(server).replace(username=server.limited_username, password=server.limited_password)
    )
    try:
        async with Client(backend) as client:
            await client.set("allowed:k", 1)
            assert await client.get("allowed:k") == 1
            for call in (
                lambda: client.set("secret:k", 1),
                lambda: client.get("secret:k"),
                lambda: client.batch_set({"allowed:x": 1, "secret:x": 2}),
            ):
                with pytest.raises(PermissionDeniedError) as info:
                    await call()
                assert_ours(info.value)
                assert isinstance(info.value, PermissionError)
            assert not await client.has_key("allowed:x")  # the mixed batch wrote nothing
            assert await client.delete("allowed:k")
    finally:
        await backend.close()


@pytest.mark.server
@TRANSPORTS
async def test_a_server_loading_its_data_is_unavailable_on_both_transports(
    redis_server_factory: ServerFactory, auto_pipeline: bool
) -> None:
    # LOADING is a passing state of the server, not a failed command: callers that
    # retry on BackendUnavailableError must see it as such, whichever transport.
    server = redis_server_factory("valkey", extra_config={"enable-debug-command": "yes"})
    control = control_client(server)
    backend = RedisBackend(redis_options(server, auto_pipeline=auto_pipeline))
    reloading = control_client(server)
    try:
        await run(control, "DEBUG", "POPULATE", "20000")
        await control.config_set("key-load-delay", "100")  # µs per key: loading takes ~2 s
        await control.config_set("loading-process-events-interval-bytes", "1024")
        await backend.connect()
        reload = asyncio.ensure_future(run(reloading, "DEBUG", "RELOAD"))
        await asyncio.sleep(0.5)
        with pytest.raises(BackendUnavailableError) as info:
            await backend.get("key:1")
        assert "loading" in str(info.value).lower()
        await asyncio.wait_for(reload, 30)
        await control.config_set("key-load-delay", "0")
        assert await backend.get("key:1") is not None  # and usable once loaded
    finally:
        await backend.close()
        await control.aclose()
        await reloading.aclose()


@pytest.mark.server
@TRANSPORTS
async def test_a_refused_listing_leaves_no_reply_for_the_next_call(
    private_server: RedisServer, private_control: aioredis.Redis, auto_pipeline: bool
) -> None:
    # A listing page is SCAN and INFO in one write: when SCAN is refused, INFO's
    # reply must still be read, or the next user of the connection receives it.
    await run(private_control, "ACL", "SETUSER", "noscan", "on", ">pw", "~*", "+@all", "-scan")
    await private_control.set("a", b'"value of a"')
    await private_control.set("b", b'"value of b"')
    options = redis_options(private_server, auto_pipeline=auto_pipeline, pool_size=1)
    async with Client(RedisBackend(options.replace(username="noscan", password="pw"))) as client:
        for _ in range(2):
            with pytest.raises(PermissionDeniedError):
                await client.list("")
            assert [await client.get_raw(k) for k in ("a", "b", "a")] == [
                b'"value of a"',
                b'"value of b"',
                b'"value of a"',
            ]


@pytest.mark.server
@pytest.mark.parametrize("max_retries", [0, 3])
async def test_paused_server_times_out_within_read_timeout(
    private_server: RedisServer, private_control: aioredis.Redis, max_retries: int
) -> None:
    backend = RedisBackend(redis_options(private_server, read_timeout=0.3, max_retries=max_retries))
    try:
        await backend.set("pause:k", b"v")  # connect before the pause
        await pause(private_control, 2000)
        err, _ = await raises_within(OperationTimeoutError, lambda: backend.get("pause:k"), 1.5)
        assert_ours(err)
        assert isinstance(err, TimeoutError)
        assert "pause:k" in str(err)
    finally:
        await backend.close()


@pytest.mark.server
@TRANSPORTS
async def test_a_timed_out_batch_with_ttl_says_its_outcome_is_unknown(
    private_server: RedisServer, private_control: aioredis.Redis, auto_pipeline: bool
) -> None:
    # With a TTL a batch is one MULTI/EXEC block: once sent, a timeout cannot tell
    # whether it was applied, and the caller deciding on a retry must be told.
    options = redis_options(private_server, read_timeout=0.3, auto_pipeline=auto_pipeline)
    backend = RedisBackend(options)
    try:
        await backend.set("pause:k", b"v")  # connect before the pause
        await pause(private_control, 1500)
        err, _ = await raises_within(
            OperationTimeoutError,
            lambda: backend.batch_set([("pause:a", b"1"), ("pause:b", b"2")], 60_000),
            5,
        )
        assert "may or may not have been applied" in str(err)
    finally:
        await backend.close()


# --------------------------------------------------------------------------- cancellation


@pytest.mark.server
@TRANSPORTS
async def test_cancelled_calls_leak_neither_replies_nor_connections(
    private_server: RedisServer, private_control: aioredis.Redis, auto_pipeline: bool
) -> None:
    rng = random.Random()
    name = unique_name()
    options = redis_options(
        private_server,
        pool_size=2,
        client_name=name,
        read_timeout=5.0,
        pool_timeout=5.0,
        auto_pipeline=auto_pipeline,
    )
    values = {f"cancel:{i}": f"value-{i}" for i in range(500)}
    keys = list(values)

    async with Client(RedisBackend(options)) as client:
        await client.batch_set(values)

        async def checked_get(key: str) -> None:
            got = await client.get(key)
            assert got == values[key], f"get({key!r}) returned another call's reply: {got!r}"

        async def cancel_after_iterations(task: asyncio.Task[None], n: int) -> None:
            for _ in range(n):
                await asyncio.sleep(0)
            task.cancel()

        async def storm(count: int, max_delay: float) -> int:
            """Start ``count`` gets, cancel most at random points; return how many completed."""
            loop = asyncio.get_running_loop()
            tasks: list[asyncio.Future[None]] = []
            timers: list[asyncio.TimerHandle] = []
            helpers: list[asyncio.Task[None]] = []
            for _ in range(count):
                key = rng.choice(keys)
                mode = rng.randrange(4)
                if mode == 0:
                    bounded = asyncio.wait_for(checked_get(key), rng.uniform(0, max_delay))
                    tasks.append(asyncio.ensure_future(bounded))
                    continue
                task = asyncio.create_task(checked_get(key))
                tasks.append(task)
                if mode == 1:
                    timers.append(loop.call_later(rng.uniform(0, max_delay), task.cancel))
                elif mode == 2:
                    helpers.append(asyncio.create_task(cancel_after_iterations(task, rng.randrange(12))))
                # mode 3: left to complete, competing with the cancelled ones
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*helpers)
            for timer in timers:
                timer.cancel()
            completed = 0
            for result in results:
                if result is None:
                    completed += 1
                # wait_for's own TimeoutError, exactly: OperationTimeoutError is one too.
                # (Before Python 3.11, wait_for raises asyncio.TimeoutError, another class.)
                elif not isinstance(result, asyncio.CancelledError) and type(result) not in (
                    TimeoutError,
                    asyncio.TimeoutError,
                ):
                    raise result
            return completed

        # Reads cancelled while the server holds their replies back; the next calls
        # on those connections are sent before the stale replies can arrive.
        # Long enough that a slow machine still cancels the victims before their replies.
        await pause(private_control, 2000)
        victims = [asyncio.create_task(checked_get(k)) for k in keys[:4]]
        await asyncio.sleep(0.2)
        for victim in victims:
            victim.cancel()
        survivors = [asyncio.create_task(checked_get(k)) for k in keys[4:24]]
        await storm(150, max_delay=1.2)  # more, cancelled in flight and in the pool's queue
        await asyncio.gather(*survivors)
        assert all(v.cancelled() for v in victims)
        # Cancelled at random points of live calls: while sending, reading, acquiring, releasing.
        for _ in range(3):
            assert await storm(400, max_delay=0.004) > 0

        await asyncio.wait_for(asyncio.gather(*(checked_get(k) for k in keys)), 60)

        async def hold_both_connections() -> None:
            async with client.transaction(watch=[keys[0]]) as t1, client.transaction(watch=[keys[1]]) as t2:
                assert await t1.get(keys[0]) == values[keys[0]]
                assert await t2.get(keys[1]) == values[keys[1]]

        # No connection leaked: both pooled connections can be held at once.
        await asyncio.wait_for(hold_both_connections(), 60)
        assert await named_connections(private_control, name) <= 2 + auto_pipeline


# --------------------------------------------------------------------------- pool


@pytest.mark.server
@TRANSPORTS
async def test_a_write_in_flight_at_close_is_never_sent_again(
    private_server: RedisServer, private_control: aioredis.Redis, auto_pipeline: bool
) -> None:
    # close() cuts the connection under the write; a retry on a new connection
    # would apply it after close() returned, and report it written.
    backend = RedisBackend(redis_options(private_server, auto_pipeline=auto_pipeline, read_timeout=5))
    await backend.connect()
    await pause(private_control, 3000, "WRITE")  # outlasts a stall before close()
    write = asyncio.ensure_future(backend.set("closing:k", b"v"))
    await asyncio.sleep(0.2)  # the SET is on the wire, held by the pause
    await backend.close()
    with pytest.raises(BackendUnavailableError):
        await asyncio.wait_for(write, 5)
    await asyncio.sleep(3.2)  # past the pause: a re-sent SET would have run by now
    assert await private_control.exists("closing:k") == 0


@pytest.mark.server
@TRANSPORTS
@pytest.mark.parametrize("idle", [1, 3])
async def test_min_idle_conns_are_opened_at_connect(
    server: RedisServer, control: aioredis.Redis, auto_pipeline: bool, idle: int
) -> None:
    name = unique_name()
    options = redis_options(
        server, client_name=name, min_idle_conns=idle, pool_size=5, auto_pipeline=auto_pipeline
    )
    client = Client(RedisBackend(options))
    assert await named_connections(control, name) == 0  # nothing opened before connecting
    expected = idle + auto_pipeline  # the multiplexed connection comes on top of the pool
    async with client:
        assert await named_connections(control, name) == expected
        await client.set("idle:k", 1)
        assert await named_connections(control, name) == expected
    assert await wait_for_connections(control, name, 0) == 0


@pytest.mark.server
async def test_client_name_shows_in_client_list(server: RedisServer, control: aioredis.Redis) -> None:
    name = unique_name()
    async with Client(RedisBackend(redis_options(server, client_name=name))) as client:
        await client.set("named:k", 1)
        assert await named_connections(control, name) == 1


@pytest.mark.server
async def test_pool_exhaustion_waits_for_a_free_connection(
    server: RedisServer, control: aioredis.Redis
) -> None:
    name = unique_name()
    async with Client(RedisBackend(redis_options(server, pool_size=2, client_name=name))) as client:
        values = {f"pool:{i}": i for i in range(200)}
        await client.batch_set(values)

        async def read(key: str) -> tuple[str, int]:
            return key, await client.get(key, int)

        results = await asyncio.wait_for(asyncio.gather(*(read(k) for k in values)), 60)
        assert dict(results) == values
        assert await named_connections(control, name) <= 2


@pytest.mark.server
async def test_a_busy_pool_serves_every_task_in_turn(server: RedisServer) -> None:
    # More tasks than connections, each calling again as soon as it has an answer
    # (awaited directly: no wait_for, whose extra task used to hide the problem).
    # A caller giving a connection back must not take it again before the caller
    # it woke: otherwise the same few tasks keep the pool and the rest time out.
    # A pool_timeout a fair turn fits in even on a loaded 2-core machine.
    options = redis_options(server, auto_pipeline=False, pool_size=4, pool_timeout=2.0)
    served: Counter[int] = Counter()
    errors: list[BaseException] = []
    async with Client(RedisBackend(options)) as client:
        await client.set("turn", 1)
        stop = asyncio.Event()

        async def worker(i: int) -> None:
            while not stop.is_set():
                try:
                    assert await client.get("turn") == 1
                    served[i] += 1
                except KivigoError as exc:
                    errors.append(exc)
                    return

        tasks = [asyncio.create_task(worker(i)) for i in range(40)]
        await asyncio.sleep(5.0)  # longer than pool_timeout: a starved task would time out
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert errors == []
    assert sorted(served) == list(range(40)), f"never served: {sorted(set(range(40)) - set(served))}"


async def test_an_idle_pooled_connection_is_taken_without_queueing(
    valkey_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py's blocking pool enters a Condition and a timeout on every call; the
    # library takes an idle connection directly when nobody waits, and queues otherwise.
    queued: list[int] = []
    queue = aioredis.BlockingConnectionPool.get_connection

    async def counting(self: aioredis.BlockingConnectionPool, *args: Any, **kwargs: Any) -> Any:
        queued.append(1)
        return await queue(self, *args, **kwargs)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(aioredis.BlockingConnectionPool, "get_connection", counting)
    options = redis_options(valkey_server, auto_pipeline=False, pool_size=1, pool_timeout=5)
    async with Client(RedisBackend(options)) as client:
        opened = len(queued)  # the first connection is opened through redis-py's path
        for i in range(20):
            await client.set("idle", i)
            assert await client.get("idle") == i
        assert len(queued) == opened
        # One connection, two callers: the second waits in redis-py's queue, and is served.
        both = await asyncio.wait_for(asyncio.gather(client.get("idle"), client.get("idle")), 10)
        assert list(both) == [19, 19]
        assert len(queued) > opened
        # While redis-py holds the pool's lock (walking its idle list), the call
        # queues instead of taking a connection from under it.
        pool = client.backend.redis.connection_pool  # type: ignore[attr-defined]
        before = len(queued)
        async with pool._lock:
            call = asyncio.ensure_future(client.get("idle"))
            await asyncio.sleep(0.05)
            assert not call.done()
            assert len(queued) == before + 1
        assert await asyncio.wait_for(call, 10) == 19


async def test_a_call_cancelled_while_giving_its_connection_back_does_not_keep_it(
    valkey_server: RedisServer,
) -> None:
    options = redis_options(valkey_server, auto_pipeline=False, pool_size=1, pool_timeout=1)
    async with Client(RedisBackend(options)) as client:
        await client.set("k", 1)
        pool = client.backend.redis.connection_pool  # type: ignore[attr-defined]
        call = asyncio.ensure_future(client.get("k"))
        await asyncio.sleep(0)  # the call holds the connection and waits for its reply
        async with pool._condition:  # busy: giving the connection back has to wait
            await asyncio.sleep(0.2)  # the reply is in; the call waits to give back
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call
        # The only connection is free again, not counted in use for good.
        assert await asyncio.wait_for(client.get("k"), 10) == 1


async def test_a_just_released_lock_with_a_woken_waiter_counts_as_busy() -> None:
    # Giving a connection back is shielded only when taking the pool's locks would
    # pause; a lock released a moment ago, whose woken waiter has not run, still
    # makes a newcomer wait.
    from kivigo_async.backends.redis.standalone import _would_wait

    lock = asyncio.Lock()
    assert not _would_wait(lock)
    await lock.acquire()
    assert _would_wait(lock)
    waiter = asyncio.ensure_future(lock.acquire())
    await asyncio.sleep(0)  # queued on the lock
    lock.release()
    assert not lock.locked()
    assert _would_wait(lock)
    await waiter
    lock.release()
    assert not _would_wait(lock)
    abandoned = asyncio.ensure_future(lock.acquire())
    await lock.acquire()
    await asyncio.sleep(0)
    abandoned.cancel()
    lock.release()
    # Only a cancelled waiter is queued: the lock is taken at once.
    assert not _would_wait(lock)
    assert _would_wait(None)
    with contextlib.suppress(asyncio.CancelledError):
        await abandoned
    assert not lock.locked()


async def test_an_idle_pooled_connection_the_server_closed_is_replaced(valkey_server: RedisServer) -> None:
    # Taken without queueing, an idle connection still goes through redis-py's checks
    # and retry: one the server dropped meanwhile costs a reconnect, not an error.
    name = unique_name()
    options = redis_options(valkey_server, auto_pipeline=False, pool_size=1, client_name=name)
    control = control_client(valkey_server)
    try:
        async with Client(RedisBackend(options)) as client:
            await client.set("survives", 1)
            for turn in range(3):
                (idle,) = [c for c in await control.client_list() if c.get("name") == name]
                assert await control.client_kill_filter(_id=idle["id"]) == 1
                assert await client.get("survives") == turn + 1
                await client.set("survives", turn + 2)
    finally:
        await control.aclose()


@pytest.mark.server
@TRANSPORTS
async def test_a_value_over_the_servers_limit_fails_alone(
    redis_server_factory: ServerFactory, kind: BinaryKind, auto_pipeline: bool
) -> None:
    # The server answers a bulk longer than proto-max-bulk-len with a protocol error
    # and closes the connection: that call fails, the next ones get a new connection.
    server = redis_server_factory(kind, extra_config={"proto-max-bulk-len": "1mb"})
    options = redis_options(server, auto_pipeline=auto_pipeline)
    async with Client(RedisBackend(options)) as client:
        await client.set("small", 0)
        for attempt in range(3):
            # The multiplexed connection reads the server's reply; the pool's write
            # is cut short by the reset (a BackendUnavailableError).
            with pytest.raises(BackendError, match="Protocol error" if auto_pipeline else None) as info:
                await client.set("big", "x" * 2 * 1024 * 1024)
            assert_ours(info.value)
            await client.set("small", attempt)
            assert await client.get("small") == attempt
        assert await client.get("big", default=None) is None


@pytest.mark.server
async def test_close_closes_connections(server: RedisServer, control: aioredis.Redis) -> None:
    name = unique_name()
    client = Client(RedisBackend(redis_options(server, client_name=name, pool_size=4)))
    await asyncio.gather(*(client.set(f"close:{i}", i) for i in range(4)))
    assert await named_connections(control, name) >= 1
    await client.close()
    assert await wait_for_connections(control, name, 0) == 0
    await client.close()  # twice is fine


@pytest.mark.server
@TRANSPORTS
async def test_a_call_on_a_closed_backend_says_it_was_closed(
    server: RedisServer, auto_pipeline: bool
) -> None:
    # Not a message that reads like an outage: a client sharing a backend that
    # another client closed gets told what happened.
    backend = RedisBackend(redis_options(server, auto_pipeline=auto_pipeline))
    async with Client(backend) as client:
        await client.set("closed:k", 1)
    for call in (lambda: backend.get("closed:k"), lambda: Client(backend).get("closed:k")):
        with pytest.raises(BackendUnavailableError, match=r"closed.*Client\.close\(\) closes its backend"):
            await asyncio.wait_for(call(), 30)


@pytest.mark.server
async def test_a_failed_close_is_reported_once(server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = RedisBackend(redis_options(server, auto_pipeline=False))
    await backend.health()
    await check_a_failed_close_is_reported_once(backend, backend._redis, monkeypatch)


@pytest.mark.server
@TRANSPORTS
async def test_close_fails_calls_waiting_for_the_connection_cleanly(
    server: RedisServer, auto_pipeline: bool
) -> None:
    backend = RedisBackend(redis_options(server, auto_pipeline=auto_pipeline))
    calls = [asyncio.ensure_future(backend.get("k")) for _ in range(5)]
    await asyncio.sleep(0)  # the calls now wait for the connection to open
    await backend.close()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
    # Nobody cancelled these callers: they get our error, never a bare CancelledError.
    if auto_pipeline and sys.version_info < (3, 11):
        # Before 3.11 a caller's own cancellation cannot be told from close()'s: the
        # library lets the CancelledError through rather than risk eating one.
        assert all(isinstance(r, (BackendUnavailableError, asyncio.CancelledError)) for r in results)
        return
    assert [type(r) for r in results] == [BackendUnavailableError] * 5
    assert not any(call.cancelled() for call in calls)


@pytest.mark.server
async def test_cancelled_connect_gives_back_its_pooled_connections(server: RedisServer) -> None:
    leaks: list[tuple[int, int]] = []
    for turns in range(0, 60, 3):
        backend = RedisBackend(
            redis_options(server, auto_pipeline=False, pool_size=4, min_idle_conns=4, pool_timeout=2)
        )
        try:
            connecting = asyncio.ensure_future(backend.connect())
            for _ in range(turns):  # cancel at a different point of the connect each time
                await asyncio.sleep(0)
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
            in_use = len(backend.redis.connection_pool._in_use_connections)
            if in_use:
                leaks.append((turns, in_use))
            await asyncio.wait_for(asyncio.gather(*(backend.get("k") for _ in range(4))), 10)
        finally:
            await backend.close()
    assert leaks == []


@pytest.mark.server
async def test_failed_connect_closes_what_it_opened(
    redis_server_factory: ServerFactory, kind: BinaryKind
) -> None:
    server = redis_server_factory(kind, extra_config={"maxclients": "3"})
    control = control_client(server)
    try:
        await control.ping()  # one of the three slots
        name = unique_name()
        backend = RedisBackend(
            redis_options(server, client_name=name, min_idle_conns=3, pool_size=3, max_retries=0)
        )
        try:
            with pytest.raises(KivigoError) as info:
                async with Client(backend):
                    pass
            assert_ours(info.value)
            assert "max" in str(info.value).lower()
            # `async with` never reached __aexit__: the connections that did open must not linger.
            assert await wait_for_connections(control, name, 0) == 0
        finally:
            await backend.close()
    finally:
        await control.aclose()


async def test_unencodable_keys_never_hold_a_pooled_connection(valkey_server: RedisServer) -> None:
    # The pool path packs a command before taking a connection: with one connection,
    # a leak would make the last call wait for a connection that never comes back.
    options = redis_options(valkey_server, auto_pipeline=False, pool_size=1, pool_timeout=2)
    async with Client(RedisBackend(options)) as client:
        for _ in range(3):
            with pytest.raises(InvalidKeyError):
                await client.get("bad\ud800key")
            with pytest.raises(InvalidKeyError):
                await client.batch_get(["ok", "bad\ud800key"])
        await client.set("fine", 1)
        assert await client.get("fine") == 1


@TRANSPORTS
async def test_a_database_the_server_does_not_have_is_named_as_such(
    valkey_server: RedisServer, auto_pipeline: bool
) -> None:
    # The server has 16 databases (its default): db=16 fails at connect, on every call.
    options = dataclasses.replace(redis_options(valkey_server, auto_pipeline=auto_pipeline), db=16)
    backend = RedisBackend(options)
    try:
        for _ in range(2):
            with pytest.raises(BackendUnavailableError, match="cannot select the database"):
                await backend.set("k", b"v")
    finally:
        await backend.close()


@TRANSPORTS
async def test_every_call_after_close_says_so_and_opens_nothing(
    valkey_server: RedisServer, auto_pipeline: bool
) -> None:
    name = unique_name()
    backend = RedisBackend(redis_options(valkey_server, auto_pipeline=auto_pipeline, client_name=name))
    async with Client(backend) as client:
        await client.set("closed:a", 1)

    async def commit_plain() -> None:
        tx = await backend.begin([])
        await tx.commit([("set", "closed:a", b"2", None)])

    async def listing() -> None:
        async for _ in backend.scan("closed:"):
            pass

    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "connect": backend.connect,
        "get": lambda: backend.get("closed:a"),
        "set": lambda: backend.set("closed:a", b"2"),
        "batch_set-ttl": lambda: backend.batch_set([("closed:a", b"2")], 5000),
        "batch_get": lambda: backend.batch_get(["closed:a", "closed:b"]),
        "expire": lambda: backend.expire("closed:a", 5000),
        "health": backend.health,
        "scan": listing,
        "transaction": commit_plain,
        "watch-transaction": lambda: backend.begin(["closed:a"]),
    }
    failures = {}
    for what, call in calls.items():
        try:
            await asyncio.wait_for(call(), 30)
        except BackendUnavailableError as exc:
            if "closed" not in str(exc):
                failures[what] = str(exc)
        except BaseException as exc:
            failures[what] = repr(exc)
        else:
            failures[what] = "no error"
    assert failures == {}
    control = control_client(valkey_server)
    try:
        assert await named_connections(control, name) == 0
        assert await control.get("closed:a") == b"1"
    finally:
        await control.aclose()
