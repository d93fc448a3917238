"""The FastAPI integration, through real apps: the ASGI lifespan protocol, httpx and uvicorn."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio.to_thread
import httpx
import pytest
import redis.asyncio
import uvicorn
from conftest import redis_options, refused_port
from fastapi import FastAPI, Request, WebSocket

from kivigo_async import Client
from kivigo_async.backends.memory import MemoryBackend
from kivigo_async.backends.redis import RedisBackend
from kivigo_async.errors import BackendUnavailableError, ConfigurationError, HealthCheckError
from kivigo_async.health import HealthStatus, HealthWatcher
from kivigo_async.integrations import DEFAULT_READY_TIMEOUT
from kivigo_async.integrations.fastapi import (
    STATE_CLIENT,
    STATE_WATCHER,
    KivigoClient,
    KivigoLifespan,
    KivigoWatcher,
    get_client,
    health_router,
    kivigo_lifespan,
)
from kivigo_async.testing.proxy import FaultProxy
from kivigo_async.testing.pytest_plugin import ServerFactory
from kivigo_async.testing.servers import HOST, RedisServer

# Generous: two shared cores, and other test runs beside this one.
WAIT = 30.0
# Short intervals so a dead server shows within a second or two.
FAST_WATCH: dict[str, Any] = {"interval": 0.1, "timeout": 1.0, "max_backoff": 0.3, "degraded_latency": None}

Message = MutableMapping[str, Any]


class Lifespan:
    """Run an ASGI app's lifespan the way a server does (startup and shutdown messages)."""

    def __init__(self, app: FastAPI) -> None:
        self._app = app
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _receive(self) -> Message:
        return await self._to_app.get()

    async def _send(self, message: Message) -> None:
        await self._from_app.put(message)

    async def _exchange(self, message_type: str) -> None:
        assert self._task is not None
        await self._to_app.put({"type": f"lifespan.{message_type}"})
        getter = asyncio.ensure_future(self._from_app.get())
        done, _ = await asyncio.wait({getter, self._task}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:
            getter.cancel()
            await self._task  # the app failed: raise its exception
            raise AssertionError(f"lifespan {message_type} got no answer")
        reply = getter.result()
        if reply["type"] != f"lifespan.{message_type}.complete":
            await self._task  # Starlette re-raises the startup/shutdown error after reporting it
            raise AssertionError(f"lifespan {message_type} failed: {reply.get('message')}")

    async def __aenter__(self) -> Lifespan:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self._task = asyncio.create_task(self._app(scope, self._receive, self._send))
        await self._exchange("startup")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task is not None
        await self._exchange("shutdown")
        await asyncio.wait_for(self._task, WAIT)


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app after its lifespan startup, and an httpx client talking ASGI to it."""
    async with Lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            yield http


@asynccontextmanager
async def uvicorn_serving(app: FastAPI) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a loopback port; yield its base URL; shut it down cleanly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))  # the port is ours from here: no race with other processes
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="on", log_config=None, access_log=False, log_level="warning")
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        deadline = asyncio.get_running_loop().time() + WAIT
        while not server.started:
            if task.done():
                await task
                raise AssertionError("uvicorn stopped before it started serving")
            assert asyncio.get_running_loop().time() < deadline, "uvicorn did not start"
            await asyncio.sleep(0.02)
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, WAIT)
        sock.close()


async def wait_for_readyz(
    http: httpx.AsyncClient, predicate: Callable[[dict[str, Any]], bool]
) -> httpx.Response:
    """Poll /readyz until its body satisfies ``predicate``."""
    return await wait_for_readyz_at(http, "/readyz", predicate)


async def wait_for_readyz_at(
    http: httpx.AsyncClient, path: str, predicate: Callable[[dict[str, Any]], bool]
) -> httpx.Response:
    """Poll the readiness probe at ``path`` until its body satisfies ``predicate``."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while True:
        response = await http.get(path)
        if predicate(response.json()):
            return response
        assert asyncio.get_running_loop().time() < deadline, f"last /readyz: {response.text}"
        await asyncio.sleep(0.05)


def redis_client(server: RedisServer, **overrides: Any) -> Callable[[], Client]:
    return lambda: Client(RedisBackend(redis_options(server, **overrides)))


def visits_app(lifespan: KivigoLifespan, *, prefix: str = "") -> FastAPI:
    app = FastAPI(lifespan=lifespan)
    app.include_router(health_router(prefix=prefix))

    @app.put("/kv/{key}")
    async def put(key: str, value: int, client: KivigoClient) -> None:
        await client.set(key, value)

    @app.get("/kv/{key}")
    async def get(key: str, client: KivigoClient) -> int:
        value: int = await client.get(key, int)
        return value

    @app.get("/watcher")
    async def status(watcher: KivigoWatcher) -> str:
        return watcher.status.value

    return app


# -- lifespan ------------------------------------------------------------------------


async def test_lifespan_opens_the_client_and_closes_it_on_shutdown() -> None:
    backend = MemoryBackend()
    app = visits_app(kivigo_lifespan(lambda: Client(backend)))
    async with serving(app) as http:
        client = getattr(app.state, STATE_CLIENT)
        assert isinstance(client, Client)
        assert client.backend is backend
        assert isinstance(getattr(app.state, STATE_WATCHER), HealthWatcher)
        assert (await http.put("/kv/answer", params={"value": 42})).status_code == 200
        assert await backend.get("answer") == b"42"
    assert not hasattr(app.state, STATE_CLIENT)
    with pytest.raises(BackendUnavailableError):
        await backend.get("answer")


async def test_the_watcher_stops_before_the_client_closes() -> None:
    app = visits_app(kivigo_lifespan(lambda: Client(MemoryBackend()), watcher_options=FAST_WATCH))
    async with serving(app):
        watcher: HealthWatcher = getattr(app.state, STATE_WATCHER)
        assert watcher.running
    assert not watcher.running
    # Stopped while the backend was still open: its last check passed.
    assert watcher.status is HealthStatus.HEALTHY


async def test_a_handler_declaring_kivigo_client_sets_and_gets(valkey_server: RedisServer) -> None:
    app = visits_app(kivigo_lifespan(redis_client(valkey_server)))
    key = f"fastapi:{uuid.uuid4().hex}"
    async with serving(app) as http:
        assert (await http.put(f"/kv/{key}", params={"value": 7})).status_code == 200
        response = await http.get(f"/kv/{key}")
        assert response.status_code == 200
        assert response.json() == 7
        client: Client = getattr(app.state, STATE_CLIENT)
        assert await client.get(key, int) == 7
        await client.delete(key)


async def test_a_user_lifespan_can_nest_the_kivigo_one() -> None:
    backend = MemoryBackend()
    kivigo = kivigo_lifespan(lambda: Client(backend), watch=False)
    seen: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with kivigo(app):
            client: Client = getattr(app.state, STATE_CLIENT)
            await client.set("warm", "up")
            seen.append("started")
            yield
            # The user's shutdown code still has an open client.
            assert await client.get("warm") == "up"
            seen.append("stopping")

    app = FastAPI(lifespan=lifespan)
    async with serving(app):
        assert getattr(app.state, STATE_WATCHER) is None
    assert seen == ["started", "stopping"]
    with pytest.raises(BackendUnavailableError):
        await backend.get("warm")


async def test_a_second_kivigo_lifespan_on_the_same_app_fails() -> None:
    kivigo = kivigo_lifespan(lambda: Client(MemoryBackend()), watch=False)
    app = FastAPI()
    async with kivigo(app):
        with pytest.raises(ConfigurationError, match="already running"):
            async with kivigo(app):
                pass
        assert isinstance(getattr(app.state, STATE_CLIENT), Client)


async def test_startup_fails_when_the_backend_cannot_be_reached() -> None:
    with refused_port() as port:
        backend = RedisBackend.from_url(f"redis://{HOST}:{port}", max_retries=0)
        app = visits_app(kivigo_lifespan(lambda: Client(backend)))
        with pytest.raises(BackendUnavailableError):
            async with Lifespan(app):
                pass
        assert not hasattr(app.state, STATE_CLIENT)


class UnreachableBackend(MemoryBackend):
    """A backend whose eager connection fails, as a server that is down at startup."""

    async def connect(self) -> None:
        raise BackendUnavailableError("cannot connect")


class CountingUnreachableBackend(UnreachableBackend):
    """Counts close() calls, and refuses a second one as a strict backend might."""

    closes = 0

    async def close(self) -> None:
        self.closes += 1
        if self.closes > 1:
            raise RuntimeError("closed twice")
        await super().close()


async def test_a_failed_startup_still_closes_the_backend() -> None:
    backend = CountingUnreachableBackend()
    app = visits_app(kivigo_lifespan(lambda: Client(backend)))
    # The connection error is what startup reports, not an error of a second close.
    with pytest.raises(BackendUnavailableError, match="cannot connect"):
        async with Lifespan(app):
            pass
    assert backend.closes == 1
    with pytest.raises(BackendUnavailableError, match="closed"):
        await backend.get("k")


@pytest.mark.parametrize(
    ("shared", "error", "match"),
    [
        # One client for every startup: the second gets it closed.
        ("client", BackendUnavailableError, "was closed"),
        # A backend that connects nothing is probed at startup, so the one the first
        # shutdown closed fails the second startup instead of serving errors.
        ("backend", HealthCheckError, "memory backend is closed"),
    ],
)
async def test_a_factory_that_shares_what_a_shutdown_closed_fails_the_next_startup(
    shared: str, error: type[Exception], match: str
) -> None:
    backend = MemoryBackend()
    client = Client(backend)
    app = visits_app(
        kivigo_lifespan((lambda: client) if shared == "client" else (lambda: Client(backend)), watch=False)
    )
    async with serving(app) as http:
        assert (await http.put("/kv/a", params={"value": 1})).status_code == 200
    with pytest.raises(error, match=match):
        async with Lifespan(app):
            pass
    assert not hasattr(app.state, STATE_CLIENT)


async def test_a_sub_application_request_after_shutdown_gets_a_clear_error() -> None:
    # The server copies the lifespan state into every request (shallowly); one that
    # arrives after shutdown must not be handed the closed client.
    kivigo = kivigo_lifespan(lambda: Client(MemoryBackend()), watch=False)
    parent, sub = FastAPI(), FastAPI()  # the request is routed to sub, whose app.state is empty

    def request(lifespan_state: dict[str, Any]) -> Request:
        return Request({"type": "http", "app": sub, "state": dict(lifespan_state)})

    async with kivigo(parent) as state:
        client = await get_client(request(state))
        assert client is getattr(parent.state, STATE_CLIENT)
        await client.set("k", 1)
    with pytest.raises(ConfigurationError, match="no kivigo client"):
        await get_client(request(state))


async def test_websocket_routes_get_the_client_and_the_watcher() -> None:
    # FastAPI hands a WebSocket route's dependencies no Request: they must ask for
    # the connection (what HTTP and WebSocket scopes share) to be served at all.
    app = FastAPI(lifespan=kivigo_lifespan(lambda: Client(MemoryBackend())))

    @app.websocket("/ws")
    async def echo(websocket: WebSocket, client: KivigoClient, watcher: KivigoWatcher) -> None:
        await websocket.accept()
        await client.set("ws", await websocket.receive_json())
        await websocket.send_json({"stored": await client.get("ws"), "watching": watcher.running})
        await websocket.close()

    incoming: list[Message] = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": json.dumps({"n": 7})},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        if incoming:
            return incoming.pop(0)
        await asyncio.Event().wait()  # the route closes first; a hang is bounded below
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws", "headers": [], "query_string": b"", "state": {}}
    async with Lifespan(app):
        await asyncio.wait_for(app(scope, receive, send), WAIT)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert json.loads(sent[1]["text"]) == {"stored": {"n": 7}, "watching": True}


async def test_the_dependencies_do_not_queue_for_the_thread_pool() -> None:
    # A plain-function dependency runs in the thread pool on every request: with the
    # pool taken by blocking handlers, async handlers that only need the client waited.
    release, loop, entered = threading.Event(), asyncio.get_running_loop(), asyncio.Event()
    app = FastAPI(lifespan=kivigo_lifespan(lambda: Client(MemoryBackend())))

    @app.get("/blocking")
    def blocking() -> str:
        loop.call_soon_threadsafe(entered.set)
        release.wait(WAIT)
        return "done"

    @app.get("/deps")
    async def deps(client: KivigoClient, watcher: KivigoWatcher) -> int:
        await client.set("n", 1)
        return await client.get("n", int)

    async with serving(app) as http:
        limiter = anyio.to_thread.current_default_thread_limiter()  # this event loop's own
        tokens = limiter.total_tokens
        limiter.total_tokens = 1
        blocked = asyncio.create_task(http.get("/blocking"))
        try:
            await asyncio.wait_for(entered.wait(), WAIT)
            assert limiter.borrowed_tokens == 1  # the blocking handler holds the pool's one thread
            response = await asyncio.wait_for(http.get("/deps"), 5.0)
            assert (response.status_code, response.json()) == (200, 1)
            assert not blocked.done()
        finally:
            release.set()
            assert (await blocked).json() == "done"
            limiter.total_tokens = tokens


def _nested(kivigo: KivigoLifespan) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with kivigo(app) as state:
            yield state

    return lifespan


@pytest.mark.parametrize("nested", [False, True], ids=["kivigo-lifespan", "own-lifespan"])
async def test_a_mounted_sub_application_gets_the_client(nested: bool) -> None:
    backend = MemoryBackend()
    kivigo = kivigo_lifespan(lambda: Client(backend), watcher_options=FAST_WATCH)
    app = FastAPI(lifespan=_nested(kivigo) if nested else kivigo)
    # The sub-application has no lifespan of its own, and its app.state holds nothing.
    app.mount("/v2", visits_app(kivigo_lifespan(lambda: Client(MemoryBackend()))))
    async with uvicorn_serving(app) as base, httpx.AsyncClient(base_url=base) as http:
        assert (await http.put("/v2/kv/answer", params={"value": 42})).status_code == 200
        assert await backend.get("answer") == b"42"  # the parent app's client wrote it
        assert (await http.get("/v2/kv/answer")).json() == 42
        assert (await http.get("/v2/watcher")).json() in ("healthy", "unknown")
        ready = await wait_for_readyz_at(http, "/v2/readyz", lambda body: body["status"] == "healthy")
        assert ready.status_code == 200
    with pytest.raises(BackendUnavailableError):
        await backend.get("answer")


async def test_a_factory_that_returns_no_client_fails_startup() -> None:
    app = FastAPI(lifespan=kivigo_lifespan(lambda: MemoryBackend()))  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigurationError, match="must return a Client"):
        async with Lifespan(app):
            pass


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"client_factory": "redis://localhost"}, "callable"),
        ({"watcher_options": {"intervall": 1}}, "invalid watcher_options"),
        ({"watcher_options": {"client": None}}, "must not contain 'client'"),
        ({"watcher_options": {"interval": 1}, "watch": False}, "watch=False"),
        ({"watcher_options": [("interval", 1)]}, "mapping"),
        ({"watcher_options": {"interval": -1}}, "interval"),
        ({"watcher_options": {"timeout": 0}}, "timeout"),
        ({"watcher_options": {"checks": "db"}}, "checks"),
    ],
)
def test_bad_options_fail_when_the_lifespan_is_built(kwargs: dict[str, Any], match: str) -> None:
    kwargs.setdefault("client_factory", lambda: Client(MemoryBackend()))
    with pytest.raises(ConfigurationError, match=match):
        kivigo_lifespan(**kwargs)


