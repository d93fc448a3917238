"""The aiohttp integration, through real apps served by aiohttp's test server on loopback."""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from conftest import redis_options, refused_port

from kivigo_async import Client
from kivigo_async.backends.memory import MemoryBackend
from kivigo_async.backends.redis import RedisBackend
from kivigo_async.errors import BackendUnavailableError, ConfigurationError, HealthCheckError
from kivigo_async.health import HealthStatus, HealthWatcher
from kivigo_async.integrations.aiohttp import (
    CLIENT_KEY,
    WATCHER_KEY,
    add_health_routes,
    get_client,
    get_watcher,
    setup,
)
from kivigo_async.testing.pytest_plugin import ServerFactory
from kivigo_async.testing.servers import HOST, RedisServer

# Generous: two shared cores, and other test runs beside this one.
WAIT = 30.0
FAST_WATCH: dict[str, Any] = {"interval": 0.1, "timeout": 1.0, "max_backoff": 0.3, "degraded_latency": None}

Http = TestClient[web.Request, web.Application]


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[Http]:
    """Start ``app`` on a loopback port (running its cleanup contexts) and stop it on exit."""
    async with TestClient(TestServer(app, host=HOST)) as http:
        yield http


async def start(app: web.Application) -> None:
    """Run ``app``'s startup (as ``web.run_app`` does) and clean it up even when startup fails."""
    runner = web.AppRunner(app)
    try:
        await runner.setup()
    finally:
        await runner.cleanup()


def redis_client(server: RedisServer, **overrides: Any) -> Callable[[], Client]:
    return lambda: Client(RedisBackend(redis_options(server, **overrides)))


async def put_value(request: web.Request) -> web.Response:
    await get_client(request).set(request.match_info["key"], int(request.query["value"]))
    return web.Response(status=204)


async def get_value(request: web.Request) -> web.Response:
    return web.json_response(await get_client(request).get(request.match_info["key"], int))


def kv_app() -> web.Application:
    app = web.Application()
    app.router.add_put("/kv/{key}", put_value)
    app.router.add_get("/kv/{key}", get_value)
    return app


# -- setup ---------------------------------------------------------------------------


async def test_setup_opens_the_client_and_closes_it_on_cleanup() -> None:
    backend = MemoryBackend()
    app = kv_app()
    setup(app, lambda: Client(backend))
    async with serving(app) as http:
        client = app[CLIENT_KEY]
        assert client.backend is backend
        watcher = app[WATCHER_KEY]
        assert isinstance(watcher, HealthWatcher)
        assert watcher.running
        assert (await http.put("/kv/answer", params={"value": "42"})).status == 204
        assert await backend.get("answer") == b"42"
    assert not watcher.running
    with pytest.raises(BackendUnavailableError):
        await backend.get("answer")


async def test_a_handler_using_get_client_sets_and_gets(valkey_server: RedisServer) -> None:
    app = kv_app()
    setup(app, redis_client(valkey_server))
    key = f"aiohttp:{uuid.uuid4().hex}"
    async with serving(app) as http:
        assert (await http.put(f"/kv/{key}", params={"value": "7"})).status == 204
        response = await http.get(f"/kv/{key}")
        assert response.status == 200
        assert await response.json() == 7
        assert await app[CLIENT_KEY].get(key, int) == 7
        await app[CLIENT_KEY].delete(key)


async def test_sub_applications_find_the_client_of_their_parent() -> None:
    app = web.Application()
    setup(app, lambda: Client(MemoryBackend()), watch=False)
    app.add_subapp("/api", kv_app())
    async with serving(app) as http:
        assert (await http.put("/api/kv/n", params={"value": "3"})).status == 204
        assert await (await http.get("/api/kv/n")).json() == 3
        assert app[WATCHER_KEY] is None


async def test_startup_fails_when_the_backend_cannot_be_reached() -> None:
    with refused_port() as port:
        app = web.Application()
        setup(app, lambda: Client(RedisBackend.from_url(f"redis://{HOST}:{port}", max_retries=0)))
        with pytest.raises(BackendUnavailableError):
            await start(app)


