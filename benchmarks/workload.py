"""What every library is asked to do: the value, the keys and the 80/20 operation plan."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson

#: Every key the benchmark writes starts with this, so a shared server can be cleaned up
#: afterwards without touching anything else (the benchmark never runs FLUSHDB).
KEY_PREFIX = "kivigo-bench:"

#: A web session as an application would store it: about 200 bytes of JSON.
SESSION: dict[str, Any] = {
    "user_id": "u-7f3a9c2e",
    "email": "ada@example.com",
    "roles": ["reader", "editor"],
    "csrf": "9f8e7d6c5b4a3928",
    "created_at": 1767225600,
    "expires_at": 1767227400,
    "ip": "203.0.113.42",
    "locale": "en-GB",
    "mfa": True,
}


class Session(msgspec.Struct):
    """The typed form of :data:`SESSION`, for typed decoding."""

    user_id: str
    email: str
    roles: list[str]
    csrf: str
    created_at: int
    expires_at: int
    ip: str
    locale: str
    mfa: bool


#: The value as JSON bytes: what the raw redis-py baseline stores and reads back.
SESSION_JSON: bytes = orjson.dumps(SESSION)

#: Keys per library: the 64-task mix and the largest batch draw from this many.
KEYSPACE = 1000
GET_SHARE = 0.8


@dataclass(frozen=True)
class Plan:
    """Operation counts for one run (``quick`` shrinks every one of them)."""

    seq_pairs: int
    mix_tasks: int
    mix_ops_per_task: int
    hot_ops: int
    batch_calls: dict[int, int]
    codec_loops: int
    memory_ops: int
    memory_warmup: int
    ceiling_requests: dict[str, int]
    timeout: float

    @classmethod
    def full(cls) -> Plan:
        return cls(
            seq_pairs=1500,
            mix_tasks=64,
            mix_ops_per_task=150,
            hot_ops=5000,
            # Twice as many 1,000-key calls as 100-key ones: a repetition's four slices
            # of it were about 20 ms each, short enough for a collector pass or a slow
            # wake-up to move the figure by several percent.
            batch_calls={10: 300, 100: 100, 1000: 120},
            codec_loops=20000,
            memory_ops=200_000,
            memory_warmup=20_000,
            ceiling_requests={"seq": 8_000, "mix": 40_000, "batch": 3_000},
            timeout=180.0,
        )

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            seq_pairs=100,
            mix_tasks=64,
            mix_ops_per_task=10,
            hot_ops=200,
            batch_calls={10: 10, 100: 4, 1000: 2},
            codec_loops=1000,
            memory_ops=4000,
            memory_warmup=1000,
            ceiling_requests={"seq": 500, "mix": 2000, "batch": 100},
            timeout=60.0,
        )


def keys_for(namespace: str) -> list[str]:
    """The keyspace of one library (each writes its own format, so each has its own keys)."""
    return [f"{KEY_PREFIX}{namespace}:{i}" for i in range(KEYSPACE)]


@functools.lru_cache(maxsize=8)
def mix_plan(tasks: int, ops_per_task: int, seed: int = 7) -> tuple[tuple[tuple[bool, int], ...], ...]:
    """Per task, a fixed list of ``(is_get, key_index)``: the same for every library."""
    plans: list[tuple[tuple[bool, int], ...]] = []
    for task in range(tasks):
        rng = random.Random(seed * 1000 + task)
        plans.append(tuple((rng.random() < GET_SHARE, rng.randrange(KEYSPACE)) for _ in range(ops_per_task)))
    return tuple(plans)
