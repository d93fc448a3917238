"""One adapter per library, all with the same small async interface.

Every adapter stores the session value the way an application using that library
would (its default serializer), except the raw redis-py baselines, which send the
pre-encoded JSON bytes and return bytes: they are the cost of the client alone.
Each adapter says how it is configured in ``config``; the report prints it.

Pools: the 64-task workload needs 64 connections to be fair, so every library gets
a pool that can hold 64 (redis-py's default pool holds 100; cashews' default of 10
left 54 of 64 tasks without progress for seconds, so it is raised to 64).
"""

from __future__ import annotations

import abc
import importlib
import importlib.metadata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
from workload import KEY_PREFIX, SESSION, SESSION_JSON, Session

#: The session as the typed adapter reads it back.
SESSION_STRUCT = Session(**SESSION)

POOL = 64


@dataclass(frozen=True)
class Target:
    """Where the server is; the password is never printed."""

    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """A redis:// URL (with credentials: for client constructors only, never printed)."""
        auth = ""
        if self.password is not None:
            from urllib.parse import quote

            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        return f"redis://{auth}{self.host}:{self.port}/{self.db}"


class Adapter(abc.ABC):
    """The interface the scenarios drive. ``value`` is always :data:`workload.SESSION`."""

    #: Display name.
    name: ClassVar[str]
    #: Short namespace used in its keys.
    slug: ClassVar[str]
    #: The distribution whose version is reported.
    package: ClassVar[str]
    #: Modules that must import for this adapter to run.
    requires: ClassVar[tuple[str, ...]] = ()
    #: How it is configured, for the report.
    config: ClassVar[str]
    #: The library has a multi-key read / write.
    has_batch_get: ClassVar[bool] = True
    has_batch_set: ClassVar[bool] = True

    def __init__(self, target: Target) -> None:
        self.target = target

    @classmethod
    def missing(cls) -> str | None:
        """Why this adapter can't run here (a module that does not import), or None."""
        for module in cls.requires:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                return f"{module} is not installed ({exc})"
        return None

    @classmethod
    def version(cls) -> str:
        try:
            return importlib.metadata.version(cls.package)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    @classmethod
    def describe(cls) -> str:
        """How it is configured, as the report shows it."""
        return cls.config

    @property
    def key_prefix(self) -> str:
        return f"{KEY_PREFIX}{self.slug}:"

    def expected(self) -> object:
        """What ``get`` returns for the stored value (checked once before measuring)."""
        return SESSION

    @abc.abstractmethod
    async def setup(self) -> None: ...

    @abc.abstractmethod
    async def teardown(self) -> None: ...

    @abc.abstractmethod
    async def set(self, key: str) -> None: ...

    @abc.abstractmethod
    async def get(self, key: str) -> object: ...

    async def batch_set(self, keys: Sequence[str]) -> None:
        raise NotImplementedError

    async def batch_get(self, keys: Sequence[str]) -> Sequence[object] | Mapping[str, object]:
        raise NotImplementedError


class KivigoAdapter(Adapter):
    name = "kivigo-async"
    slug = "kivigo"
    package = "kivigo-async"
    config = f"Client(RedisBackend(RedisOptions(addr=..., pool_size={POOL}))), default JsonCodec (orjson)"

    @classmethod
    def describe(cls) -> str:
        # The options evolve: report the settings this run actually used.
        used = cls.options_type()(pool_size=POOL, **cls.extra_options())
        shown = ("read_timeout", "max_retries", "protocol", "auto_pipeline")
        settings = ", ".join(f"{n}={getattr(used, n)!r}" for n in shown if hasattr(used, n))
        return f"{cls.config}; options in effect: {settings}"

    @classmethod
    def extra_options(cls) -> dict[str, Any]:
        """RedisOptions on top of the defaults: subclasses measure other settings."""
        return {}

    @classmethod
    def options_type(cls) -> type[Any]:
        """The options class of the backend this adapter builds."""
        from kivigo_async.backends.redis import RedisOptions

        return RedisOptions

    async def setup(self) -> None:
        from kivigo_async import Client
        from kivigo_async.backends.redis import RedisBackend, RedisOptions

        t = self.target
        options = RedisOptions(
            addr=f"{t.host}:{t.port}",
            db=t.db,
            username=t.username,
            password=t.password,
            pool_size=POOL,
            **self.extra_options(),
        )
        self.client = Client(RedisBackend(options))
        await self.client.__aenter__()

    async def teardown(self) -> None:
        await self.client.close()

    async def set(self, key: str) -> None:
        await self.client.set(key, SESSION)

    async def get(self, key: str) -> object:
        return await self.client.get(key)

    async def batch_set(self, keys: Sequence[str]) -> None:
        await self.client.batch_set(dict.fromkeys(keys, SESSION))

    async def batch_get(self, keys: Sequence[str]) -> Mapping[str, object]:
        return await self.client.batch_get(keys)