# -- dependencies --------------------------------------------------------------------


async def test_kivigo_client_without_the_lifespan_is_a_clear_error() -> None:
    app = visits_app(None)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        with pytest.raises(ConfigurationError, match="kivigo_lifespan"):
            await http.get("/kv/x")


async def test_kivigo_watcher_is_the_running_watcher_and_an_error_without_one() -> None:
    app = visits_app(kivigo_lifespan(lambda: Client(MemoryBackend())))
    async with serving(app) as http:
        assert (await http.get("/watcher")).json() == "healthy"
    app = visits_app(kivigo_lifespan(lambda: Client(MemoryBackend()), watch=False))
    async with serving(app) as http:
        with pytest.raises(ConfigurationError, match="watch=False"):
            await http.get("/watcher")


# -- probes --------------------------------------------------------------------------


async def test_readyz_follows_the_server_and_never_shows_the_password(
    redis_server_factory: ServerFactory,
) -> None:
    server = redis_server_factory("valkey", "password")
    assert server.password
    app = visits_app(
        kivigo_lifespan(redis_client(server, max_retries=0, dial_timeout=1.0), watcher_options=FAST_WATCH)
    )
    async with serving(app) as http:
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "healthy"
        assert body["latency"] > 0
        assert body["error"] is None
        assert ready.headers["cache-control"] == "no-store"

        server.kill()
        watcher: HealthWatcher = getattr(app.state, STATE_WATCHER)
        await watcher.wait_for(HealthStatus.DOWN, timeout=WAIT)

        down = await http.get("/readyz")
        assert down.status_code == 503
        body = down.json()
        assert body["status"] == "down"
        assert body["latency"] is None
        assert "BackendUnavailableError" in body["error"]
        assert body["consecutive_failures"] >= 1
        assert server.password not in down.text
        # Liveness never asks the server.
        alive = await http.get("/healthz")
        assert (alive.status_code, alive.json()) == (200, {"status": "ok"})


