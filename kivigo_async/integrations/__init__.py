"""Web framework integrations: open a client with the app, inject it, expose health probes.

* :mod:`kivigo_async.integrations.fastapi` -- a lifespan, an ``Annotated``
  dependency and a ``/healthz`` + ``/readyz`` router (``pip install kivigo-async[fastapi]``).
* :mod:`kivigo_async.integrations.aiohttp` -- ``setup(app, ...)`` through
  ``cleanup_ctx``, typed ``web.AppKey`` s and the same probes
  (``pip install kivigo-async[aiohttp]``).

Both answer the probes the same way, with :func:`readiness`, which you can
also call from any other framework:

* ``/healthz`` (liveness) is ``200 {"status": "ok"}`` and never touches the
  backend: a slow Redis must not get the process restarted.
* ``/readyz`` (readiness) is ``200`` when the backend is healthy or degraded
  and ``503`` when it is down or not checked yet; the body is
  :meth:`HealthReport.to_dict() <kivigo_async.health.HealthReport.to_dict>`
  (status, latency, last error -- never a password).

This package imports neither framework; each submodule imports its own.

Example:
    ```python
    from kivigo_async.integrations import readiness

    status_code, body = await readiness(client, watcher)
    ```
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from typing import Any, Final

from ..backend import ConnectableBackend
from ..backends.memory import MemoryBackend
from ..client import Client
from ..errors import ConfigurationError
from ..health import HealthStatus, HealthWatcher

__all__ = ["DEFAULT_READY_TIMEOUT", "readiness"]

#: Seconds ``/readyz`` waits for ``client.health()`` when the app runs without a watcher.
DEFAULT_READY_TIMEOUT: Final = 2.0

_READY_STATUSES: Final = frozenset({HealthStatus.HEALTHY, HealthStatus.DEGRADED})

#: Probe answers must never be cached by a proxy: a stale "ready" defeats the probe.
_PROBE_HEADERS: Final[Mapping[str, str]] = {"Cache-Control": "no-store"}

_LIVENESS_BODY: Final[Mapping[str, str]] = {"status": "ok"}


async def readiness(
    client: Client, watcher: HealthWatcher | None = None, *, timeout: float = DEFAULT_READY_TIMEOUT
) -> tuple[int, dict[str, object]]:
    """Return the HTTP status and JSON body of a readiness probe.

    A running ``watcher`` answers from its last report, with no I/O, so
    probes cost nothing however often they come. A watcher that is not
    running is checked now (keeping its history: consecutive failures, and
    transitions logged once); without any, a one-off check of ``client`` runs,
    bounded by ``timeout`` seconds. The status is ``200`` for a healthy or
    degraded backend, ``503`` otherwise.

    Example:
        ```python
        code, body = await readiness(client)   # (200, {"status": "healthy", "latency": 0.0004, ...})
        ```
    """
    if watcher is None:
        # Not cached: a one-off watcher shares the check, timeout and error wording of a running one.
        report = await HealthWatcher(client, timeout=timeout).check_now()
    elif watcher.running:
        report = watcher.report
    else:
        # Concurrent probes share the check under way (check_now does), so all
        # answer within one timeout instead of queueing behind each other.
        report = await watcher.check_now()
    code = 200 if report.status in _READY_STATUSES else 503
    return code, report.to_dict()


def _probe_watcher(client: Client) -> HealthWatcher:
    """The never-started watcher that ``/readyz`` checks on demand when the app runs with ``watch=False``."""
    return HealthWatcher(client, timeout=DEFAULT_READY_TIMEOUT)


def _check_options(
    client_factory: object, watch: bool, watcher_options: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Validate integration options up front; return the watcher options as a dict."""
    if not callable(client_factory):
        raise ConfigurationError(
            f"client_factory must be a callable returning a Client, not {type(client_factory).__name__}"
        )
    if watcher_options is None:
        return {}
    if not isinstance(watcher_options, Mapping):
        raise ConfigurationError(f"watcher_options must be a mapping, not {type(watcher_options).__name__}")
    if not watch:
        raise ConfigurationError("watcher_options were given but watch=False")
    options = dict(watcher_options)
    if "client" in options:
        raise ConfigurationError("watcher_options must not contain 'client': the integration passes it")
    try:
        # Checked now, not when the app starts: a typo or a bad value should fail where
        # it is written. A watcher of a throwaway client runs every check, with no I/O.
        HealthWatcher(Client(MemoryBackend()), **options)
    except TypeError as exc:
        raise ConfigurationError(f"invalid watcher_options: {exc}") from None
    return options


async def _open(
    stack: AsyncExitStack, client_factory: Callable[[], Client], watch: bool, watcher_options: dict[str, Any]
) -> tuple[Client, HealthWatcher | None, HealthWatcher]:
    """Open the client (and the watcher) on ``stack``, which closes them in reverse order.

    Returns the client, the watcher (``None`` with ``watch=False``) and what the
    readiness probe asks: the watcher, or one checked on demand.
    """
    client = client_factory()
    if not isinstance(client, Client):
        raise ConfigurationError(f"client_factory must return a Client, not {type(client).__name__}")
    # Registered before connecting: a backend that fails to connect is still closed.
    stack.push_async_callback(client.close)
    await client.__aenter__()
    if not isinstance(client.backend, ConnectableBackend):
        # Entering connected nothing, so it checked nothing: probe once, or a backend
        # that cannot serve (one shared between startups and closed by the first)
        # would start an application whose every call fails.
        await client.health()
    if watch:
        watcher = await stack.enter_async_context(HealthWatcher(client, **watcher_options))
        return client, watcher, watcher
    probe = _probe_watcher(client)
    # Stopped before the client closes: a probe whose request was cancelled may
    # still be finishing, against the client.
    stack.push_async_callback(probe.stop)
    return client, None, probe


def _check_prefix(prefix: str) -> str:
    """A route prefix is ``""`` or starts with ``/`` and does not end with one."""
    if not isinstance(prefix, str) or (prefix and (not prefix.startswith("/") or prefix.endswith("/"))):
        raise ConfigurationError(f"prefix must be '' or like '/internal' (no trailing slash), not {prefix!r}")
    return prefix