class NoAutoPipeline:
    """Mixed into a kivigo adapter (first): the same backend with ``auto_pipeline=False``."""

    @classmethod
    def extra_options(cls) -> dict[str, Any]:
        return {"auto_pipeline": False}


class KivigoPoolAdapter(NoAutoPipeline, KivigoAdapter):
    name = "kivigo-async (pool)"
    slug = "kivigo-pool"
    config = (
        "as kivigo-async, with RedisOptions(auto_pipeline=False): every call takes a connection "
        "from the pool instead of sharing the multiplexed one (the non-pipelined path)"
    )


class KivigoTypedAdapter(KivigoAdapter):
    name = "kivigo-async (typed)"
    slug = "kivigo-typed"
    config = (
        "as kivigo-async, reading into a msgspec Struct (get(key, Session), "
        "batch_get(keys, Session)) instead of plain dicts; writes are the same JSON"
    )

    def expected(self) -> object:
        return SESSION_STRUCT

    async def get(self, key: str) -> object:
        return await self.client.get(key, Session)

    async def batch_get(self, keys: Sequence[str]) -> Mapping[str, object]:
        return await self.client.batch_get(keys, Session)


class KivigoBytesAdapter(KivigoAdapter):
    """The same work as raw redis-py's row: what the library costs on top of it."""

    name = "kivigo-async (bytes)"
    slug = "kivigo-bytes"
    config = (
        "as kivigo-async, bytes in and out with no codec (set_raw, get_raw, batch_set_raw, "
        "batch_get_raw): the work raw redis-py's row does"
    )

    def expected(self) -> object:
        return SESSION_JSON

    async def set(self, key: str) -> None:
        await self.client.set_raw(key, SESSION_JSON)

    async def get(self, key: str) -> object:
        return await self.client.get_raw(key)

    async def batch_set(self, keys: Sequence[str]) -> None:
        await self.client.batch_set_raw(dict.fromkeys(keys, SESSION_JSON))

    async def batch_get(self, keys: Sequence[str]) -> Mapping[str, object]:
        return await self.client.batch_get_raw(keys)


class KivigoCachedAdapter(KivigoAdapter):
    name = "kivigo-async + client cache"
    slug = "kivigo-cache"
    config = (
        "as kivigo-async, with RedisOptions(client_cache=ClientCache()): get and batch_get served from "
        "a local LRU kept coherent by CLIENT TRACKING invalidations; every set invalidates its key"
    )

    @classmethod
    def extra_options(cls) -> dict[str, Any]:
        from kivigo_async.backends.redis import ClientCache

        return {"client_cache": ClientCache()}


class RedisPyAdapter(Adapter):
    name = "redis-py"
    slug = "redispy"
    package = "redis"
    config = (
        "redis.asyncio.Redis(host, port) with its defaults (socket_timeout 5 s, pool of up to 100, "
        "hiredis when installed); bytes in, bytes out (no codec); MGET / MSET"
    )
    #: Extra keyword arguments for ``redis.asyncio.Redis``.
    extra: ClassVar[dict[str, Any]] = {}

    def expected(self) -> object:
        return SESSION_JSON

    async def setup(self) -> None:
        from redis.asyncio import Redis

        t = self.target
        self.redis = Redis(
            host=t.host, port=t.port, db=t.db, username=t.username, password=t.password, **self.extra
        )
        await self.redis.ping()

    async def teardown(self) -> None:
        await self.redis.aclose()

    async def set(self, key: str) -> None:
        await self.redis.set(key, SESSION_JSON)

    async def get(self, key: str) -> object:
        return await self.redis.get(key)

    async def batch_set(self, keys: Sequence[str]) -> None:
        await self.redis.mset(dict.fromkeys(keys, SESSION_JSON))

    async def batch_get(self, keys: Sequence[str]) -> Sequence[object]:
        return await self.redis.mget(keys)


class RedisPyNoTimeoutAdapter(RedisPyAdapter):
    name = "redis-py (no timeout)"
    slug = "redispy-nt"
    config = "as redis-py, with socket_timeout=None (no per-call timeout wrappers; a stalled server hangs)"
    extra: ClassVar[dict[str, Any]] = {"socket_timeout": None}