async def test_readyz_reports_an_authentication_failure_without_the_passwords(
    redis_server_factory: ServerFactory,
) -> None:
    server = redis_server_factory("valkey", "password")
    old_password = server.password
    assert old_password
    new_password = f"rotated-{uuid.uuid4().hex}"
    app = visits_app(
        kivigo_lifespan(redis_client(server, max_retries=0, dial_timeout=1.0), watcher_options=FAST_WATCH)
    )
    admin = redis.asyncio.Redis(host=server.host, port=server.port, password=old_password)
    try:
        async with serving(app) as http:
            assert (await http.get("/readyz")).status_code == 200
            # Rotate the password and drop the app's connections: reconnecting must fail AUTH.
            await admin.config_set("requirepass", new_password)
            await admin.client_kill_filter(_type="normal", skipme=True)
            # The first failure is the killed connection; the reconnections after it fail AUTH.
            down = await wait_for_readyz(http, lambda body: "authentication failed" in str(body["error"]))
            assert down.status_code == 503
            assert down.json()["status"] == "down"
            assert old_password not in down.text
            assert new_password not in down.text
    finally:
        await admin.aclose()


async def test_readyz_without_a_watcher_checks_on_each_request(redis_server_factory: ServerFactory) -> None:
    server = redis_server_factory("valkey")
    app = visits_app(kivigo_lifespan(redis_client(server, max_retries=0, dial_timeout=1.0), watch=False))
    async with serving(app) as http:
        ready = await http.get("/readyz")
        assert (ready.status_code, ready.json()["status"]) == (200, "healthy")
        server.kill()
        down = await http.get("/readyz")  # no waiting: this request runs the check
        assert down.status_code == 503
        assert down.json()["status"] == "down"
        assert down.json()["consecutive_failures"] == 1
        again = await http.get("/readyz")
        assert again.json()["consecutive_failures"] == 2


