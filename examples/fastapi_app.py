"""A session store over HTTP, with FastAPI.

Sessions are JSON documents under ``session:<id>`` that expire on their own.
The client is opened by the app's lifespan, injected with ``KivigoClient``,
and ``/healthz`` / ``/readyz`` come from the health router.

Run it (serves http://127.0.0.1:8000, against ``KIVIGO_REDIS_URL`` or a local server)::

    python examples/fastapi_app.py
    curl -X POST 127.0.0.1:8000/sessions -H 'content-type: application/json' \\
         -d '{"user_id": "user123", "data": {"cart": [42]}, "ttl": 600}'
    curl 127.0.0.1:8000/sessions
    curl 127.0.0.1:8000/readyz
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel, Field

from kivigo_async import Client, KeyNotFoundError
from kivigo_async.backends.redis import RedisBackend
from kivigo_async.integrations.fastapi import KivigoClient, health_router, kivigo_lifespan

PREFIX = "session:"


class NewSession(BaseModel):
    user_id: str = Field(min_length=1, max_length=128)
    data: dict[str, Any] = Field(default_factory=dict)
    ttl: float = Field(default=1800, gt=0, le=30 * 24 * 3600, description="seconds until it expires")


class StoredSession(BaseModel):
    user_id: str
    data: dict[str, Any]
    created_at: dt.datetime


class SessionOut(StoredSession):
    id: str
    expires_in: float | None


def create_app(url: str) -> FastAPI:
    """The session API, storing sessions on the Redis or Valkey server at ``url``."""
    app = FastAPI(
        title="Sessions",
        lifespan=kivigo_lifespan(lambda: Client(RedisBackend.from_url(url))),
    )
    app.include_router(health_router())

    @app.post("/sessions", status_code=201)
    async def create_session(new: NewSession, client: KivigoClient) -> SessionOut:
        session_id = secrets.token_urlsafe(16)
        stored = StoredSession(
            user_id=new.user_id, data=new.data, created_at=dt.datetime.now(dt.timezone.utc)
        )
        await client.set(PREFIX + session_id, stored, ttl=new.ttl)
        return SessionOut(id=session_id, expires_in=new.ttl, **stored.model_dump())

    @app.get("/sessions/{session_id}")
    async def read_session(session_id: str, client: KivigoClient) -> SessionOut:
        key = PREFIX + session_id
        try:
            stored = await client.get(key, StoredSession)
            expires_in = await client.ttl(key)
        except KeyNotFoundError:  # never existed, or expired between the two calls
            raise HTTPException(status_code=404, detail="no such session") from None
        return SessionOut(id=session_id, expires_in=expires_in, **stored.model_dump())

    @app.delete("/sessions/{session_id}", status_code=204)
    async def delete_session(session_id: str, client: KivigoClient) -> Response:
        if not await client.delete(PREFIX + session_id):
            raise HTTPException(status_code=404, detail="no such session")
        return Response(status_code=204)

    @app.get("/sessions")
    async def list_sessions(client: KivigoClient) -> list[str]:
        return [key.removeprefix(PREFIX) for key in await client.list(PREFIX)]

    return app


if __name__ == "__main__":
    uvicorn.run(
        create_app(os.environ.get("KIVIGO_REDIS_URL", "redis://localhost:6379/0")),
        host="127.0.0.1",
        port=8000,
    )