class UnreachableBackend(MemoryBackend):
    """A backend whose eager connection fails, as a server that is down at startup."""

    async def connect(self) -> None:
        raise BackendUnavailableError("cannot connect")


async def test_a_failed_startup_still_closes_the_backend() -> None:
    backend = UnreachableBackend()
    app = web.Application()
    setup(app, lambda: Client(backend))
    with pytest.raises(BackendUnavailableError, match="cannot connect"):
        await start(app)
    with pytest.raises(BackendUnavailableError, match="closed"):
        await backend.get("k")


async def test_a_factory_that_shares_a_backend_fails_the_second_startup() -> None:
    backend = MemoryBackend()
    first, second = web.Application(), web.Application()
    for app in (first, second):
        setup(app, lambda: Client(backend), watch=False)
    async with serving(first) as http:
        assert (await http.get("/healthz")).status == 200
    with pytest.raises(HealthCheckError, match="memory backend is closed"):
        await start(second)


async def test_a_factory_that_returns_no_client_fails_startup() -> None:
    app = web.Application()
    setup(app, lambda: MemoryBackend())  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigurationError, match="must return a Client"):
        await start(app)


def test_setup_twice_on_one_app_fails() -> None:
    app = web.Application()
    setup(app, lambda: Client(MemoryBackend()))
    with pytest.raises(ConfigurationError, match="already called"):
        setup(app, lambda: Client(MemoryBackend()))


def test_setup_after_the_app_joined_another_is_a_configuration_error() -> None:
    parent, sub = web.Application(), kv_app()
    parent.add_subapp("/api", sub)  # aiohttp accepts no cleanup context from here on
    with pytest.raises(ConfigurationError, match="before the application is started or added"):
        setup(sub, lambda: Client(MemoryBackend()))
    assert len(sub.cleanup_ctx) == 0
    # Nothing was recorded: the message names the real problem again, not "already called".
    with pytest.raises(ConfigurationError, match="before the application is started or added"):
        setup(sub, lambda: Client(MemoryBackend()))


async def test_a_factory_that_returns_a_closed_client_fails_startup() -> None:
    shared = Client(MemoryBackend())
    app = kv_app()
    setup(app, lambda: shared, watch=False)
    async with serving(app) as http:
        assert (await http.put("/kv/a", params={"value": "1"})).status == 204
    with pytest.raises(BackendUnavailableError, match="was closed"):
        await start(app)


async def test_on_shutdown_handlers_still_have_the_client() -> None:
    # aiohttp tears the cleanup contexts down before on_cleanup handlers run, and
    # after on_shutdown ones: the documented place for a last write.
    app = kv_app()
    setup(app, lambda: Client(MemoryBackend()), watch=False)
    written: list[object] = []

    async def last_write(app: web.Application) -> None:
        client = app[CLIENT_KEY]
        await client.set("shutdown", "done")
        written.append(await client.get("shutdown"))

    app.on_shutdown.append(last_write)
    async with serving(app):
        pass
    assert written == ["done"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"client_factory": "redis://localhost"}, "callable"),
        ({"watcher_options": {"intervall": 1}}, "invalid watcher_options"),
        ({"watcher_options": {"interval": 1}, "watch": False}, "watch=False"),
    ],
)
def test_bad_options_fail_in_setup(kwargs: dict[str, Any], match: str) -> None:
    kwargs.setdefault("client_factory", lambda: Client(MemoryBackend()))
    app = web.Application()
    with pytest.raises(ConfigurationError, match=match):
        setup(app, **kwargs)
    assert len(app.cleanup_ctx) == 0


# -- request helpers -----------------------------------------------------------------


async def test_get_client_without_setup_is_a_clear_error() -> None:
    request = make_mocked_request("GET", "/kv/x", app=web.Application())
    with pytest.raises(ConfigurationError, match=r"setup\(app"):
        get_client(request)
    app = kv_app()
    async with serving(app) as http:
        assert (await http.get("/kv/x")).status == 500


