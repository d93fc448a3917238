"""Store, read, list and delete user sessions (KiviGo's Redis "usage" example).

Run against any server: ``python examples/session_store.py redis://localhost:6379/0``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sys

import msgspec

from kivigo_async import Client, KeyNotFoundError
from kivigo_async.backends.redis import RedisBackend


class Session(msgspec.Struct):
    user_id: str
    login_time: dt.datetime
    ip_address: str


async def main(url: str) -> None:
    async with Client(RedisBackend.from_url(url)) as client:
        session = Session(
            user_id="user123",
            login_time=dt.datetime.now(dt.timezone.utc),
            ip_address="192.168.1.100",
        )
        await client.set("session:abc123", session, ttl=dt.timedelta(minutes=30))
        print(f"stored session:abc123 for {session.user_id}")

        retrieved = await client.get("session:abc123", Session)
        print(f"session: {retrieved}")
        print(f"expires in {await client.ttl('session:abc123'):.1f} s")

        print(f"active sessions: {await client.list('session:')}")

        await client.delete("session:abc123")
        try:
            await client.get("session:abc123", Session)
        except KeyNotFoundError as exc:
            print(f"after delete: {exc}")


if __name__ == "__main__":
    default_url = os.environ.get("KIVIGO_REDIS_URL", "redis://localhost:6379/0")
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else default_url))