class RedisPyJsonAdapter(RedisPyAdapter):
    """The same job as kivigo-async's: values go through JSON both ways."""

    name = "redis-py + orjson"
    slug = "redispy-json"
    config = "as redis-py, encoding with orjson.dumps and decoding each value with orjson.loads"

    def expected(self) -> object:
        return SESSION

    async def set(self, key: str) -> None:
        await self.redis.set(key, orjson.dumps(SESSION))

    async def get(self, key: str) -> object:
        data = await self.redis.get(key)
        return None if data is None else orjson.loads(data)

    async def batch_set(self, keys: Sequence[str]) -> None:
        await self.redis.mset({key: orjson.dumps(SESSION) for key in keys})

    async def batch_get(self, keys: Sequence[str]) -> Sequence[object]:
        return [None if v is None else orjson.loads(v) for v in await self.redis.mget(keys)]


class AiocacheAdapter(Adapter):
    name = "aiocache"
    slug = "aiocache"
    package = "aiocache"
    requires = ("aiocache",)
    config = (
        f"RedisCache(serializer=JsonSerializer(), pool_max_size={POOL}): default timeout 5 s "
        "(asyncio.wait_for per call), stdlib json; multi_get / multi_set"
    )

    async def setup(self) -> None:
        aiocache: Any = importlib.import_module("aiocache")
        serializers: Any = importlib.import_module("aiocache.serializers")
        t = self.target
        pool_kwargs = {"username": t.username} if t.username else None
        self.cache = aiocache.RedisCache(
            serializer=serializers.JsonSerializer(),
            endpoint=t.host,
            port=t.port,
            db=t.db,
            password=t.password,
            pool_max_size=POOL,
            connection_pool_kwargs=pool_kwargs,
        )

    async def teardown(self) -> None:
        await self.cache.close()

    async def set(self, key: str) -> None:
        await self.cache.set(key, SESSION)

    async def get(self, key: str) -> object:
        return await self.cache.get(key)

    async def batch_set(self, keys: Sequence[str]) -> None:
        await self.cache.multi_set([(k, SESSION) for k in keys])

    async def batch_get(self, keys: Sequence[str]) -> Sequence[object]:
        values: list[object] = await self.cache.multi_get(list(keys))
        return values


class CashewsAdapter(Adapter):
    name = "cashews"
    slug = "cashews"
    package = "cashews"
    requires = ("cashews",)
    config = (
        f"Cache().setup(url, max_connections={POOL}): default pickle serializer, socket_timeout 1 s, "
        "suppress=True (errors swallowed); get_many (MGET) / set_many (pipeline of SETs). "
        "The default pool of 10 starves 64 tasks"
    )

    async def setup(self) -> None:
        from cashews import Cache

        self.cache = Cache()
        self.cache.setup(self.target.url, max_connections=POOL)
        await self.cache.init()

    async def teardown(self) -> None:
        await self.cache.close()

    async def set(self, key: str) -> None:
        await self.cache.set(key, SESSION)

    async def get(self, key: str) -> object:
        return await self.cache.get(key)

    async def batch_set(self, keys: Sequence[str]) -> None:
        await self.cache.set_many(dict.fromkeys(keys, SESSION))

    async def batch_get(self, keys: Sequence[str]) -> Sequence[object]:
        return await self.cache.get_many(*keys)


class KeyValueAdapter(Adapter):
    name = "py-key-value-aio"
    slug = "pkv"
    package = "py-key-value-aio"
    requires = ("key_value.aio.stores.redis",)
    config = (
        "RedisStore(host, port, default_collection=...): its own redis.asyncio client with defaults "
        "(decode_responses=True), values wrapped in a JSON entry with timestamps; get_many (MGET) / "
        "put_many (MSET)"
    )

    async def setup(self) -> None:
        from key_value.aio.stores.redis import RedisStore

        t = self.target
        # The collection is the first part of every stored key: keep it under the bench prefix.
        self.store = RedisStore(
            host=t.host,
            port=t.port,
            db=t.db,
            username=t.username,
            password=t.password,
            default_collection=f"{KEY_PREFIX}pkv",
        )
        await self.store.setup()

    async def teardown(self) -> None:
        await self.store.close()

    async def set(self, key: str) -> None:
        await self.store.put(key, SESSION)

    async def get(self, key: str) -> object:
        return await self.store.get(key)

    async def batch_set(self, keys: Sequence[str]) -> None:
        await self.store.put_many(list(keys), [SESSION] * len(keys))

    async def batch_get(self, keys: Sequence[str]) -> Sequence[object]:
        values: Sequence[object] = await self.store.get_many(list(keys))
        return values


#: In report order; the first raw redis-py is the baseline every ratio divides by.
ADAPTERS: tuple[type[Adapter], ...] = (
    KivigoAdapter,
    KivigoPoolAdapter,
    KivigoTypedAdapter,
    KivigoBytesAdapter,
    KivigoCachedAdapter,
    RedisPyAdapter,
    RedisPyNoTimeoutAdapter,
    RedisPyJsonAdapter,
    AiocacheAdapter,
    CashewsAdapter,
    KeyValueAdapter,
)
BASELINE = RedisPyAdapter.name