async def test_get_watcher_is_the_running_watcher_or_none() -> None:
    app = web.Application()
    setup(app, lambda: Client(MemoryBackend()))
    async with serving(app):
        watcher = get_watcher(make_mocked_request("GET", "/", app=app))
        assert watcher is app[WATCHER_KEY]
        assert watcher is not None
        assert watcher.status is HealthStatus.HEALTHY


# -- probes --------------------------------------------------------------------------


async def test_readyz_follows_the_server_and_never_shows_the_password(
    redis_server_factory: ServerFactory,
) -> None:
    server = redis_server_factory("valkey", "password")
    assert server.password
    app = web.Application()
    setup(app, redis_client(server, max_retries=0, dial_timeout=1.0), watcher_options=FAST_WATCH)
    async with serving(app) as http:
        ready = await http.get("/readyz")
        assert ready.status == 200
        body = await ready.json()
        assert body["status"] == "healthy"
        assert body["latency"] > 0
        assert body["error"] is None
        assert ready.headers["Cache-Control"] == "no-store"

        server.kill()
        watcher = app[WATCHER_KEY]
        assert watcher is not None
        await watcher.wait_for(HealthStatus.DOWN, timeout=WAIT)

        down = await http.get("/readyz")
        assert down.status == 503
        text = await down.text()
        body = await down.json()
        assert body["status"] == "down"
        assert body["latency"] is None
        assert "BackendUnavailableError" in body["error"]
        assert server.password not in text
        alive = await http.get("/healthz")
        assert (alive.status, await alive.json()) == (200, {"status": "ok"})


async def test_readyz_without_a_watcher_checks_on_each_request(redis_server_factory: ServerFactory) -> None:
    server = redis_server_factory("valkey")
    app = web.Application()
    setup(app, redis_client(server, max_retries=0, dial_timeout=1.0), watch=False)
    async with serving(app) as http:
        ready = await http.get("/readyz")
        assert (ready.status, (await ready.json())["status"]) == (200, "healthy")
        server.kill()
        down = await http.get("/readyz")
        assert down.status == 503
        assert (await down.json())["consecutive_failures"] == 1


async def test_health_routes_can_move_or_be_left_out() -> None:
    app = web.Application()
    setup(app, lambda: Client(MemoryBackend()), health_routes=False)
    add_health_routes(app, prefix="/internal")
    async with serving(app) as http:
        assert (await http.get("/healthz")).status == 404
        assert (await http.get("/readyz")).status == 404
        assert await (await http.get("/internal/healthz")).json() == {"status": "ok"}
        assert (await (await http.get("/internal/readyz")).json())["status"] == "healthy"
        assert (await http.head("/internal/readyz")).status == 200
    with pytest.raises(ConfigurationError, match="prefix"):
        add_health_routes(web.Application(), prefix="internal/")


# -- the example -----------------------------------------------------------------------


def load_example(name: str) -> Any:
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"kivigo_example_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_the_aiohttp_example_serves_items(valkey_server: RedisServer) -> None:
    create_app: Callable[[str], web.Application] = load_example("aiohttp_app").create_app
    key = f"example-{uuid.uuid4().hex}"
    async with serving(create_app(valkey_server.url)) as http:
        put = await http.put(f"/api/items/{key}", params={"ttl": "60"}, json={"text": "hello"})
        assert put.status == 201
        read = await http.get(f"/api/items/{key}")
        assert (read.status, await read.json()) == (200, {"text": "hello"})
        assert await (await http.get("/api/items", params={"prefix": key[:12]})).json() == [key]

        assert (await http.put(f"/api/items/{key}", params={"ttl": "-1"}, json=1)).status == 400
        assert (await http.put(f"/api/items/{key}", params={"ttl": "soon"}, json=1)).status == 400
        assert (await http.put(f"/api/items/{key}", data=b"{not json")).status == 400

        assert (await http.delete(f"/api/items/{key}")).status == 204
        assert (await http.get(f"/api/items/{key}")).status == 404
        assert (await http.delete(f"/api/items/{key}")).status == 404
        assert (await http.get("/readyz")).status == 200
