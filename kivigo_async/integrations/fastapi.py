"""FastAPI integration: a lifespan that owns the client, a dependency, and health probes.

The lifespan opens the :class:`~kivigo_async.Client` (and, by default, a
:class:`~kivigo_async.health.HealthWatcher`) when the app starts and closes
both on shutdown. They live on ``app.state`` under :data:`STATE_CLIENT`
(``app.state.kivigo_client``) and :data:`STATE_WATCHER`
(``app.state.kivigo_watcher``, ``None`` with ``watch=False``), and in the
lifespan state that every request sees, in mounted sub-applications too;
handlers get them through the :data:`KivigoClient` / :data:`KivigoWatcher`
dependencies.

If the backend cannot be reached at startup the app fails to start with that
error, rather than serving requests that would all fail.

Example:
    ```python
    from fastapi import FastAPI
    from kivigo_async import Client
    from kivigo_async.backends.redis import RedisBackend
    from kivigo_async.integrations.fastapi import KivigoClient, health_router, kivigo_lifespan

    app = FastAPI(lifespan=kivigo_lifespan(lambda: Client(RedisBackend.from_url("redis://localhost"))))
    app.include_router(health_router())          # GET /healthz, GET /readyz

    @app.get("/visits")
    async def visits(client: KivigoClient) -> int:
        count = await client.get("visits", int, default=0) + 1
        await client.set("visits", count)
        return count
    ```

With a lifespan of your own, enter the kivigo one inside it:

    ```python
    from contextlib import asynccontextmanager

    kivigo = kivigo_lifespan(make_client)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with kivigo(app) as state:  # the client is open from here ...
            await warm_up(app.state.kivigo_client)
            yield state                   # (for mounted sub-applications)
        # ... and closed here, after your own shutdown code above has run

    app = FastAPI(lifespan=lifespan)
    ```
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Annotated, Any, Final

try:
    from fastapi import APIRouter, Depends, Request
    from fastapi.responses import JSONResponse
    from starlette.applications import Starlette
    from starlette.requests import HTTPConnection
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kivigo_async.integrations.fastapi needs FastAPI: pip install 'kivigo-async[fastapi]'"
    ) from exc

from ..client import Client
from ..errors import ConfigurationError
from ..health import HealthWatcher
from . import (
    _LIVENESS_BODY,
    _PROBE_HEADERS,
    _check_options,
    _check_prefix,
    _open,
    readiness,
)

__all__ = [
    "STATE_CLIENT",
    "STATE_WATCHER",
    "KivigoClient",
    "KivigoLifespan",
    "KivigoWatcher",
    "get_client",
    "get_watcher",
    "health_router",
    "kivigo_lifespan",
]

#: The ``app.state`` attribute holding the open :class:`~kivigo_async.Client`.
STATE_CLIENT: Final = "kivigo_client"
#: The ``app.state`` attribute holding the :class:`~kivigo_async.health.HealthWatcher` (or ``None``).
STATE_WATCHER: Final = "kivigo_watcher"
# What /readyz asks: the watcher, or with watch=False a never-started one checked on demand.
_STATE_PROBE: Final = "kivigo_probe"
# The lifespan state key: a dict of the three above, which every request's state shares
# (Starlette copies the state shallowly) and shutdown empties.
_LIFESPAN_STATE: Final = "kivigo"

_NOT_INSTALLED = (
    "no kivigo client on app.state: pass lifespan=kivigo_lifespan(...) to FastAPI(), "
    "or enter it inside your own lifespan"
)


class KivigoLifespan:
    """A FastAPI/Starlette lifespan that opens a client (and a watcher) for the app's lifetime.

    Calling it with the app returns an async context manager, so it can be
    given to ``FastAPI(lifespan=...)`` directly or entered inside your own
    lifespan. It yields the lifespan state (the client and the watcher) that
    Starlette hands to every request, which is how handlers of a mounted
    sub-application find them: a lifespan of your own should yield it too.
    See :func:`kivigo_lifespan`.

    Example:
        ```python
        app = FastAPI(lifespan=KivigoLifespan(make_client, watcher_options={"interval": 2}))
        ```
    """

    def __init__(
        self,
        client_factory: Callable[[], Client],
        *,
        watch: bool = True,
        watcher_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._watcher_options = _check_options(client_factory, watch, watcher_options)
        self._client_factory = client_factory
        self._watch = watch

    def __repr__(self) -> str:
        return f"KivigoLifespan(watch={self._watch})"

    def __call__(self, app: Starlette) -> AbstractAsyncContextManager[dict[str, Any]]:
        return self._run(app)

    @asynccontextmanager
    async def _run(self, app: Starlette) -> AsyncIterator[dict[str, Any]]:
        state = app.state
        if getattr(state, STATE_CLIENT, None) is not None:
            raise ConfigurationError("a kivigo lifespan is already running for this app")
        async with AsyncExitStack() as stack:
            opening = _open(stack, self._client_factory, self._watch, self._watcher_options)
            client, watcher, probe = await opening
            opened = {STATE_CLIENT: client, STATE_WATCHER: watcher, _STATE_PROBE: probe}
            for name, value in opened.items():
                setattr(state, name, value)
            try:
                yield {_LIFESPAN_STATE: opened}
            finally:
                # Gone before the client closes: a late request gets a clear error, not a closed client.
                for name in opened:
                    delattr(state, name)
                opened.clear()


def kivigo_lifespan(
    client_factory: Callable[[], Client],
    *,
    watch: bool = True,
    watcher_options: Mapping[str, Any] | None = None,
) -> KivigoLifespan:
    """Build the lifespan that opens ``client_factory()`` at startup and closes it on shutdown.

    Args:
        client_factory: called once per startup; returns a new, unopened client.
        watch: also run a :class:`~kivigo_async.health.HealthWatcher` that
            ``/readyz`` answers from.
        watcher_options: keyword arguments for the watcher (``interval``,
            ``timeout``, ``degraded_latency``, ``checks``, ``on_change``...),
            checked now.

    Example:
        ```python
        app = FastAPI(lifespan=kivigo_lifespan(lambda: Client(RedisBackend.from_url(url))))
        ```
    """
    return KivigoLifespan(client_factory, watch=watch, watcher_options=watcher_options)


async def get_client(connection: HTTPConnection) -> Client:
    """The app's client; raises :class:`~kivigo_async.errors.ConfigurationError` without the lifespan.

    A dependency for HTTP and WebSocket routes alike. It is a coroutine function
    so that FastAPI calls it on the event loop: a plain function would be run in
    the thread pool on every request, where it would queue behind the app's
    blocking handlers.

    Example:
        ```python
        @app.get("/items/{key}")
        async def read(key: str, client: Client = Depends(get_client)) -> object:
            return await client.get(key)
        ```
    """
    return _client(connection)


async def get_watcher(connection: HTTPConnection) -> HealthWatcher:
    """The app's health watcher; raises :class:`~kivigo_async.errors.ConfigurationError` if there is none.

    Example:
        ```python
        @app.get("/status")
        async def status(watcher: KivigoWatcher) -> str:
            return watcher.status.value
        ```
    """
    _client(connection)
    watcher: HealthWatcher | None = _opened(connection, STATE_WATCHER)
    if watcher is None:
        raise ConfigurationError("the kivigo lifespan runs without a health watcher (watch=False)")
    return watcher


def _client(connection: HTTPConnection) -> Client:
    client: Client | None = _opened(connection, STATE_CLIENT)
    if client is None:
        raise ConfigurationError(_NOT_INSTALLED)
    return client


def _opened(connection: HTTPConnection, name: str) -> Any:
    """What the lifespan opened: on the app, or (from a mounted sub-application) in the connection's state."""
    found = getattr(connection.app.state, name, None)
    if found is not None:
        return found
    shared: Mapping[str, Any] = getattr(connection.state, _LIFESPAN_STATE, None) or {}
    return shared.get(name)