async def test_concurrent_probes_share_one_check(redis_server_factory: ServerFactory) -> None:
    """Without a watcher, probes arriving together answer within one check's timeout, not one each."""
    server = redis_server_factory("valkey")
    async with FaultProxy(server.host, server.port) as proxy:
        backend = RedisBackend(
            redis_options(server, max_retries=0, read_timeout=30, dial_timeout=30).replace(addr=proxy.addr)
        )
        app = visits_app(kivigo_lifespan(lambda: Client(backend), watch=False))
        async with serving(app) as http:
            assert (await http.get("/readyz")).status_code == 200
            proxy.blackhole()  # every check now runs into the 2 s readiness timeout
            started = time.monotonic()
            answers = await asyncio.gather(*(http.get("/readyz") for _ in range(5)))
            took = time.monotonic() - started
            assert [a.status_code for a in answers] == [503] * 5
            # One shared check takes about one timeout; checks one after another would take five.
            assert took < 4 * DEFAULT_READY_TIMEOUT, f"5 probes took {took:.1f} s"
            proxy.heal()


async def test_health_router_prefix_and_schema() -> None:
    app = visits_app(kivigo_lifespan(lambda: Client(MemoryBackend())), prefix="/internal")
    app.include_router(health_router(prefix="/public", include_in_schema=True))
    async with serving(app) as http:
        assert (await http.get("/healthz")).status_code == 404
        assert (await http.get("/internal/healthz")).json() == {"status": "ok"}
        assert (await http.get("/internal/readyz")).json()["status"] == "healthy"
        paths = (await http.get("/openapi.json")).json()["paths"]
    assert "/internal/readyz" not in paths
    assert {"/public/healthz", "/public/readyz"} <= set(paths)
    for bad in ("internal", "/internal/"):
        with pytest.raises(ConfigurationError, match="prefix"):
            health_router(prefix=bad)


