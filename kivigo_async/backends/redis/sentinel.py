"""The Redis Sentinel backend: a :class:`RedisBackend` whose pool follows the current primary."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
)
from redis.exceptions import AuthenticationError, ReadOnlyError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ...errors import BackendUnavailableError, ConfigurationError
from ._errors import DialTimeoutError, is_dial_timeout, strip_echo, where
from ._mux import Arg, Opener, pack, tcp_opener
from .options import (
    URL_OPTIONS,
    RedisOptions,
    _default_pool_size,
    check_addr,
    checked_replace,
    join_addr,
    query_text,
    refuse_unescaped_credentials,
    refuse_unknown_options,
    split_url,
    url_query,
    url_unquote,
)
from .standalone import (
    RedisBackend,
    _ClosablePool,
    _DialBounded,
    _mux_for,
    _pool_for,
    _read_one,
    _TLSContextConnection,
    no_maintenance_notifications,
)

__all__ = ["RedisSentinelBackend", "RedisSentinelOptions"]

_log = logging.getLogger(__name__)

# Subscriptions to the sentinels start at least this far apart, so that a sentinel
# outage never turns into a busy loop (and one lost after a while is replaced at once).
_WATCH_RETRY_DELAY = 0.5
#: How long connect() waits for the failover subscription when dial_timeout is None.
_SUBSCRIBE_WAIT = 5.0
#: How long the subscribed sentinel may stay silent, and then take to answer a PING,
#: when read_timeout is None.
_WATCH_SILENCE = 5.0


@dataclass(frozen=True)
class RedisSentinelOptions:
    """How :class:`RedisSentinelBackend` finds and connects to the primary.

    The data-connection fields (``username`` ... ``protocol``) mean what they
    mean in :class:`RedisOptions` and are validated the same way.

    Attributes:
        sentinels: sentinel addresses, ``"host:port"`` each.
        service_name: the name the sentinels monitor the primary under.
        sentinel_username: the ACL user for the sentinels, if they need one.
        sentinel_password: the sentinels' password (never shown), if any.
        sentinel_tls: TLS for the sentinels; ``None`` means the same as ``tls``.
        auto_pipeline: as in :class:`RedisOptions` (on by default): single commands
            share one multiplexed connection to the primary, which asks the sentinels
            where the primary is each time it connects. Transactions that watch
            keys take a pooled connection.

    Example:
        >>> opts = RedisSentinelOptions(sentinels=["s1:26379", "s2:26379"], service_name="cache",
        ...                             password="s3cret", sentinel_password="t0ken")
        >>> "s3cret" in repr(opts) or "t0ken" in repr(opts)
        False
    """

    sentinels: Sequence[str] = ("localhost:26379",)
    service_name: str = "mymaster"
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    db: int = 0
    pool_size: int = field(default_factory=_default_pool_size)
    min_idle_conns: int = 0
    max_retries: int = 3
    dial_timeout: float | None = 5.0
    read_timeout: float | None = 3.0
    write_timeout: float | None = None
    pool_timeout: float | None = None
    tls: bool | ssl.SSLContext = False
    client_name: str | None = None
    protocol: int | None = None
    sentinel_username: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    sentinel_tls: bool | ssl.SSLContext | None = None
    auto_pipeline: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.sentinels, str) or not isinstance(self.sentinels, Sequence):
            raise ConfigurationError("sentinels must be a list of 'host:port' strings")
        object.__setattr__(self, "sentinels", tuple(self.sentinels))
        if not self.sentinels:
            raise ConfigurationError("sentinels needs at least one address")
        if not isinstance(self.service_name, str) or not self.service_name:
            raise ConfigurationError("service_name must be a non-empty string")
        for name in ("sentinel_username", "sentinel_password"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                # The value is not quoted: it may be the password itself.
                raise ConfigurationError(f"{name} must be a str or None")
        if self.sentinel_tls is not None and not isinstance(self.sentinel_tls, (bool, ssl.SSLContext)):
            raise ConfigurationError(
                "sentinel_tls must be None (same as tls), True, False or an ssl.SSLContext"
            )
        for addr in self.sentinels:
            check_addr(addr, "an address in sentinels", "RedisSentinelOptions.from_url()")
        self.data_options()
        for addr in self.sentinels:
            self.sentinel_options(addr)

    def data_options(self) -> RedisOptions:
        """:class:`RedisOptions` for connections to the primary (its address comes from the sentinels)."""
        return RedisOptions(
            addr=self.sentinels[0],
            username=self.username,
            password=self.password,
            db=self.db,
            pool_size=self.pool_size,
            min_idle_conns=self.min_idle_conns,
            max_retries=self.max_retries,
            dial_timeout=self.dial_timeout,
            read_timeout=self.read_timeout,
            write_timeout=self.write_timeout,
            pool_timeout=self.pool_timeout,
            tls=self.tls,
            client_name=self.client_name,
            protocol=self.protocol,
            auto_pipeline=self.auto_pipeline,
        )

    def sentinel_options(self, addr: str) -> RedisOptions:
        """:class:`RedisOptions` for one sentinel."""
        return RedisOptions(
            addr=addr,
            username=self.sentinel_username,
            password=self.sentinel_password,
            pool_size=2,
            max_retries=self.max_retries,
            dial_timeout=self.dial_timeout,
            # Never None: a look-up waiting on a silent sentinel (its host lost, a
            # partition: no FIN, no RST) would never ask the next one, and on the
            # multiplexed transport every call waits on that one connect.
            read_timeout=self.read_timeout if self.read_timeout is not None else _WATCH_SILENCE,
            tls=self.tls if self.sentinel_tls is None else self.sentinel_tls,
            # protocol=2 is for servers without HELLO, and their sentinels lack it just the same.
            protocol=self.protocol,
        )

    def replace(self, **changes: object) -> RedisSentinelOptions:
        """Return a copy with ``changes`` applied (and validated)."""
        return checked_replace(self, changes)

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> RedisSentinelOptions:
        """Parse ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db][?...]``.

        ``rediss+sentinel://`` turns TLS on. The credentials are the primary's;
        query options are those of :meth:`RedisOptions.from_url` plus
        ``sentinel_username`` and ``sentinel_password``. ``overrides`` win.

        Example:
            >>> o = RedisSentinelOptions.from_url("redis+sentinel://:pw@s1:26379,s2:26379/cache/2")
            >>> (o.sentinels, o.service_name, o.db)
            (('s1:26379', 's2:26379'), 'cache', 2)
        """
        parts = split_url(url)
        refuse_unescaped_credentials(parts)
        scheme = parts.scheme.lower()
        if scheme not in ("redis+sentinel", "rediss+sentinel", "valkey+sentinel", "valkeys+sentinel"):
            raise ConfigurationError(
                f"unsupported URL scheme {scheme!r}: use redis+sentinel:// or rediss+sentinel://"
            )
        userinfo, _, hosts = parts.netloc.rpartition("@")
        entries = [h.strip() for h in hosts.split(",") if h.strip()]
        if not entries:
            raise ConfigurationError("a sentinel URL needs at least one host:port")
        sentinels = [_sentinel_addr(entry, n) for n, entry in enumerate(entries, 1)]
        path = [p for p in parts.path.split("/") if p]
        if not path or len(path) > 2:
            raise ConfigurationError("a sentinel URL needs a path /service_name[/db]")
        query = {k: v[0] for k, v in url_query(parts.query).items()}
        refuse_unknown_options(parts.query, URL_OPTIONS | {"sentinel_username", "sentinel_password"})
        kwargs: dict[str, object] = {
            "sentinels": sentinels,
            "service_name": url_unquote(path[0], "the service name"),
        }
        for name in ("sentinel_username", "sentinel_password"):
            if name in query:
                kwargs[name] = query.pop(name)
        # The data-connection part reads like a plain URL: let RedisOptions parse it.
        plain = f"{scheme.partition('+')[0]}://{userinfo + '@' if userinfo else ''}{sentinels[0]}"
        if len(path) == 2:
            plain += f"/{path[1]}"
        if query:
            plain += "?" + query_text(query)
        base = RedisOptions.from_url(plain)
        ours = {f.name for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(RedisOptions):
            if f.name in ours:
                kwargs.setdefault(f.name, getattr(base, f.name))
        kwargs.update(overrides)
        try:
            return cls(**kwargs)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ConfigurationError(str(exc)) from None


#: The port of a sentinel given without one in a URL.
_SENTINEL_PORT = 26379


def _sentinel_addr(entry: str, number: int) -> str:
    """``host:port`` of the ``number``-th sentinel of a URL, ``host[:port]`` or ``[v6][:port]``.

    The entry is not quoted in errors: it comes from the URL's host part, which a
    password with an unescaped separator can spill into.
    """
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or ":" not in host:
            raise ConfigurationError(
                f"invalid sentinel URL: sentinel {number} is not host[:port] or [IPv6][:port]"
            )
        sep, port = rest[:1], rest[1:]
        if rest and sep != ":":
            raise ConfigurationError(f"invalid sentinel URL: sentinel {number} has text after ']'")
    else:
        # A bare IPv6 address would be ambiguous: it must be in brackets.
        host, sep, port = entry.partition(":")
        if ":" in port:
            raise ConfigurationError(
                f"invalid sentinel URL: sentinel {number} has more than one ':' "
                "(put an IPv6 address in brackets)"
            )
    if not host:
        raise ConfigurationError(f"invalid sentinel URL: sentinel {number} has no host")
    if not sep:
        return join_addr(host, _SENTINEL_PORT)
    # ASCII digits only: int() also takes "+5", "1_2" and fullwidth digits.
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigurationError(f"invalid sentinel URL: sentinel {number} needs a port from 1 to 65535")
    return join_addr(host, int(port))


class _BlockingSentinelPool(SentinelConnectionPool, _ClosablePool):
    """Sentinel-managed connections in the standalone pool: waits for a free one, stays closed once closed."""

    #: Bumped whenever the backend leaves the primary: see _SentinelConnection.connect_check_health.
    failovers = 0
    #: Look-ups for a connection not answered yet: their answer is not in ``named`` yet.
    lookups_under_way = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init: Callable[..., None] = super().__init__
        init(*args, **kwargs)
        #: Every primary named to a connection (pooled or multiplexed) since the backend
        #: last left the primary: where its connections may be. See _confirm_subscription.
        self.named: set[tuple[str, int]] = set()

    async def get_master_address(self) -> tuple[str, int]:
        look_up: Callable[[], Awaitable[tuple[str, int]]] = super().get_master_address
        self.lookups_under_way += 1
        try:
            address = await look_up()
        finally:
            self.lookups_under_way -= 1
        self.named.add(address)
        return address

    async def release(self, connection: AbstractConnection) -> None:
        # The failover mark is for the holder that had the connection when the
        # primary changed; given back, it would fail the next caller's first use.
        if isinstance(connection, _SentinelConnection):
            connection.dropped_by_failover = False
        give_back: Callable[[AbstractConnection], Awaitable[None]] = super().release
        await give_back(connection)


class _SentinelConnection(_DialBounded, SentinelManagedConnection):
    """A sentinel-managed connection that asks the sentinels before every (re)connect.

    redis-py asks them only in ``connect()``; a command retried after its connection
    was dropped (as on ``+switch-master``) reconnects through ``connect_check_health``
    to the address it had, the demoted primary, which goes on acknowledging writes
    that are lost when the sentinels turn it into a replica seconds later.
    """

    #: Set by a failover on the connections in use: see connect_check_health.
    dropped_by_failover = False

    async def connect(self) -> None:
        # redis-py's looks the primary up, then connects through connect_to(): here the
        # look-up is connect_check_health's, so one failover check covers both.
        retry: Any = self.retry
        # As redis-py's own connect(): a try that failed part-way is disconnected, or
        # the next would find the socket open and skip the login.
        await retry.call_with_retry(
            lambda: self.connect_check_health(check_health=True, retry_socket_connect=False),
            lambda error: self.disconnect(),
        )

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self.is_connected:
            return
        # Before asking the sentinels: the look-up would open a sentinel connection
        # that the closed backend no longer closes.
        self.refuse_if_closed()
        if self.dropped_by_failover:
            # Its holder must hear of it: redis-py would reconnect a watching
            # transaction to the new primary without its WATCH, and its EXEC would
            # then commit unwatched over a concurrent change. A plain command is
            # retried (on the new primary) like after any lost connection.
            self.dropped_by_failover = False
            raise RedisConnectionError("the primary changed (a failover) while the connection was in use")
        pool: Any = self.connection_pool
        connect: Callable[[bool, bool], Awaitable[None]] = super().connect_check_health
        while True:
            # Read before the look-up, with no pause since the check above. A failover
            # the backend handles from here until the socket is ready cannot reach
            # this connection (disconnect() does nothing to a socket not open yet),
            # and the look-up may have been answered before the switch: the address
            # may be the demoted primary's, which acknowledges writes it then loses.
            failovers: int = pool.failovers
            try:
                if pool.is_master:
                    self.host, self.port = await pool.get_master_address()
                await connect(check_health, retry_socket_connect)
            except RedisError:
                if pool.failovers == failovers:
                    raise
                # The failover's disconnect() cut the login: that is no failure of ours.
            if pool.failovers == failovers:
                return
            _log.debug("%s: the primary changed while connecting, asking the sentinels again", self)
            await self.disconnect()
            # Marked as in use by that failover, but nothing was sent on this socket:
            # its holder has nothing to hear of, and the connect starts over.
            self.dropped_by_failover = False
            self.refuse_if_closed()


class _SentinelTLSConnection(_TLSContextConnection, _SentinelConnection):
    """A sentinel-managed connection wrapped in the caller's :class:`ssl.SSLContext`."""


