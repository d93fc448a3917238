"""Health checks: a simple probe, one with a deadline, and periodic monitoring
(KiviGo's Redis "health" example).

Run against any server: ``python examples/health_checks.py redis://localhost:6379/0``.
"""

from __future__ import annotations

import asyncio
import os
import sys

from kivigo_async import Client, HealthCheckError
from kivigo_async.backends.redis import RedisBackend


async def main(url: str, rounds: int = 3, interval: float = 0.2) -> None:
    async with Client(RedisBackend.from_url(url)) as client:
        # Simple health check.
        try:
            await client.health()
            print("redis is healthy")
        except HealthCheckError as exc:
            print(f"redis unhealthy: {exc}")
            return

        # With a deadline and an extra application check.
        async def has_config(c: Client) -> None:
            await c.set("health:probe", "ok", ttl=5)

        try:
            await asyncio.wait_for(client.health(has_config), timeout=5)
            print("redis responded within the timeout, extra check passed")
        except (HealthCheckError, TimeoutError) as exc:
            print(f"health check timed out or failed: {exc}")

        # Periodic monitoring.
        for i in range(rounds):
            await asyncio.sleep(interval)
            try:
                await client.health()
                print(f"periodic check {i + 1}/{rounds}: passed")
            except HealthCheckError as exc:
                print(f"periodic check {i + 1}/{rounds}: failed: {exc}")


if __name__ == "__main__":
    default_url = os.environ.get("KIVIGO_REDIS_URL", "redis://localhost:6379/0")
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else default_url))