# -- a real HTTP server ----------------------------------------------------------------


async def test_served_by_uvicorn_over_http(valkey_server: RedisServer) -> None:
    app = visits_app(kivigo_lifespan(redis_client(valkey_server), watcher_options=FAST_WATCH))
    key = f"fastapi:{uuid.uuid4().hex}"
    async with uvicorn_serving(app) as base_url, httpx.AsyncClient(base_url=base_url) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert (ready.status_code, ready.json()["status"]) == (200, "healthy")
        assert (await http.put(f"/kv/{key}", params={"value": 5})).status_code == 200
        assert (await http.get(f"/kv/{key}")).json() == 5
        client: Client = getattr(app.state, STATE_CLIENT)
        await client.delete(key)
    # uvicorn ran the lifespan shutdown: the client is gone from the app.
    assert not hasattr(app.state, STATE_CLIENT)


# -- the example -----------------------------------------------------------------------


def load_example(name: str) -> Any:
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"kivigo_example_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered as an import would: pydantic resolves the example's annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_the_fastapi_example_serves_sessions(valkey_server: RedisServer) -> None:
    create_app: Callable[[str], FastAPI] = load_example("fastapi_app").create_app
    app = create_app(valkey_server.url)
    async with uvicorn_serving(app) as base_url, httpx.AsyncClient(base_url=base_url) as http:
        created = await http.post(
            "/sessions", json={"user_id": "user123", "data": {"cart": [42]}, "ttl": 600}
        )
        assert created.status_code == 201
        session = created.json()
        assert session["user_id"] == "user123"
        sid = session["id"]

        read = await http.get(f"/sessions/{sid}")
        assert read.status_code == 200
        assert read.json()["data"] == {"cart": [42]}
        assert 0 < read.json()["expires_in"] <= 600
        assert sid in (await http.get("/sessions")).json()

        assert (await http.post("/sessions", json={"user_id": "", "ttl": 600})).status_code == 422
        assert (await http.post("/sessions", json={"user_id": "u", "ttl": -1})).status_code == 422

        assert (await http.delete(f"/sessions/{sid}")).status_code == 204
        assert (await http.get(f"/sessions/{sid}")).status_code == 404
        assert (await http.delete(f"/sessions/{sid}")).status_code == 404
        assert sid not in (await http.get("/sessions")).json()
        assert (await http.get("/readyz")).status_code == 200