class _Sentinel(Sentinel):
    """redis-py's sentinel client, with errors that say what each sentinel answered.

    redis-py lists the sentinels' failures as the reprs of its clients and
    errors, which in redis-py 8 leave out the error's text ("auth:AuthenticationError"),
    so a wrong sentinel password or an untrusted certificate could not be told
    apart. Here each sentinel is named by its address, with its error's message
    (redis-py's messages hold no credentials); when every sentinel refused the
    credentials, the error is an authentication error, reported as such.
    """

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        problems: list[str] = []
        refused = timed_out = 0
        sentinels: list[Redis] = self.sentinels
        # A copy: concurrent look-ups reorder the list while this one waits on a sentinel.
        for sentinel in list(sentinels):
            kwargs = sentinel.connection_pool.connection_kwargs
            name = f"sentinel {kwargs.get('host')}:{kwargs.get('port')}"
            try:
                masters = await sentinel.sentinel_masters()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                refused += isinstance(exc, AuthenticationError)
                timed_out += is_dial_timeout(exc)
                problems.append(f"{name}: {strip_echo(str(exc))}")
                continue
            except ResponseError as exc:
                # Not a sentinel (a data node answers "unknown command"), or one whose
                # ACL refuses the look-up (NOPERM): the next ones may still answer.
                problems.append(f"{name}: {strip_echo(str(exc))}")
                continue
            state = masters.get(service_name) if isinstance(masters, dict) else None
            if state and self.check_master_state(state, service_name):
                # The sentinel that answered is asked first next time, as redis-py does.
                self.ask_first(sentinel)
                return state["ip"], int(state["port"])
            problems.append(f"{name}: no healthy primary known under that name")
        detail = "; ".join(problems)
        if refused and refused == len(sentinels):
            raise AuthenticationError(f"every sentinel refused the credentials ({detail})")
        if timed_out and timed_out == len(sentinels):
            # Reported as a dial timeout (ConnectTimeoutError), as a single server's is.
            raise DialTimeoutError(f"no sentinel answered: {detail}")
        raise MasterNotFoundError(f"no primary found for {service_name!r} ({detail})")

    def ask_first(self, sentinel: Redis) -> None:
        """Swap ``sentinel`` with the first one, so that look-ups ask it first."""
        # By its position now: look-ups run concurrently and may have moved it, and a
        # swap by a stale position would list one sentinel twice and drop another.
        sentinels: list[Redis] = self.sentinels
        position = sentinels.index(sentinel)
        sentinels[0], sentinels[position] = sentinel, sentinels[0]