#: Declare ``client: KivigoClient`` in a handler to receive the app's client.
KivigoClient = Annotated[Client, Depends(get_client)]
#: Declare ``watcher: KivigoWatcher`` in a handler to receive the app's health watcher.
KivigoWatcher = Annotated[HealthWatcher, Depends(get_watcher)]


def health_router(*, prefix: str = "", include_in_schema: bool = False) -> APIRouter:
    """A router with ``GET {prefix}/healthz`` (liveness) and ``GET {prefix}/readyz`` (readiness).

    ``/healthz`` answers ``200 {"status": "ok"}`` without touching the backend.
    ``/readyz`` answers from the watcher's last report -- ``200`` when healthy
    or degraded, ``503`` when down or not checked yet -- with the report as
    JSON (status, latency, last error, never a password). Without a watcher it
    runs ``client.health()`` with a :data:`~kivigo_async.integrations.DEFAULT_READY_TIMEOUT` bound.

    Example:
        ```python
        app.include_router(health_router(prefix="/internal"))   # /internal/healthz, /internal/readyz
        ```
    """
    router = APIRouter(prefix=_check_prefix(prefix), include_in_schema=include_in_schema)

    @router.get("/healthz", response_model=None, summary="Liveness probe")
    async def healthz() -> JSONResponse:
        return JSONResponse(dict(_LIVENESS_BODY), headers=dict(_PROBE_HEADERS))

    @router.get("/readyz", response_model=None, summary="Readiness probe")
    async def readyz(request: Request) -> JSONResponse:
        client = _client(request)
        probe: HealthWatcher | None = _opened(request, _STATE_PROBE)
        code, body = await readiness(client, probe)
        return JSONResponse(body, status_code=code, headers=dict(_PROBE_HEADERS))

    return router
