"""aiohttp integration: open a client with the app, typed app keys, and health probes.

:func:`setup` appends a ``cleanup_ctx`` generator that opens the
:class:`~kivigo_async.Client` (and, by default, a
:class:`~kivigo_async.health.HealthWatcher`) when the app starts and closes
both when it stops. They are stored under the typed keys :data:`CLIENT_KEY`
and :data:`WATCHER_KEY`; handlers use :func:`get_client`, which also finds
them from sub-applications.

If the backend cannot be reached at startup the app fails to start with that
error, rather than serving requests that would all fail. aiohttp closes cleanup
contexts before it runs ``on_cleanup`` handlers: make last writes in an
``on_shutdown`` handler.

Example:
    ```python
    from aiohttp import web
    from kivigo_async import Client
    from kivigo_async.backends.redis import RedisBackend
    from kivigo_async.integrations import aiohttp as kivigo

    async def visits(request: web.Request) -> web.Response:
        client = kivigo.get_client(request)
        count = await client.get("visits", int, default=0) + 1
        await client.set("visits", count)
        return web.json_response(count)

    app = web.Application()
    kivigo.setup(app, lambda: Client(RedisBackend.from_url("redis://localhost")))  # + /healthz, /readyz
    app.router.add_get("/visits", visits)
    web.run_app(app)
    ```
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack
from typing import Any, Final

try:
    from aiohttp import web
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kivigo_async.integrations.aiohttp needs aiohttp: pip install 'kivigo-async[aiohttp]'"
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
    "CLIENT_KEY",
    "WATCHER_KEY",
    "add_health_routes",
    "get_client",
    "get_watcher",
    "healthz",
    "readyz",
    "setup",
]

#: The client, set at startup: ``app[CLIENT_KEY]`` (after shutdown, the closed client).
CLIENT_KEY: Final[web.AppKey[Client]] = web.AppKey("kivigo_client", Client)
#: The health watcher (``None`` with ``watch=False``), set at startup: ``app[WATCHER_KEY]``.
WATCHER_KEY: Final[web.AppKey[HealthWatcher | None]] = web.AppKey("kivigo_watcher")
# What readyz asks: the watcher, or with watch=False a never-started one checked on demand.
_PROBE_KEY: Final[web.AppKey[HealthWatcher]] = web.AppKey("kivigo_probe", HealthWatcher)
# Set by setup() itself, so a second setup() on the same app fails at once.
_SETUP_KEY: Final[web.AppKey[bool]] = web.AppKey("kivigo_setup", bool)

_NOT_INSTALLED = (
    "no kivigo client on this application: call kivigo_async.integrations.aiohttp.setup(app, ...) "
    "before starting it"
)


def setup(
    app: web.Application,
    client_factory: Callable[[], Client],
    *,
    watch: bool = True,
    watcher_options: Mapping[str, Any] | None = None,
    health_routes: bool = True,
) -> None:
    """Open ``client_factory()`` when ``app`` starts and close it when ``app`` stops.

    Args:
        app: the application (not started yet).
        client_factory: called once per startup; returns a new, unopened client.
        watch: also run a :class:`~kivigo_async.health.HealthWatcher` that
            ``/readyz`` answers from.
        watcher_options: keyword arguments for the watcher (``interval``,
            ``timeout``, ``degraded_latency``, ``checks``, ``on_change``...),
            checked now.
        health_routes: add ``GET /healthz`` and ``GET /readyz``; pass
            ``False`` and call :func:`add_health_routes` for another prefix.

    Example:
        ```python
        setup(app, lambda: Client(RedisBackend.from_url(url)), watcher_options={"interval": 2})
        ```
    """
    options = _check_options(client_factory, watch, watcher_options)
    if not isinstance(app, web.Application):
        raise ConfigurationError(f"setup needs an aiohttp web.Application, not {type(app).__name__}")
    if _SETUP_KEY in app:
        raise ConfigurationError("kivigo setup() was already called for this application")
    if app.pre_frozen:
        raise ConfigurationError(
            "kivigo setup() must be called before the application is started or added to "
            "another one (add_subapp): aiohttp accepts no cleanup context after that"
        )

    async def kivigo_ctx(app: web.Application) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            client, watcher, probe = await _open(stack, client_factory, watch, options)
            app[CLIENT_KEY] = client
            app[WATCHER_KEY] = watcher
            app[_PROBE_KEY] = probe
            yield

    app.cleanup_ctx.append(kivigo_ctx)
    app[_SETUP_KEY] = True
    if health_routes:
        add_health_routes(app)


def get_client(request: web.Request) -> Client:
    """The client of the request's application (or of an enclosing one).

    Raises :class:`~kivigo_async.errors.ConfigurationError` when :func:`setup` was not called.

    Example:
        ```python
        async def read(request: web.Request) -> web.Response:
            value = await get_client(request).get(request.match_info["key"], default=None)
            return web.json_response(value)
        ```
    """
    client = request.config_dict.get(CLIENT_KEY)
    if client is None:
        raise ConfigurationError(_NOT_INSTALLED)
    return client


def get_watcher(request: web.Request) -> HealthWatcher | None:
    """The health watcher of the request's application, ``None`` with ``watch=False``.

    Example:
        ```python
        watcher = get_watcher(request)
        status = watcher.status if watcher is not None else None
        ```
    """
    get_client(request)
    return request.config_dict.get(WATCHER_KEY)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: ``200 {"status": "ok"}``, without touching the backend.

    Example:
        ```python
        app.router.add_get("/livez", healthz)
        ```
    """
    return web.json_response(dict(_LIVENESS_BODY), headers=_PROBE_HEADERS)


async def readyz(request: web.Request) -> web.Response:
    """Readiness: ``200`` when the backend is healthy or degraded, ``503`` otherwise.

    The body is the watcher's last report as JSON (status, latency, last
    error, never a password). Without a watcher ``client.health()`` runs now,
    bounded by :data:`~kivigo_async.integrations.DEFAULT_READY_TIMEOUT`.

    Example:
        ```python
        app.router.add_get("/ready", readyz)
        ```
    """
    client = get_client(request)
    code, body = await readiness(client, request.config_dict.get(_PROBE_KEY))
    return web.json_response(body, status=code, headers=_PROBE_HEADERS)


def add_health_routes(app: web.Application, prefix: str = "") -> None:
    """Add ``GET {prefix}/healthz`` and ``GET {prefix}/readyz`` (``HEAD`` too) to ``app``.

    Example:
        ```python
        setup(app, make_client, health_routes=False)
        add_health_routes(app, prefix="/internal")
        ```
    """
    prefix = _check_prefix(prefix)
    app.router.add_get(f"{prefix}/healthz", healthz)
    app.router.add_get(f"{prefix}/readyz", readyz)
