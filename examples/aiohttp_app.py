"""A JSON document cache over HTTP, with aiohttp.

Documents live under ``item:<key>``, optionally with a TTL. The client is
opened by ``setup()`` on the root application and found with ``get_client()``
from the ``/api`` sub-application; ``/healthz`` / ``/readyz`` sit on the root.

Run it (serves http://127.0.0.1:8080, against ``KIVIGO_REDIS_URL`` or a local server)::

    python examples/aiohttp_app.py
    curl -X PUT '127.0.0.1:8080/api/items/greeting?ttl=60' -d '{"text": "hello"}'
    curl 127.0.0.1:8080/api/items/greeting
    curl '127.0.0.1:8080/api/items?prefix=gree'
    curl 127.0.0.1:8080/readyz
"""

from __future__ import annotations

import json
import os

from aiohttp import web

from kivigo_async import Client, InvalidArgumentError, KeyNotFoundError
from kivigo_async.backends.redis import RedisBackend
from kivigo_async.integrations.aiohttp import get_client, setup

PREFIX = "item:"


def _ttl(request: web.Request) -> float | None:
    raw = request.query.get("ttl")
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text="ttl must be a number of seconds") from None


async def put_item(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    try:
        value = await request.json()
    except json.JSONDecodeError:
        raise web.HTTPBadRequest(text="the body must be JSON") from None
    try:
        await get_client(request).set(PREFIX + key, value, ttl=_ttl(request))
    except InvalidArgumentError as exc:  # e.g. a negative ttl
        raise web.HTTPBadRequest(text=str(exc)) from None
    return web.json_response({"key": key}, status=201)


async def get_item(request: web.Request) -> web.Response:
    try:
        value = await get_client(request).get(PREFIX + request.match_info["key"])
    except KeyNotFoundError:
        raise web.HTTPNotFound(text="no such item") from None
    return web.json_response(value)


async def delete_item(request: web.Request) -> web.Response:
    if not await get_client(request).delete(PREFIX + request.match_info["key"]):
        raise web.HTTPNotFound(text="no such item")
    return web.Response(status=204)


async def list_items(request: web.Request) -> web.Response:
    keys = await get_client(request).list(PREFIX + request.query.get("prefix", ""))
    return web.json_response([key.removeprefix(PREFIX) for key in keys])


def create_app(url: str) -> web.Application:
    """The cache API, storing documents on the Redis or Valkey server at ``url``."""
    api = web.Application()
    api.router.add_put("/items/{key}", put_item)
    api.router.add_get("/items/{key}", get_item)
    api.router.add_delete("/items/{key}", delete_item)
    api.router.add_get("/items", list_items)

    app = web.Application()
    setup(app, lambda: Client(RedisBackend.from_url(url)))
    app.add_subapp("/api", api)
    return app


if __name__ == "__main__":
    web.run_app(
        create_app(os.environ.get("KIVIGO_REDIS_URL", "redis://localhost:6379/0")),
        host="127.0.0.1",
        port=8080,
    )