# -- packaging -------------------------------------------------------------------------


def test_the_core_package_imports_without_the_web_frameworks() -> None:
    code = (
        "import sys\n"
        "sys.modules['fastapi'] = sys.modules['aiohttp'] = sys.modules['starlette'] = None\n"
        "import kivigo_async, kivigo_async.integrations\n"
        "try:\n"
        "    import kivigo_async.integrations.fastapi\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT, check=True
    )
    assert "kivigo-async[fastapi]" in out.stdout


async def test_shutdown_waits_for_a_readiness_check_still_finishing_before_closing_the_client() -> None:
    # watch=False: /readyz checks on demand. A probe whose request was cancelled is
    # left to finish its cleanup (against the client), which shutdown must wait for.
    probing, release_cleanup = asyncio.Event(), asyncio.Event()
    order: list[str] = []

    class SlowToCancel(MemoryBackend):
        checks = 0

        async def health(self) -> None:
            self.checks += 1
            if self.checks == 1:
                return  # the check at startup
            probing.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await release_cleanup.wait()
                order.append("probe cleaned up")
                raise

        async def close(self) -> None:
            order.append("backend closed")
            await super().close()

    app = FastAPI(lifespan=kivigo_lifespan(lambda: Client(SlowToCancel()), watch=False))
    app.include_router(health_router())
    lifespan = Lifespan(app)
    await lifespan.__aenter__()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            request = asyncio.create_task(http.get("/readyz"))
            await asyncio.wait_for(probing.wait(), WAIT)
            request.cancel()
            await asyncio.wait({request}, timeout=WAIT)
        assert request.cancelled()
        closing = asyncio.create_task(lifespan.__aexit__(None, None, None))
        await asyncio.sleep(0.2)
        assert order == []  # before: the backend closed under the probe
    finally:
        release_cleanup.set()
    await asyncio.wait_for(closing, WAIT)
    assert order == ["probe cleaned up", "backend closed"]