_REFUSED_BY_REPLICA = "The previous master is now a slave"


def _demoted(exc: Exception) -> bool:
    """Whether ``exc`` is a demoted primary's refusal of a write (nothing was applied)."""
    # redis-py's parser raises READONLY as ReadOnlyError and cuts the prefix off
    # its message; the multiplexed connection keeps the server's text; and
    # redis-py's sentinel connection turns the refusal of a batch (on the pool)
    # into a connection error of its own.
    if isinstance(exc, ResponseError):
        return isinstance(exc, ReadOnlyError) or str(exc).startswith("READONLY")
    return isinstance(exc, RedisConnectionError) and str(exc) == _REFUSED_BY_REPLICA


async def _read_from_primary(conn: AbstractConnection) -> Any:
    """A pooled reply; a connection that reached a replica is dropped.

    Dropped, it asks the sentinels for the primary before its next command;
    otherwise it would stay on the replica, and every write it carries would be
    refused. (redis-py's ``SentinelManagedConnection.read_response`` would drop it
    too, but turns the refusal into a connection error, retried only as often as
    ``max_retries`` allows, with backoff.)
    """
    try:
        return await _read_one(conn)
    except ResponseError as exc:
        if _demoted(exc):
            await conn.disconnect()
        raise


# redis-py leaves these untyped; typed references keep the rest checked.
_make_sentinel: Callable[..., _Sentinel] = _Sentinel
_make_pool: Callable[..., _BlockingSentinelPool] = _BlockingSentinelPool


