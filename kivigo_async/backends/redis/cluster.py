"""The Redis Cluster / Valkey Cluster backend, on ``redis.asyncio.cluster.RedisCluster``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlunsplit

from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import LoadBalancingStrategy
from redis.commands import READ_COMMANDS
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    AuthenticationError,
    ClusterDownError,
    ClusterError,
    MovedError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..._tasks import detached
from ...backend import BackendTransaction, TxOp
from ...errors import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    ConnectTimeoutError,
    CrossSlotError,
    InvalidKeyError,
    KeyNotFoundError,
    KivigoError,
    OperationTimeoutError,
    TransactionConflictError,
)
from ...watch import DEFAULT_MAX_PENDING, ChangeStream
from ._cache import ClientCache, LocalCache
from ._cluster_cache import ClusterTracking
from ._cluster_mux import NodeConnections, Route, follow_moved
from ._cluster_scan import node_at, scan_cluster
from ._errors import is_dial_timeout, scrub_chain, translate, where
from ._mux import MuxConnection
from ._scan import decode_key
from .options import (
    URL_OPTIONS,
    RedisOptions,
    _default_pool_size,
    _int_option,
    check_addr,
    checked_replace,
    login_user,
    query_text,
    refuse_unescaped_credentials,
    refuse_unknown_options,
    split_url,
    url_query,
)
from .standalone import RedisBackend, _mux_for, _TCPConnection, _TLSConnection, no_maintenance_notifications

__all__ = ["RedisClusterBackend", "RedisClusterOptions"]

#: The query options of a cluster URL: those of a standalone one but the database
#: and idle connections, plus more seeds and the cluster's own.
_URL_OPTIONS = (URL_OPTIONS - {"db", "min_idle_conns"}) | {"addr", "max_redirects", "read_from_replicas"}

# Errors of redis-py's cluster layer: RedisClusterException is not a RedisError.
_DRIVER_ERRORS = (RedisError, RedisClusterException)
#: How many times redis-py's cluster client sends one command: the first time and
#: one redirection. Further ones are ours (see _redirected, which is given what is
#: left of max_redirects): redis-py sends ASKING and the command on two connections.
_DRIVER_SENDS = 2
#: What _run translates: the driver's errors, a key it cannot encode, and the
#: AttributeError / TypeError of a connection torn down under a call (_torn_down).
_TRANSLATED = (*_DRIVER_ERRORS, UnicodeEncodeError, AttributeError, TypeError)


@dataclass(frozen=True)
class RedisClusterOptions:
    """How :class:`RedisClusterBackend` connects.

    Durations are seconds. Fields shared with :class:`RedisOptions` mean the
    same and are validated the same way.

    Attributes:
        addrs: seed nodes, ``"host:port"`` each; one reachable seed is enough,
            the rest of the cluster is discovered from it.
        username: the ACL user; ``None`` for the default user.
        password: never shown in ``repr``, logs or error messages.
        pool_size: connections per node in redis-py's node pools (scans, and
            single-key commands and leases without ``auto_pipeline``), and the
            most of those calls and batches in flight at once; callers beyond it
            wait up to ``pool_timeout``. Transactions have a pool of their own
            per node, of the same size.
        max_retries: how many times a single-key command is retried after a
            connection error, a timeout or ``CLUSTERDOWN``, re-reading the
            cluster's layout first (that is how a promoted replica is found
            after a failover). A retried write may have been applied once
            already. A dial timeout counts too (a hung node may have been
            replaced), so a call may take ``(max_retries + 1) * dial_timeout``
            when its node hangs. Batches re-read the layout after a lost
            connection and retry reads once, writes never; a batch's commands
            refused with ``CLUSTERDOWN`` (which applied nothing) are sent again
            up to ``max_retries`` times, writes too.
        max_redirects: how many ``MOVED`` / ``ASK`` redirections one command
            may follow.
        read_from_replicas: send reads (``GET``, ``MGET``, ``EXISTS``, ``PTTL``)
            round-robin to primaries and replicas (``SCAN`` always walks the
            primaries). Replicas lag: a read may miss a write made just before it.
        dial_timeout: bound on opening a connection.
        read_timeout: bound on waiting for a reply; ``None`` waits forever.
        write_timeout: ``None`` or equal to ``read_timeout`` (one socket timeout).
        pool_timeout: how long a call waits for a free slot; ``None`` means
            ``read_timeout + 1``.
        tls: ``True`` (verified against the system trust store) or an
            :class:`ssl.SSLContext`, used for every node.
        client_name: sent with ``CLIENT SETNAME`` on every connection.
        protocol: RESP version, 2 or 3; ``None`` for redis-py's default.
        auto_pipeline: send single-key commands over one multiplexed connection
            per node, where the commands of all tasks for a node issued in the
            same event-loop iteration leave in one write. Batches always use
            these connections. ``False`` sends single-key commands through
            redis-py's cluster client and its node pools.
        client_cache: a :class:`ClientCache` turns on client-side caching of
            ``get`` and ``batch_get``, kept coherent by one broadcast-tracking
            connection per primary (see "Client-side caching" in the docs).
            Not available with ``read_from_replicas``.

    Example:
        >>> opts = RedisClusterOptions(addrs=["10.0.0.1:7000", "10.0.0.2:7000"], password="s3cret")
        >>> "s3cret" in repr(opts), opts.addrs
        (False, ('10.0.0.1:7000', '10.0.0.2:7000'))
    """

    addrs: Sequence[str] = ("localhost:6379",)
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    pool_size: int = field(default_factory=_default_pool_size)
    max_retries: int = 3
    max_redirects: int = 16
    read_from_replicas: bool = False
    dial_timeout: float | None = 5.0
    read_timeout: float | None = 3.0
    write_timeout: float | None = None
    pool_timeout: float | None = None
    tls: bool | ssl.SSLContext = False
    client_name: str | None = None
    protocol: int | None = None
    auto_pipeline: bool = True
    client_cache: ClientCache | None = None

    def __post_init__(self) -> None:
        if isinstance(self.addrs, str) or not isinstance(self.addrs, Sequence):
            raise ConfigurationError("addrs must be a list of 'host:port' strings")
        object.__setattr__(self, "addrs", tuple(self.addrs))
        if not self.addrs:
            raise ConfigurationError("addrs needs at least one seed node")
        for addr in self.addrs:
            check_addr(addr, "an address in addrs", "RedisClusterOptions.from_url()")
            self.node_options(addr)  # validates every shared field
        if not isinstance(self.max_redirects, int) or isinstance(self.max_redirects, bool):
            raise ConfigurationError(f"max_redirects must be an int, not {self.max_redirects!r}")
        if self.max_redirects < 1:
            raise ConfigurationError("max_redirects must be at least 1")
        if not isinstance(self.read_from_replicas, bool):
            raise ConfigurationError("read_from_replicas must be True or False")
        if not isinstance(self.auto_pipeline, bool):
            raise ConfigurationError("auto_pipeline must be True or False")
        if self.client_cache is not None:
            if not isinstance(self.client_cache, ClientCache):
                raise ConfigurationError("client_cache must be a ClientCache or None")
            if self.read_from_replicas:
                # A replica may answer with a value older than an invalidation already
                # processed, and nothing would ever drop that cached value.
                raise ConfigurationError(
                    "client_cache cannot be combined with read_from_replicas: a lagging replica "
                    "could put a value in the cache after its invalidation was handled"
                )

    def node_options(self, addr: str) -> RedisOptions:
        """:class:`RedisOptions` for one node of the cluster (same credentials and limits)."""
        return RedisOptions(
            addr=addr,
            username=self.username,
            password=self.password,
            pool_size=self.pool_size,
            max_retries=self.max_retries,
            dial_timeout=self.dial_timeout,
            read_timeout=self.read_timeout,
            write_timeout=self.write_timeout,
            pool_timeout=self.pool_timeout,
            tls=self.tls,
            client_name=self.client_name,
            protocol=self.protocol,
            # One multiplexed connection is bound to one address; these
            # connections must follow the primary (or serve WATCH), so use the pool.
            auto_pipeline=False,
        )

    def replace(self, **changes: object) -> RedisClusterOptions:
        """Return a copy with ``changes`` applied (and validated).

        Example:
            >>> RedisClusterOptions(addrs=["a:7000"]).replace(read_from_replicas=True).read_from_replicas
            True
        """
        return checked_replace(self, changes)

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> RedisClusterOptions:
        """Parse a seed URL: ``redis[s]://[[user]:password@]host:port[?option=value...]``.

        Takes the query options of :meth:`RedisOptions.from_url` (except ``db``:
        a cluster has only database 0, and ``min_idle_conns``), plus ``max_redirects``,
        ``read_from_replicas`` (``true``/``false``) and ``addr=host:port``
        (repeatable) for more seed nodes. ``overrides`` win over the URL.

        Example:
            >>> o = RedisClusterOptions.from_url("redis://:pw@node1:7000?addr=node2:7000&read_from_replicas=true")
            >>> (o.addrs, o.read_from_replicas)
            (('node1:7000', 'node2:7000'), True)
        """
        parts = split_url(url)
        refuse_unescaped_credentials(parts)
        if parts.scheme.lower() not in ("redis", "rediss", "valkey", "valkeys"):
            raise ConfigurationError(f"unsupported URL scheme {parts.scheme!r}: use redis:// or rediss://")
        query = url_query(parts.query, repeatable=("addr",))
        # Not dropped silently (an unknown option is an error): RedisOptions.from_url,
        # which reads the rest, takes both.
        if "db" in query:
            raise ConfigurationError("a cluster has only database 0: remove ?db= from the URL")
        if "min_idle_conns" in query:
            raise ConfigurationError(
                "min_idle_conns is not a cluster option (connections to each node open on demand): "
                "remove ?min_idle_conns= from the URL"
            )
        refuse_unknown_options(parts.query, _URL_OPTIONS)
        extra_addrs = query.pop("addr", [])
        kwargs: dict[str, object] = {}
        if "max_redirects" in query:
            kwargs["max_redirects"] = _int_option("max_redirects", query.pop("max_redirects")[-1])
        if "read_from_replicas" in query:
            raw = query.pop("read_from_replicas")[-1].lower()
            if raw not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigurationError(f"read_from_replicas must be true or false, not {raw!r}")
            kwargs["read_from_replicas"] = raw in ("true", "1", "yes")
        seed = urlunsplit(parts._replace(query=query_text(query)))
        base = RedisOptions.from_url(seed)
        if base.db != 0:
            raise ConfigurationError("a cluster has only database 0; remove the /db part of the URL")
        kwargs.update(
            addrs=(base.addr, *extra_addrs),
            username=base.username,
            password=base.password,
            pool_size=base.pool_size,
            max_retries=base.max_retries,
            dial_timeout=base.dial_timeout,
            read_timeout=base.read_timeout,
            write_timeout=base.write_timeout,
            pool_timeout=base.pool_timeout,
            tls=base.tls,
            client_name=base.client_name,
            protocol=base.protocol,
            auto_pipeline=base.auto_pipeline,
        )
        kwargs.update(overrides)
        try:
            return cls(**kwargs)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ConfigurationError(str(exc)) from None


def _cluster_for(options: RedisClusterOptions) -> RedisCluster:
    seeds = [RedisOptions(addr=addr) for addr in options.addrs]
    kwargs: dict[str, Any] = {
        "startup_nodes": [ClusterNode(seed.host, seed.port) for seed in seeds],
        "username": login_user(options.username, options.password),
        "password": options.password,
        "client_name": options.client_name,
        "max_connections": options.pool_size,
        "socket_connect_timeout": options.dial_timeout,
        "socket_timeout": options.read_timeout,
        "encoding_errors": "surrogateescape",
        "retry": Retry(ExponentialWithJitterBackoff(cap=0.512, base=0.008), options.max_retries),
        # By default every 5th MOVED reply makes redis-py close *all* connections,
        # breaking calls in flight on them; a MOVED reply updates that slot instead.
        "reinitialize_steps": 0,
        # As on our other pools: redis-py's default tries to turn them on for every
        # new node connection on RESP3, and logs a failure each time it cannot.
        "maint_notifications_config": no_maintenance_notifications(),
    }
    if options.protocol is not None:
        kwargs["protocol"] = options.protocol
    if options.read_from_replicas:
        kwargs["load_balancing_strategy"] = LoadBalancingStrategy.ROUND_ROBIN
    cluster = RedisCluster(**kwargs)
    cluster.RedisClusterRequestTTL = _DRIVER_SENDS
    # Node connections are made from these kwargs (startup nodes got a copy already),
    # so the classes are swapped in before any connection exists. Ours bound the whole
    # open, login included, by dial_timeout; redis-py's bound the login by socket_timeout
    # only, forever when read_timeout is None. redis-py also builds TLS from loose
    # arguments only, where ours take a ready context.
    tls_context = options.node_options(options.addrs[0]).ssl_context()
    connection_class = _TCPConnection if tls_context is None else _TLSConnection
    tls = {} if tls_context is None else {"tls_context": tls_context}
    cluster.connection_kwargs.update(connection_class=connection_class, **tls)
    for node in cluster.startup_nodes:
        node.connection_class = connection_class
        node.connection_kwargs.update(tls)
    return cluster


def _uncovered(exc: BaseException | None) -> bool:
    """Whether ``exc`` says no node serves some slot (in the layout just read)."""
    return isinstance(exc, SlotNotCoveredError) or (
        isinstance(exc, RedisClusterException) and "slots are not covered" in str(exc)
    )


def _outage(exc: BaseException | None) -> bool:
    """Whether ``exc`` refused a command for an outage that passes, having applied nothing."""
    return isinstance(exc, ClusterDownError) or _uncovered(exc)


def _torn_down(exc: BaseException) -> bool:
    """Whether ``exc`` is redis-py finding a connection's reader or writer gone mid-call.

    After a connection error, a pipeline retry or a ``CLUSTERDOWN`` reply, redis-py's
    cluster client closes *every* connection, including those other calls are using
    at that moment. For the caller that is a lost connection, nothing else. Those
    calls fail inside redis-py with an ``AttributeError`` on ``None`` (its reader or
    writer is gone) or, from Python 3.12, with a ``TypeError`` from asyncio's socket
    transport, whose ``writelines()`` calls a write callback that ``close()`` has
    already cleared (3.11's ``write()`` dropped the data silently instead).
    """
    tb = exc.__traceback__
    if tb is None or not isinstance(exc, (AttributeError, TypeError)):
        return False
    modules: list[str] = []
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__")
        modules.append(module if isinstance(module, str) else "")
        tb = tb.tb_next
    if isinstance(exc, AttributeError):
        return exc.obj is None and modules[-1].startswith("redis.") and not _unrouted(exc)
    return (
        modules[-1] == "asyncio.selector_events"
        and "NoneType" in str(exc)
        and any(module.startswith("redis.") for module in modules)
    )


def _unrouted(exc: BaseException) -> bool:
    """Whether ``exc`` is redis-py's cluster client following ``ASK`` to a node it does not know.

    It looks the node up by address in the layout, which lists only nodes that
    serve slots (not one joining the cluster, while its first slot migrates to
    it), and calls the ``None`` it gets: an ``AttributeError`` raised before
    anything was sent there. Recording the call's metrics may then fail the
    same way: that error comes out, the first one as its context.
    """
    error: BaseException | None = exc
    while isinstance(error, AttributeError):
        tb = error.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if (
            error.obj is None
            and error.name == "execute_command"
            and tb is not None
            and tb.tb_frame.f_code.co_name == "_execute_command"
            and tb.tb_frame.f_globals.get("__name__") == "redis.asyncio.cluster"
        ):
            return True
        error = error.__context__
    return False


def _slot(key: str) -> int:
    return key_slot(key.encode("utf-8", "surrogateescape"))


def _checked_slot(key: str) -> int:
    """:func:`_slot`, with a key UTF-8 cannot encode refused as it is everywhere else."""
    try:
        return _slot(key)
    except UnicodeEncodeError as exc:
        raise InvalidKeyError(f"key {key!r} cannot be encoded as UTF-8 (a lone surrogate?)") from exc


class RedisClusterBackend:
    """A backend on a Redis Cluster or Valkey Cluster.

    Batches are split by hash slot: one command per slot (``MGET``, ``MSET``,
    ``UNLINK``, ``EXISTS``; ``SET ... PX`` per key with a TTL), sent as one
    pipeline per node, nodes in parallel, results in input order. A batch is
    atomic per slot at most, never across slots. ``MOVED``/``ASK`` redirections
    are followed; a multi-key command refused during a slot migration
    (``TRYAGAIN``) is re-sent key by key, so callers see no error.

    ``scan`` walks every primary. Transactions (``MULTI``/``EXEC`` with
    ``WATCH``) run on the one node owning their keys, so every watched and
    written key must hash to the same slot (use hash tags:
    ``{user:1}:profile``, ``{user:1}:cart``); otherwise
    :class:`~kivigo_async.errors.CrossSlotError` is raised before anything is
    sent.

    Example:
        ```python
        from kivigo_async import Client
        from kivigo_async.backends.redis import RedisClusterBackend, RedisClusterOptions

        backend = RedisClusterBackend(RedisClusterOptions(addrs=["10.0.0.1:7000", "10.0.0.2:7000"]))
        async with Client(backend) as client:
            await client.batch_set({"a": 1, "b": 2})            # one pipeline per node
            async with client.transaction(watch=["{cart:7}:items"]) as tx:
                tx.set("{cart:7}:total", 42)                    # same slot as the watched key
        ```
    """

    def __init__(self, options: RedisClusterOptions | None = None) -> None:
        self._options = options if options is not None else RedisClusterOptions()
        self._cluster = _cluster_for(self._options)
        self._seeds = ",".join(self._options.addrs)
        # redis-py's cluster nodes fail (rather than wait) when their pool is
        # exhausted; at most pool_size calls in flight keeps each node within it.
        self._in_flight = asyncio.Semaphore(self._options.pool_size)
        self._running = 0  # calls holding an in-flight place
        pool_timeout = self._options.pool_timeout
        if pool_timeout is None and self._options.read_timeout is not None:
            pool_timeout = self._options.read_timeout + 1
        self._pool_timeout = pool_timeout
        self._node_backends: dict[str, RedisBackend] = {}
        self._closed = False
        self._closing: asyncio.Task[None] | None = None
        self._tracking: ClusterTracking | None = None
        if self._options.client_cache is not None:
            self._tracking = ClusterTracking(self, self._options.client_cache)
        self._node_conns = NodeConnections(
            self._batch_conn,
            self._relearn,
            self._cluster.nodes_manager,
            max_retries=self._options.max_retries,
            max_redirects=self._options.max_redirects,
        )

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> RedisClusterBackend:
        """Build a backend from a seed node URL; see :meth:`RedisClusterOptions.from_url`.

        Example:
            ```python
            backend = RedisClusterBackend.from_url("redis://:secret@10.0.0.1:7000?addr=10.0.0.2:7000")
            ```
        """
        return cls(RedisClusterOptions.from_url(url, **overrides))

    def __repr__(self) -> str:
        return f"RedisClusterBackend(addrs={list(self._options.addrs)!r})"

    @property
    def options(self) -> RedisClusterOptions:
        """The options this backend was built with."""
        return self._options

    @property
    def cluster(self) -> RedisCluster:
        """The underlying ``redis.asyncio.cluster.RedisCluster``, for commands kivigo does not wrap.

        It follows one ``MOVED`` / ``ASK`` redirection per command; kivigo's own
        commands follow the rest of ``max_redirects`` themselves.
        """
        return self._cluster

    @property
    def client_cache(self) -> LocalCache | None:
        """The client-side cache (``RedisClusterOptions(client_cache=...)``), for stats and listeners."""
        return self._tracking.cache if self._tracking is not None else None

    # -- plumbing --------------------------------------------------------

    def _node_of(self, key: str | None) -> str:
        """The node serving ``key`` as far as we know, for error messages."""
        if key is not None:
            try:
                node = self._cluster.nodes_manager.get_node_from_slot(_slot(key))
                return str(node.name)
            except Exception:  # unknown layout or unencodable key: name the seeds instead
                pass
        return f"cluster {self._seeds}"

    def _error(self, exc: Exception, command: str, key: str | None = None) -> KivigoError:
        # Before any message quotes it: a seed that does not know HELLO or AUTH echoes
        # the password, and redis-py's "cannot be connected" chains that reply.
        scrub_chain(exc)
        node = self._node_of(key)
        call = where(command, key, node)
        if isinstance(exc, RedisClusterException) and isinstance(exc.__cause__, AuthenticationError):
            # redis-py reports a login refused by every seed as "cannot be connected".
            return translate(exc.__cause__, command, key, node)
        if (
            isinstance(exc, RedisClusterException)
            and "cannot be connected" in str(exc)
            and is_dial_timeout(exc.__cause__)
        ):
            # redis-py keeps the last seed's error only: that seed's open timed out.
            return ConnectTimeoutError(f"{call}: no seed answered within dial_timeout: {exc}")
        # No reachable node, or no node serving some slots (while a failover runs):
        # an outage that passes, not a server error.
        if (isinstance(exc, RedisClusterException) and "cannot be connected" in str(exc)) or _uncovered(exc):
            return BackendUnavailableError(f"{call}: {exc}")
        if isinstance(exc, ClusterDownError):
            # CLUSTERDOWN / MASTERDOWN: a primary failed and no replica serves its
            # slots yet. Like a refused connection, it passes once the failover is done.
            return BackendUnavailableError(f"{call}: the cluster is down (failover in progress?): {exc}")
        if _unrouted(exc):
            return BackendError(f"{call}: redirected (ASK) to a node that is not in the cluster's layout yet")
        if _torn_down(exc):
            return BackendUnavailableError(
                f"{call}: the connection was closed while in use, by a reset of the "
                f"cluster client after a node failure ({type(exc).__name__}: {exc})"
            )
        return translate(exc, command, key, node)

    def _check_open(self, command: str) -> None:
        if self._closed:
            # redis-py's cluster client would open new connections nobody closes.
            raise BackendUnavailableError(f"{command} on cluster {self._seeds}: the backend is closed")

    async def _enter(self, command: str) -> None:
        """Take one of ``pool_size`` in-flight places; every call that takes a node
        connection must: redis-py's node pools fail at once, rather than wait, when full.

        Give it back with :meth:`_leave`.
        """
        in_flight = self._in_flight
        if not self._closed and not in_flight.locked():
            await in_flight.acquire()  # returns at once: no task for a timeout that cannot fire
        else:
            self._check_open(command)
            try:
                await asyncio.wait_for(in_flight.acquire(), self._pool_timeout)
            except asyncio.TimeoutError:
                raise OperationTimeoutError(
                    f"{command} on cluster {self._seeds}: no free connection in the pool in time"
                ) from None
            if self._closed:  # closed while this call waited for its place
                in_flight.release()
                self._check_open(command)
        self._running += 1

    async def _leave(self) -> None:
        self._running -= 1
        self._in_flight.release()
        if self._closed and not self._running:
            # Calls in flight when the backend closed may have connected again
            # (redis-py reconnects on use, without re-reading the layout, which
            # its aclose() alone would then skip): the last one out disconnects.
            await self._sweep()

    @contextlib.asynccontextmanager
    async def _slot(self, command: str) -> AsyncIterator[None]:
        """An in-flight place (see :meth:`_enter`) for the block."""
        await self._enter(command)
        try:
            yield
        finally:
            await self._leave()

    async def _sweep(self) -> None:
        """Disconnect every node again: a call under way when the backend closed opened connections."""
        sweep = detached(self._disconnect_nodes(), f"kivigo close cluster {self._seeds}")
        with contextlib.suppress(Exception):
            await asyncio.shield(sweep)

    async def _run(self, command: str, key: str | None, call: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``call`` within the in-flight limit, translating driver errors."""
        await self._enter(command)
        try:
            return await call()
        except _TRANSLATED as exc:
            if isinstance(exc, (AttributeError, TypeError)) and not (_torn_down(exc) or _unrouted(exc)):
                raise
            raise self._error(exc, command, key) from exc
        finally:
            await self._leave()

    def _exec(self, command: str, key: str, *args: Any) -> Awaitable[Any]:
        if self._options.auto_pipeline:
            return self._multiplexed(command, key, (command, key, *args), self._route)
        return self._run(command, key, functools.partial(self._driven, (command, key, *args)))

    def _keyed(self, command: str, key: str, args: tuple[Any, ...]) -> Awaitable[Any]:
        """A command whose one key is not its first argument (``EVAL``), routed by ``key``.

        The way single-key calls go, with their redirections followed (a slot
        moving to a node that joins the cluster, say).
        """
        if self._options.auto_pipeline:
            slot = _slot(key)
            nodes = self._cluster.nodes_manager
            return self._multiplexed(command, key, args, lambda _: nodes.get_node_from_slot(slot))
        return self._run(command, key, functools.partial(self._driven, args, key))

    async def _driven(self, args: tuple[Any, ...], key: str | None = None) -> Any:
        """A command through redis-py's cluster client (``auto_pipeline=False``); its key is
        ``args[1]`` unless ``key`` is given."""
        if self._cluster._initialize:  # not a coroutine per call once the layout is known
            await self._ready()
        try:
            return await self._cluster.execute_command(*args)
        except ClusterError as exc:
            if "TTL exhausted" not in str(exc):
                raise
            # redis-py gave up following redirections (see _redirected): do it ourselves,
            # within what is left of max_redirects.
            return await self._redirected(args, key, sent=_DRIVER_SENDS)
        except AttributeError as exc:
            if not _unrouted(exc):
                raise
            # redis-py could not follow ASK to a node it does not know, and sent it nothing
            # (its sends so far are not known: counted as all it may make).
            return await self._redirected(args, key, sent=_DRIVER_SENDS)

    async def _multiplexed(
        self, command: str, key: str, args: tuple[Any, ...], route: Route, *, retry: bool = True
    ) -> Any:
        """A single-key command on its node's multiplexed connection (see _cluster_mux).

        Not within the in-flight limit: that keeps redis-py's node pools from
        running out, and these calls take nothing from them. ``retry=False``: not
        sent again after a lost connection or a timeout (see ``NodeConnections.command``).
        """
        self._check_open(command)
        try:
            if self._cluster._initialize:  # not a coroutine per call once the layout is known
                await self._ready()
                self._check_open(command)
            return await self._node_conns.command(args, route, retry=retry)
        except _DRIVER_ERRORS as exc:
            raise self._error(exc, command, key) from exc
        except UnicodeEncodeError as exc:
            raise self._error(exc, command, key) from exc

    async def _redirected(self, args: tuple[Any, ...], key: str | None = None, *, sent: int = 0) -> Any:
        """Run a single-key command, following ``MOVED`` / ``ASK`` / ``TRYAGAIN`` ourselves.

        redis-py sends ``ASKING`` and the redirected command on two connections
        taken from the node's pool; under concurrency they differ, the target
        node answers ``MOVED`` back to the source, and the command bounces until
        it gives up. Here both go in one pipeline, on one connection.

        ``sent``: how many times the command was sent already (by redis-py), so that
        it is sent at most ``max_redirects + 1`` times in all.
        """
        nodes = self._cluster.nodes_manager
        slot = _slot(args[1] if key is None else key)
        ask_node: ClusterNode | None = None
        redirected_by: set[str] = set()
        sends = self._options.max_redirects + 1 - sent
        for attempt in range(1, sends + 1):
            node = ask_node if ask_node is not None else nodes.get_node_from_slot(slot)
            commands = [PipelineCommand(0, *args)]
            if ask_node is not None:
                commands.insert(0, PipelineCommand(0, "ASKING"))
            await node.execute_pipeline(commands)
            result = commands[-1].result
            ask_node = None
            if not isinstance(result, Exception):
                return result
            if not isinstance(result, (AskError, TryAgainError)):  # MovedError is an AskError
                raise result
            if attempt == sends:  # nothing is sent after this: no pause either
                break
            if isinstance(result, MovedError):
                await follow_moved(nodes, result, node.name, redirected_by, attempt)
            elif isinstance(result, AskError):
                redirected_by.add(node.name)
                ask_node = node_at(nodes, result.host, result.port)
            else:
                await asyncio.sleep(0.05 * attempt)
        raise ClusterError(f"gave up after following {self._options.max_redirects} redirections")

    def _batch_conn(self, name: str) -> MuxConnection:
        async def readonly() -> list[tuple[str]]:
            # A replica serves reads only to a connection that asked for them.
            return [("READONLY",)]

        prepare = readonly if self._options.read_from_replicas else None
        return _mux_for(self._options.node_options(name), node=name, prepare=prepare)

    async def _relearn(self) -> set[str]:
        nodes = self._cluster.nodes_manager
        initialize: Callable[[], Awaitable[None]] = nodes.initialize
        try:
            await initialize()
        finally:
            if self._closed:  # closed meanwhile: what the lookup opened is closed too
                await self._sweep()
        return set(nodes.nodes_cache)

    async def _ready(self) -> None:
        # Commands issued before the layout is known are routed to a random node
        # by redis-py (then redirected): learn the layout first, once.
        initialize: Callable[[], Awaitable[Any]] = self._cluster.initialize
        try:
            await initialize()
        finally:
            if self._closed:  # closed meanwhile: what learning the layout opened is closed too
                await self._sweep()

    async def _primaries(self) -> list[ClusterNode]:
        await self._run("CLUSTER SLOTS", None, self._ready)
        primaries: list[ClusterNode] = self._cluster.get_primaries()
        return primaries

    # -- lifecycle -------------------------------------------------------

    async def connect(self) -> None:
        """Discover the cluster's layout and check that every primary answers.

        With ``client_cache``, also start listening for invalidations on every primary.
        """
        await self.health()
        if self._tracking is not None:
            await self._tracking.start()

    async def close(self) -> None:
        self._closed = True
        if self._closing is None:
            self._closing = detached(self._close_all(), f"kivigo close cluster {self._seeds}")
        elif self._closing.done():
            return  # a failure was for the close() that ran it, not for every later one
        # Shielded: a caller that stops waiting (a timeout around the shutdown) must
        # not stop the closing half-way, since nobody would finish it.
        await asyncio.shield(self._closing)

    async def _close_all(self) -> None:
        backends = list(self._node_backends.values())
        self._node_backends.clear()
        # Every step runs even when an earlier one fails.
        async with contextlib.AsyncExitStack() as steps:
            steps.push_async_callback(self._close_cluster)
            for backend in backends:
                steps.push_async_callback(backend.close)
            steps.push_async_callback(self._node_conns.close)
            if self._tracking is not None:
                steps.push_async_callback(self._tracking.close)

    async def _close_cluster(self) -> None:
        try:
            try:
                await self._cluster.aclose()
            finally:
                # aclose() does nothing to a client whose layout redis-py has marked to be
                # read again (after a lost connection), though its nodes hold connections.
                await self._disconnect_nodes()
        except _DRIVER_ERRORS as exc:
            raise self._error(exc, "CLOSE") from exc

    async def _disconnect_nodes(self) -> None:
        nodes = self._cluster.nodes_manager
        await nodes.aclose()
        await nodes.aclose("startup_nodes")

    # -- AsyncBackend ----------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        if self._tracking is not None:
            return await self._tracking.get(key)
        value: bytes | None = await self._exec("GET", key)
        return value

    def _written(self, keys: Sequence[str]) -> None:
        # Called once a write is acknowledged (or failed: it may have been applied).
        if self._tracking is not None:
            self._tracking.written(keys)

    async def set(self, key: str, value: bytes, ttl_ms: int | None = None) -> None:
        try:
            if ttl_ms is None:
                await self._exec("SET", key, value)
            else:
                await self._exec("SET", key, value, "PX", ttl_ms)
        finally:
            self._written((key,))

    async def delete(self, key: str) -> bool:
        try:
            return bool(await self._exec("UNLINK", key))
        finally:
            self._written((key,))

    async def scan(self, prefix: str) -> AsyncIterator[str]:
        # Migration-aware: see _cluster_scan for the guarantee and what it costs.
        async for raw in scan_cluster(self._cluster, prefix, run=self._run):
            yield decode_key(raw)

    # -- BatchBackend ----------------------------------------------------

    @staticmethod
    def _by_slot(keys: Sequence[str]) -> dict[int, list[int]]:
        """Input positions grouped by hash slot, in first-seen order."""
        groups: dict[int, list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(_checked_slot(key), []).append(index)
        return groups

    def _route(self, args: Sequence[Any]) -> ClusterNode:
        """The node to send ``args`` (its key at ``args[1]``) to."""
        cluster = self._cluster
        # Only reads may go to a replica: a write sent there comes back MOVED.
        read = args[0] in READ_COMMANDS
        node: ClusterNode = cluster.nodes_manager.get_node_from_slot(
            _slot(args[1]),
            read and cluster.read_from_replicas,
            cluster.load_balancing_strategy if read else None,
        )
        return node

    async def _pipeline(
        self,
        name: str,
        commands: list[tuple[Any, ...]],
        served_by: list[str | None] | None = None,
        *,
        resend_refused: bool = True,
    ) -> list[Any]:
        """Send ``commands`` as one pipeline per node, nodes in parallel; results in order.

        A command redirected by ``MOVED`` / ``ASK`` (its slot moved, or is
        moving), or refused with ``TRYAGAIN`` (a multi-key command whose keys
        are split between two nodes mid-migration) is re-sent one key at a
        time, as single-key commands, which follow redirections one by one.

        A command refused with ``CLUSTERDOWN`` (a failover under way) applied
        nothing: those are sent again once the layout is read anew, up to
        ``max_retries`` times, as a single-key command is (unless ``resend_refused``
        is false).

        ``served_by``, when given, receives per command the name of the node it
        was sent to, or ``None`` when it had to be re-sent (the client cache
        keeps only values from the node whose invalidations it listens to).
        """

        cluster = self._cluster
        route = self._route
        reads = all(args[0] in READ_COMMANDS for args in commands)

        async def multiplexed() -> list[Any]:
            await self._ready()
            return await self._node_conns.send(commands, route, reads=reads)

        async def send() -> list[Any]:
            await self._ready()
            pipe = cluster.pipeline()
            for args in commands:
                # Each command's slot is known: naming its node spares redis-py
                # parsing the command's keys (twice) to find it, a third of the CPU
                # of a large batch. (A retry after a connection error routes by key.)
                node = route(args)
                pipe.execute_command(*args, target_nodes=[node])
                if served_by is not None:
                    targets.append(str(node.name))
            # Redirections are ours to handle: redis-py would re-send a refused
            # multi-key command as it is, and give up while the migration lasts.
            results: list[Any] = await pipe.execute(raise_on_error=False, allow_redirections=False)
            return results

        targets: list[str | None] = []

        # Batches leave on the nodes' multiplexed connections (see _cluster_mux),
        # except the client cache's reads: its invalidations follow the connections
        # it tracks, redis-py's.
        fast = served_by is None and (not reads or self._tracking is None)
        results: list[Any] = await self._run(name, None, multiplexed if fast else send)
        redo: dict[int, list[tuple[Any, ...]]] = {}
        down: list[int] = []  # refused with CLUSTERDOWN
        for index, (args, result) in enumerate(zip(commands, results, strict=True)):
            if isinstance(result, (AskError, TryAgainError)):  # MovedError is an AskError
                redo[index] = _split(args)
                if served_by is not None:
                    targets[index] = None
            elif isinstance(result, ClusterDownError):
                down.append(index)
            elif isinstance(result, Exception):
                raise self._error(result, name, args[1] if len(args) == 2 else None) from result
        if down and resend_refused:
            again, again_by = await self._after_cluster_down(
                name, [commands[i] for i in down], results[down[0]], served_by
            )
            for position, index in enumerate(down):
                results[index] = again[position]
                if served_by is not None:
                    targets[index] = again_by[position]
        if redo:
            singles = [single for parts in redo.values() for single in parts]
            if self._options.auto_pipeline:  # as single-key commands: together, per node
                # A write is not sent again after a lost reply, as the batch itself is not.
                resent = [self._multiplexed(name, s[1], s, self._route, retry=reads) for s in singles]
            else:
                resent = [self._run(name, s[1], lambda s=s: self._redirected(s)) for s in singles]  # type: ignore[misc]
            replies = iter(await asyncio.gather(*resent))
            for index, parts in redo.items():
                results[index] = _join(commands[index][0], [next(replies) for _ in parts])
        if served_by is not None:
            served_by[:] = targets
        return results

    async def _after_cluster_down(
        self,
        name: str,
        commands: list[tuple[Any, ...]],
        refusal: ClusterDownError,
        served_by: list[str | None] | None,
    ) -> tuple[list[Any], list[str | None]]:
        """The results of ``commands``, refused with ``CLUSTERDOWN`` (``refusal``), and the
        nodes that served them (with ``served_by``); each try sends those still refused."""
        results: list[Any] = [None] * len(commands)
        by: list[str | None] = [None] * len(commands)
        pending = list(range(len(commands)))
        failure: Exception = refusal
        for _ in range(self._options.max_retries):
            if self._closed:
                break
            await asyncio.sleep(0.25)  # as for a single-key command: give the failover a moment
            await self._learn_layout()
            sub_by: list[str | None] | None = None if served_by is None else []
            try:
                got = await self._pipeline(name, [commands[i] for i in pending], sub_by, resend_refused=False)
            except BackendUnavailableError as exc:
                # A slot that no node serves in the layout just read: nothing was sent.
                if not _outage(exc.__cause__):
                    raise
                failure = exc
                continue
            refused = []
            for position, index in enumerate(pending):
                if isinstance(got[position], ClusterDownError):
                    refused.append(index)
                    failure = got[position]
                else:
                    results[index] = got[position]
                    if sub_by is not None:
                        by[index] = sub_by[position]
            pending = refused
            if not pending:
                return results, by
        if isinstance(failure, KivigoError):
            raise failure
        args = commands[pending[0]]
        raise self._error(failure, name, args[1] if len(args) == 2 else None) from failure

    async def batch_get(self, keys: Sequence[str]) -> list[bytes | None]:
        if self._tracking is not None:
            return await self._tracking.batch_get(keys)
        groups = self._by_slot(keys)
        # MGET even for one key, as on one server: a key holding another type reads
        # as missing, where GET would fail with WRONGTYPE.
        commands: list[tuple[Any, ...]] = [("MGET", *(keys[i] for i in idx)) for idx in groups.values()]
        out: list[bytes | None] = [None] * len(keys)
        for idx, values in zip(groups.values(), await self._pipeline("MGET", commands), strict=True):
            for i, value in zip(idx, values, strict=True):
                out[i] = value
        return out

    async def batch_set(self, items: Sequence[tuple[str, bytes]], ttl_ms: int | None = None) -> None:
        groups = self._by_slot([key for key, _ in items])
        commands: list[tuple[Any, ...]] = []
        for idx in groups.values():
            if ttl_ms is None:
                args: list[Any] = ["MSET"]
                for i in idx:
                    args += items[i]
                commands.append(tuple(args))
            else:
                commands += [("SET", items[i][0], items[i][1], "PX", ttl_ms) for i in idx]
        try:
            await self._pipeline("MSET" if ttl_ms is None else "SET PX", commands)
        finally:
            if self._tracking is not None:
                self._tracking.written([key for key, _ in items])

    async def batch_delete(self, keys: Sequence[str]) -> int:
        groups = self._by_slot(keys)
        commands = [("UNLINK", *(keys[i] for i in idx)) for idx in groups.values()]
        try:
            return sum(int(n) for n in await self._pipeline("UNLINK", commands))
        finally:
            self._written(keys)

    async def exists(self, keys: Sequence[str]) -> int:
        groups = self._by_slot(keys)
        commands = [("EXISTS", *(keys[i] for i in idx)) for idx in groups.values()]
        return sum(int(n) for n in await self._pipeline("EXISTS", commands))

    # -- TTLBackend ------------------------------------------------------

    async def expire(self, key: str, ttl_ms: int) -> bool:
        try:
            return bool(await self._exec("PEXPIRE", key, ttl_ms))
        finally:
            self._written((key,))  # a cached copy carries the key's old TTL

    async def ttl(self, key: str) -> int | None:
        ms = int(await self._exec("PTTL", key))
        if ms == -2:
            raise KeyNotFoundError(key)
        return None if ms == -1 else ms

    async def persist(self, key: str) -> bool:
        try:
            return bool(await self._exec("PERSIST", key))
        finally:
            self._written((key,))

    # -- HealthBackend ---------------------------------------------------

    async def health(self) -> None:
        """``PING`` every primary; the error names each node that failed."""
        primaries = await self._primaries()
        execute: Callable[..., Awaitable[Any]] = self._cluster.execute_command

        async def ping(node: ClusterNode) -> None:
            try:
                async with self._slot("PING"):
                    await execute("PING", target_nodes=node)
            except _DRIVER_ERRORS as exc:
                raise translate(exc, "PING", None, str(node.name)) from exc
            except (AttributeError, TypeError) as exc:
                if not _torn_down(exc):
                    raise
                raise BackendUnavailableError(
                    f"PING on {node.name}: the connection was closed while in use"
                ) from exc

        results = await asyncio.gather(*(ping(n) for n in primaries), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:
            if not isinstance(failure, Exception):
                raise failure
        if len(failures) == 1:
            raise failures[0]
        if failures:
            summary = "; ".join(str(f) for f in failures)
            raise type(failures[0])(f"{len(failures)} of {len(primaries)} primaries failed: {summary}")

    # -- TransactionBackend ----------------------------------------------

    def _one_slot(self, keys: Sequence[str], what: str) -> int:
        slots = self._by_slot(keys)
        if len(slots) > 1:
            shown = ", ".join(f"{keys[idx[0]]!r} -> slot {slot}" for slot, idx in list(slots.items())[:4])
            raise CrossSlotError(
                f"{what}: every key of a cluster transaction must hash to one slot ({shown}); "
                "give them a common hash tag, e.g. '{user:1}:a' and '{user:1}:b'"
            )
        return next(iter(slots))

    async def _node_backend(self, slot: int, command: str) -> RedisBackend:
        """A standalone backend on the primary owning ``slot`` (redis-py's cluster has no WATCH)."""
        await self._run("CLUSTER SLOTS", None, self._ready)
        # Closed while the layout was read: a backend made now would outlive close().
        self._check_open(command)
        nodes = self._cluster.nodes_manager
        name = str(nodes.get_node_from_slot(slot).name)
        backends = self._node_backends
        backend = backends.get(name)
        if backend is None:
            backend = backends[name] = RedisBackend(self._options.node_options(name))
            # A new owner usually means a node left (a failover): its backend goes with it,
            # rather than one more per failover until close().
            gone = [backends.pop(n) for n in list(backends) if n != name and n not in nodes.nodes_cache]
            for left in gone:
                with contextlib.suppress(KivigoError):
                    await left.close()
        return backend

    async def _learn_layout(self) -> None:
        """Read the layout again, so that the next call goes to the node that owns its slot now."""
        with contextlib.suppress(KivigoError):  # the caller's own error is the news
            await self._run("CLUSTER SLOTS", None, self._relearn)

    async def _tx_error(self, exc: KivigoError) -> KivigoError:
        """The error a transaction's failure on its slot's node gives the caller.

        A redirection means the slot moved or is moving (``ASK``, or ``TRYAGAIN``
        for keys split between the two nodes): a conflict, worth a retry; nothing
        was applied. ``CLUSTERDOWN`` is an outage that passes, as for any other
        command. A lost or silent node may have failed over: the transaction is
        not sent again (it may have been applied). Either way the layout is read
        again, so that the next transaction goes to the slot's owner: it is read
        once and kept, and nothing else would read it again if transactions are
        all the traffic.
        """
        # By the reply's type or its own first word: the message names the key, which
        # may read "MOVED" or "ASK " too.
        cause = exc.__cause__
        text = str(cause) if isinstance(cause, ResponseError) else ""
        moved = isinstance(cause, MovedError) or text.startswith("MOVED ")
        moving = not moved and (
            isinstance(cause, (AskError, TryAgainError)) or text.startswith(("ASK ", "TRYAGAIN "))
        )
        down = isinstance(cause, ClusterDownError) or text.startswith(("CLUSTERDOWN ", "MASTERDOWN "))
        # A node that did not answer, not a pool with no free connection (a busy
        # client, which re-reading the layout on every refusal would make busier).
        silent = isinstance(exc, OperationTimeoutError) and isinstance(exc.__cause__, RedisTimeoutError)
        if moved or moving or down or silent or isinstance(exc, BackendUnavailableError):
            await self._learn_layout()
        error: KivigoError
        if moved:
            error = TransactionConflictError(f"{exc}; the slot moved to another node, retry")
        elif moving:
            error = TransactionConflictError(f"{exc}; the slot is migrating to another node, retry")
        elif down and not isinstance(exc, BackendUnavailableError):
            error = BackendUnavailableError(f"{exc}: the cluster is down (failover in progress?)")
        else:
            return exc
        error.__cause__ = exc
        return error

    async def begin(self, watch: Sequence[str]) -> BackendTransaction:
        if not watch:
            return _ClusterTransaction(self, None, None)
        slot = self._one_slot(watch, "WATCH")
        backend = await self._node_backend(slot, "WATCH")
        try:
            inner = await backend.begin(watch)
        except KivigoError as exc:
            raise await self._tx_error(exc) from exc.__cause__
        return _ClusterTransaction(self, slot, inner)

    # -- WatchBackend ----------------------------------------------------

    async def watch(
        self, prefix: str, *, max_pending: int = DEFAULT_MAX_PENDING, configure_server: bool = True
    ) -> ChangeStream:
        """Stream changes to keys under ``prefix`` from every primary; see :mod:`kivigo_async.watch`.

        Each primary publishes the changes to its own keys, so the watch
        subscribes on each primary known when it starts; changes to one key
        arrive in order, except while resharding moves its slot. A failover, a
        lost node or a slot moved ends the watch with
        :class:`~kivigo_async.errors.BackendUnavailableError` (a move at the
        next heartbeat, after the moved keys' events); watch again to follow
        the new layout.

        Example:
            ```python
            stream = await backend.watch("user:")
            ```
        """
        from ._watch import watch_cluster  # imports this module

        if not self._cluster._initialize:
            # Read afresh: watching again after a failover ended a watch must find the
            # promoted replica, and no other call may have read the layout since.
            await self._learn_layout()
        return await watch_cluster(self, prefix, max_pending, configure_server)


def _split(args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """One single-key command per key of ``args``."""
    command, rest = args[0], args[1:]
    if command in ("GET", "SET"):
        return [args]
    if command == "MSET":
        return [("SET", rest[i], rest[i + 1]) for i in range(0, len(rest), 2)]
    # MGET stays MGET, one key each: GET would fail on a key of another type.
    return [(command, key) for key in rest]


def _join(command: str, results: list[Any]) -> Any:
    """The reply ``command`` would have given, from the replies of its :func:`_split` parts."""
    if command in ("GET", "SET"):
        return results[0]
    if command == "MGET":
        return [values[0] for values in results]
    if command == "MSET":
        return True
    return sum(int(r) for r in results)


class _ClusterTransaction:
    def __init__(self, backend: RedisClusterBackend, slot: int | None, inner: BackendTransaction | None):
        self._backend = backend
        self._slot = slot
        self._inner = inner

    async def get(self, key: str) -> bytes | None:
        if self._inner is not None and _checked_slot(key) == self._slot:
            # On the watching connection, like the standalone backend.
            try:
                return await self._inner.get(key)
            except KivigoError as exc:
                raise await self._backend._tx_error(exc) from exc.__cause__
        return await self._backend.get(key)

    async def commit(self, ops: Sequence[TxOp]) -> None:
        keys = [op[1] for op in ops]
        if self._slot is None:
            slot = self._backend._one_slot(keys, "EXEC")
        else:
            slot = self._slot
            for key in keys:
                if (other := _checked_slot(key)) != slot:
                    raise CrossSlotError(
                        f"EXEC: key {key!r} is in slot {other}, the watched keys in slot {slot}; "
                        "give them a common hash tag, e.g. '{user:1}:a' and '{user:1}:b'"
                    )
        if self._inner is None:
            self._slot = slot
            self._inner = await (await self._backend._node_backend(slot, "EXEC")).begin(())
        try:
            await self._inner.commit(ops)
        except KivigoError as exc:
            raise await self._backend._tx_error(exc) from exc.__cause__
        finally:
            self._backend._written(keys)

    async def discard(self) -> None:
        if self._inner is not None:
            await self._inner.discard()