class RedisSentinelBackend(RedisBackend):
    """A backend on the primary of a Sentinel-monitored Redis / Valkey deployment.

    Every command is :class:`RedisBackend`'s; only the connections differ:
    each new one asks the sentinels for the primary's address. After
    :meth:`connect` the backend also listens for the sentinels' ``+switch-master``
    announcements and leaves a demoted primary at once, so writes go to the new
    primary right after a failover (without it, they follow once the old primary
    refuses writes or goes away).

    Example:
        ```python
        from kivigo_async import Client
        from kivigo_async.backends.redis import RedisSentinelBackend, RedisSentinelOptions

        options = RedisSentinelOptions(sentinels=["s1:26379", "s2:26379", "s3:26379"], service_name="cache")
        async with Client(RedisSentinelBackend(options)) as client:
            await client.set("k", "v")
        ```
    """

    def __init__(self, options: RedisSentinelOptions | None = None) -> None:
        sentinel_options = options if options is not None else RedisSentinelOptions()
        data_options = sentinel_options.data_options()
        # The standalone backend would multiplex to a fixed address: the mux is built below.
        super().__init__(data_options.replace(auto_pipeline=False))
        self._sentinel_options = sentinel_options
        # The standalone pool built above carries our timeouts, credentials, retry
        # policy and TLS context; the sentinel pool reuses its settings, minus the
        # fixed address (never connected, so nothing to close).
        kwargs = dict(self._pool.connection_kwargs)
        kwargs.pop("host", None)
        kwargs.pop("port", None)
        tls_context = kwargs.pop("tls_context", None)
        kwargs["connection_class"] = _SentinelConnection
        if tls_context is not None:
            kwargs["connection_class"] = _SentinelTLSConnection
            kwargs["tls_context"] = tls_context
        self._sentinel = _make_sentinel([])
        self._sentinel.sentinels = [
            Redis.from_pool(_pool_for(sentinel_options.sentinel_options(addr)))
            for addr in sentinel_options.sentinels
        ]
        self._sentinel_pool = self._pool = _make_pool(
            sentinel_options.service_name,
            self._sentinel,
            max_connections=self._pool.max_connections,
            timeout=self._pool.timeout,
            maint_notifications_config=no_maintenance_notifications(),
            **kwargs,
        )
        self._redis = Redis.from_pool(self._pool)
        self._node = f"{sentinel_options.service_name} (via sentinels {','.join(sentinel_options.sentinels)})"
        self._exec = self._pool_execute
        if data_options.auto_pipeline:
            self._options = data_options
            self._mux = _mux_for(data_options, node=self._node, resolve=self._primary_opener(tls_context))
            self._exec = self._mux_execute
        self._watcher: asyncio.Task[None] | None = None
        # Set once a sentinel confirms the subscription, or every sentinel failed once.
        self._watch_ready = asyncio.Event()
        self._subscribed_once = False
        # Whether connect() went on to its own look-up before any confirmation came.
        self._looked_up_unsubscribed = False

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> RedisSentinelBackend:
        """Build a backend from a ``redis+sentinel://`` URL; see :meth:`RedisSentinelOptions.from_url`.

        Example:
            ```python
            backend = RedisSentinelBackend.from_url("redis+sentinel://:secret@s1:26379,s2:26379/cache")
            ```
        """
        return cls(RedisSentinelOptions.from_url(url, **overrides))

    def __repr__(self) -> str:
        opts = self._sentinel_options
        return (
            f"RedisSentinelBackend(service_name={opts.service_name!r}, "
            f"sentinels={list(opts.sentinels)!r}, db={opts.db})"
        )

    @property
    def sentinel_options(self) -> RedisSentinelOptions:
        """The options this backend was built with."""
        return self._sentinel_options

    @property
    def sentinel(self) -> Sentinel:
        """The underlying ``redis.asyncio.sentinel.Sentinel``."""
        return self._sentinel

    def _primary_opener(self, tls: ssl.SSLContext | None) -> Callable[[], Awaitable[tuple[Opener, str]]]:
        primary: Callable[[], Awaitable[tuple[str, int]]] = self._sentinel_pool.get_master_address

        async def resolve() -> tuple[Opener, str]:
            # Asked on every (re)connect, as the pooled connections do: a reconnect
            # to the address used before could reach a demoted primary.
            host, port = await primary()
            return tcp_opener(host, port, tls), f"the primary {join_addr(host, port)}"

        return resolve

    async def _pool_execute(self, *args: Arg) -> Any:
        payload = pack(args)
        try:
            return await self._pool_call(payload, _read_from_primary)
        except ResponseError as exc:
            if not _demoted(exc):
                raise
            # As on the multiplexed connection: the replica applied nothing, so the
            # command is sent once more, to the primary the sentinels name now. The
            # idle connections may be on the replica too; dropped, they ask again.
            _log.info("%s: the primary was demoted, reconnecting", self._node)
            await self._pool.disconnect(inuse_connections=False)
            return await self._pool_call(payload, _read_from_primary)

    async def _mux_execute(self, *args: Arg) -> Any:
        mux = self._mux
        assert mux is not None
        try:
            return await mux.execute(*args)
        except ResponseError as exc:
            if not _demoted(exc):
                raise
            # The server is a replica now: it refused the command, so sending it
            # again (once, to the primary the sentinels name now) is safe.
            _log.info("%s: the primary was demoted, reconnecting", self._node)
            mux.reconnect(wait_for_replies=True)  # a replica acknowledges no write
            return await mux.execute(*args)

    def _error(self, exc: Exception, command: str, key: str | None = None) -> Exception:
        if _demoted(exc):
            # Batches and retried commands end here: leave the demoted primary for the next call.
            self._server_changes += 1
            if self._mux is not None:
                self._mux.reconnect(wait_for_replies=True)
            return BackendUnavailableError(
                f"{where(command, key, self._node)}: the server is no longer the primary (a failover?); "
                f"the next call asks the sentinels again ({exc})"
            )
        return super()._error(exc, command, key)

    async def _leave_primary(self) -> None:
        """Reconnect to the primary the sentinels name now."""
        self._server_changes += 1
        # Before any pause: the pooled connects under way see it once their socket is
        # ready, and look the primary up again. Every connection is left below, so
        # from here on the only addresses in use are those the sentinels name next.
        self._sentinel_pool.failovers += 1
        self._sentinel_pool.named = set()
        if self._mux is not None:
            # The calls in flight fail: the old primary could acknowledge a write that
            # is lost once it turns replica, and a lost write must not look like a success.
            self._mux.reconnect(wait_for_replies=False)
        for connection in self._pool._in_use_connections:
            if isinstance(connection, _SentinelConnection):
                connection.dropped_by_failover = True
        await self._pool.disconnect(inuse_connections=True)

    async def connect(self) -> None:
        """Start following failovers, then find the primary and check it answers.

        The subscription to ``+switch-master`` comes first, and is confirmed by a
        sentinel before the primary is looked up: a failover that completes after
        this returns is always announced to the backend, and one that completed
        before is found by the look-up. When no sentinel confirms it within
        ``dial_timeout``, the look-up goes ahead; the confirmation that comes later
        looks the primary up once more and leaves the one found here if it changed.
        """
        if self._watcher is None or self._watcher.done():
            self._watch_ready = asyncio.Event()
            self._subscribed_once = False
            self._looked_up_unsubscribed = False
            self._watcher = asyncio.create_task(self._follow_failovers(), name=f"kivigo {self._node}")
        wait = self._sentinel_options.dial_timeout or _SUBSCRIBE_WAIT
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._watch_ready.wait(), wait)
        if not self._subscribed_once:
            # Degraded, not broken: the watcher keeps trying, and without it writes
            # still follow a failover once the old primary refuses them or goes away.
            # (No sentinel answering at all fails the look-up below.)
            _log.warning("%s: no sentinel confirmed the failover subscription", self._node)
            self._looked_up_unsubscribed = True
        await super().connect()

    async def close(self) -> None:
        # Before the first pause: a look-up in flight (redis-py retries it on a new
        # socket once the sentinel clients close theirs) must find its pool closed,
        # or it opens a sentinel connection nobody closes any more.
        for sentinel in self._sentinel.sentinels:
            pool = sentinel.connection_pool
            if isinstance(pool, _ClosablePool):
                pool.closed = True
        if self._watcher is not None:
            self._watcher.cancel()
        # The rest runs in the standalone backend's shielded closing task: a caller
        # cancelled while it waits is cancelled for real, and the closing still ends.
        await super().close()

    async def _close_all(self) -> None:
        watcher, self._watcher = self._watcher, None
        try:
            if watcher is not None:
                # gather, not a suppressed await: a watcher that failed must not stop the closing.
                [outcome] = await asyncio.gather(watcher, return_exceptions=True)
                if isinstance(outcome, Exception):
                    _log.warning("%s: the failover watcher had failed: %r", self._node, outcome)
            await super()._close_all()
        finally:
            close_sentinels: Callable[[], Awaitable[None]] = self._sentinel.aclose
            with contextlib.suppress(RedisError):
                await close_sentinels()

    async def _confirm_subscription(self, sentinel: Redis) -> None:
        """A sentinel confirmed the subscription: release connect(), and after a gap, catch up."""
        # It answers: look-ups must not wait first on the silent sentinel it replaces.
        self._sentinel.ask_first(sentinel)
        gap = "re-subscribed to the sentinels"
        if not self._subscribed_once:
            self._subscribed_once = True
            self._watch_ready.set()
            if not self._looked_up_unsubscribed:
                return  # connect() looks the primary up next
            gap = "subscribed to the sentinels only after connect()"
        # Re-subscribed after losing a sentinel, or first subscribed after connect()
        # looked the primary up: a switch announced in the gap was missed, so
        # reconnect unless every address named to a connection since the backend last
        # left the primary is the primary's, and no look-up (asked before the switch,
        # perhaps) is still to name one. Not redis-py's master_address: that is the
        # latest look-up's answer only, and any pooled connect (a transaction watching
        # keys) moves it to the new primary while the multiplexed connection and the
        # busy pooled ones are still on the old one.
        pool = self._sentinel_pool
        try:
            primary = await self._sentinel.discover_master(self._sentinel_options.service_name)
        except (RedisError, OSError) as exc:
            _log.debug("%s: cannot ask the sentinels for the primary: %s", self._node, exc)
            primary = None
        if primary is None or pool.named - {primary} or pool.lookups_under_way:
            _log.info("%s: %s, reconnecting to the primary", self._node, gap)
            await self._leave_primary()

    async def _follow_failovers(self) -> None:
        service = self._sentinel_options.service_name
        # A sentinel that goes silent (its host lost, a partition) sends no FIN or
        # RST: unless silence is bounded, the watcher waits on it for good, deaf to
        # every later failover, while the old primary acknowledges writes it loses.
        bound = self._sentinel_options.read_timeout or _WATCH_SILENCE
        # A copy: look-ups reorder the list, and each sentinel must get its turn.
        order = list(self._sentinel.sentinels)
        loop = asyncio.get_running_loop()
        index = 0
        while True:
            sentinel = order[index % len(order)]
            index += 1
            started = loop.time()
            pubsub = sentinel.pubsub()
            try:
                await self._check_monitors(sentinel, service, bound)
                await pubsub.subscribe("+switch-master")
                await self._listen(sentinel, pubsub, service.encode(), bound)
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                _log.debug("%s: lost a sentinel subscription: %s", self._node, exc)
                if index >= len(order):
                    self._watch_ready.set()  # every sentinel tried: connect() waits no longer
            finally:
                close_pubsub: Callable[[], Awaitable[None]] = pubsub.aclose
                with contextlib.suppress(RedisError, OSError):
                    await close_pubsub()
            await asyncio.sleep(max(0.0, started + _WATCH_RETRY_DELAY - loop.time()))

    async def _check_monitors(self, sentinel: Redis, service: str, bound: float) -> None:
        """Refuse to listen to a server that would never announce a failover of ``service``.

        A data node (a wrong address in the list) accepts SUBSCRIBE just the same,
        and so does a sentinel that monitors other primaries only.
        """
        masters: Callable[[], Awaitable[Any]] = sentinel.sentinel_masters
        known = await asyncio.wait_for(masters(), bound)
        if not isinstance(known, dict) or service not in known:
            raise ResponseError(f"the sentinel does not monitor {service!r}")

    async def _listen(self, sentinel: Redis, pubsub: PubSub, service: bytes, bound: float) -> None:
        """Follow the announcements until the subscription fails or stays silent too long."""
        pinged = False
        while True:
            message: dict[str, Any] | None = await pubsub.get_message(timeout=bound)
            if message is None:
                if pinged:
                    raise RedisTimeoutError(f"the sentinel did not answer a PING within {bound:g} s")
                await pubsub.ping()
                pinged = True
                continue
            pinged = False  # whatever came, the sentinel is there
            kind, data = message.get("type"), message.get("data")
            if kind == "subscribe":
                await self._confirm_subscription(sentinel)
            # "<service> <old-ip> <old-port> <new-ip> <new-port>"
            elif kind == "message" and isinstance(data, bytes) and data.split(b" ", 1)[0] == service:
                _log.info("%s: primary switched, reconnecting (%s)", self._node, data.decode())
                # The others hear of the switch up to seconds later, and until then name
                # the old primary, which still takes writes: the reconnects ask this one first.
                self._sentinel.ask_first(sentinel)
                await self._leave_primary()
