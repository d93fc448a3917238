"""The standalone Redis / Valkey backend, on ``redis.asyncio`` with the hiredis parser."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from itertools import chain
from typing import Any, ClassVar, TypeVar

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection, Connection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from ..._tasks import detached
from ...backend import BackendTransaction, TxOp
from ...errors import BackendUnavailableError, KeyNotFoundError, TransactionConflictError
from ...watch import DEFAULT_MAX_PENDING, ChangeStream
from ._cache import LocalCache, Tracking, ttl_reply
from ._errors import DIAL_TIMEOUT_TEXT, NotSentError, translate
from ._mux import Arg, MuxConnection, Opener, pack, tcp_opener, unix_opener
from ._scan import SCAN_COUNT, decode_key, match_pattern
from .options import RedisOptions, login_user

__all__ = ["RedisBackend"]

# What a command can raise before it is translated: redis-py's errors, and the
# UTF-8 encoder's for a key holding a lone surrogate (translated to InvalidKeyError).
_FAILURES = (RedisError, UnicodeEncodeError)


class _DialBounded(AbstractConnection):
    """Bounds the whole open (socket, TLS and the login: AUTH, SELECT...) by the dial timeout.

    redis-py bounds only the socket's connect by ``socket_connect_timeout``; the
    login then waits on ``socket_timeout``, or forever when that is ``None``.
    """

    #: The pool that made this connection, set by :class:`_ClosablePool`.
    kivigo_pool: _ClosablePool | None = None

    def refuse_if_closed(self) -> None:
        """Raise once the pool that made this connection is closed; call it before (re)connecting.

        A command in flight when the backend closed is retried by redis-py on this
        same connection, never passing through the pool again: it must not reopen
        it, or the write would be applied after close() returned.
        """
        if self.kivigo_pool is not None and self.kivigo_pool.closed:
            raise RedisConnectionError(_CLOSED)

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self.is_connected:
            return  # the pool asks on every checkout: no task, no timer then
        self.refuse_if_closed()
        connect: Callable[..., Awaitable[None]] = super().connect_check_health
        bound: float | None = self.socket_connect_timeout
        try:
            await asyncio.wait_for(connect(check_health, retry_socket_connect), bound)
        except (asyncio.TimeoutError, RedisTimeoutError):
            # RedisTimeoutError: socket_timeout (read_timeout), which the login's
            # replies wait under, ran out first. Either way no command was sent.
            await self.disconnect()
            raise RedisTimeoutError(DIAL_TIMEOUT_TEXT) from None


class _TCPConnection(_DialBounded, Connection):
    pass


class _UnixConnection(_DialBounded, UnixDomainSocketConnection):
    pass


class _TLSContextConnection(Connection):
    """A TCP connection wrapped in the caller's :class:`ssl.SSLContext`.

    redis-py's own SSL connection builds its context from loose arguments; a
    ready context lets users bring private CAs, client certificates and
    pinning without us re-implementing each knob. The cluster and Sentinel
    backends use it too.
    """

    def __init__(self, *, tls_context: ssl.SSLContext, **kwargs: Any) -> None:
        self._tls_context = tls_context
        init: Callable[..., None] = super().__init__
        init(**kwargs)

    def _connection_arguments(self) -> Mapping[str, Any]:
        return {"host": self.host, "port": self.port, "ssl": self._tls_context}


class _TLSConnection(_DialBounded, _TLSContextConnection):
    pass


_CLOSED = "the backend was closed (Client.close() closes its backend)"
_INFO_SERVER = pack(("INFO", "server"))
_RUN_ID = re.compile(rb"^run_id:([0-9a-f]+)", re.MULTILINE)
R = TypeVar("R")


# Unbound: called with the connection, it is the read itself, with no frame of ours around it.
_read_one: Callable[[AbstractConnection], Awaitable[Any]] = AbstractConnection.read_response


async def _read_page_and_run_id(conn: AbstractConnection) -> tuple[Any, bytes | None]:
    """A SCAN reply, then INFO's run_id (``None`` when INFO was refused)."""
    try:
        page = await conn.read_response()
    except ResponseError:
        # SCAN refused (an ACL user without it): INFO's reply is still to come, and
        # left unread it would be the next caller's reply on this pooled connection.
        with contextlib.suppress(ResponseError):
            await conn.read_response()
        raise
    try:
        info = await conn.read_response()
    except ResponseError:
        return page, None
    if isinstance(info, str):  # a RESP3 verbatim string
        info = info.encode()
    match = _RUN_ID.search(info) if isinstance(info, bytes) else None
    return page, match.group(1) if match else None


class _ClosablePool(BlockingConnectionPool):
    """A blocking pool that stays closed once the backend is closed, and never loses a wake-up.

    redis-py's pool reconnects whenever it is used again, so a call still in
    flight when the client closes (or one made after) would open a connection
    nobody ever closes. Once :attr:`closed`, the pool hands out no connection
    and disconnects each one given back.
    """

    closed = False
    _wakers: ClassVar[set[asyncio.Task[None]]] = set()
    #: redis-py releases before 5.1 have no ensure_connection(): they always take the slow path.
    _can_take_idle: ClassVar[bool] = hasattr(BlockingConnectionPool, "ensure_connection")

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        if self.closed:
            raise NotSentError(_CLOSED)
        connection = self._take_idle()
        if connection is not None:
            ensure: Callable[[AbstractConnection], Awaitable[None]] = self.ensure_connection
            try:
                await ensure(connection)
            except BaseException:
                await self.release(connection)
                raise
        else:
            acquire: Callable[..., Awaitable[AbstractConnection]] = super().get_connection
            try:
                connection = await acquire(*args, **kwargs)
            except BaseException as exc:
                if self.closed and isinstance(exc, Exception):  # woken by close_and_wake()
                    raise NotSentError(_CLOSED) from None
                # Before Python 3.13, a waiter cancelled (or timed out) just as release()
                # notified it swallows that notify(): a free connection then sits idle
                # while the other callers wait out pool_timeout. Pass the wake-up on.
                waker = asyncio.get_running_loop().create_task(self._wake_one())
                self._wakers.add(waker)
                waker.add_done_callback(self._wakers.discard)
                raise
        if self.closed:  # closed while this call waited for a free connection
            await self.release(connection)
            raise NotSentError(_CLOSED)
        return connection

    def make_connection(self) -> AbstractConnection:
        make: Callable[[], AbstractConnection] = super().make_connection
        connection = make()
        if isinstance(connection, _DialBounded):
            connection.kivigo_pool = self
        return connection

    def _take_idle(self) -> AbstractConnection | None:
        """An idle connection, when one is there and nobody queues for it; else None.

        redis-py's blocking pool enters its Condition and an ``asyncio.timeout``
        on every call, waiting or not: about a fifth of a pooled call's CPU.
        Neither is needed to take an idle connection nobody else is waiting for;
        any other case (none idle, waiters queued, either of the pool's locks
        held, a maintenance in progress) takes redis-py's path.
        """
        idle: list[AbstractConnection] = self._available_connections
        condition = self._condition
        if (
            not idle
            or not self._can_take_idle
            or condition.locked()
            or getattr(condition, "_waiters", True)
            # Held while redis-py walks the idle list (a re-authentication, a
            # disconnect): the list must not change under it.
            or self._lock.locked()
            or getattr(self, "_in_maintenance", False)
        ):
            return None
        connection = idle.pop()
        self._in_use_connections.add(connection)
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        give_back: Callable[[AbstractConnection], Awaitable[None]] = super().release
        if (
            _would_wait(getattr(self._condition, "_lock", None))
            or _would_wait(self._lock)
            or connection.should_reconnect()  # type: ignore[no-untyped-call]
        ):
            # redis-py marks the connection free only once it holds both locks (and,
            # for a connection due to reconnect, has disconnected it): a caller
            # cancelled in between (a timeout around the call) would leave it
            # counted in use for good, one slot fewer each time. Uncontended, the
            # locks are taken without a pause a cancellation could land in, and no
            # task is spent on a shield.
            await asyncio.shield(give_back(connection))
        else:
            await give_back(connection)
        if self.closed:
            await connection.disconnect()
        elif getattr(self._condition, "_waiters", True):
            # Someone waits for a connection and was just notified. Without a yield,
            # a caller that releases and at once asks again takes the connection back
            # before the waiter runs: with more tasks than connections, the same few
            # tasks keep them and the others wait out pool_timeout, again and again.
            await asyncio.sleep(0)

    async def _wake_one(self) -> None:
        async with self._condition:
            self._condition.notify()

    def can_get_connection(self) -> bool:
        # Closed, a waiter goes on at once, to the closed check below, rather than
        # waiting for pool_timeout and failing with a timeout.
        return self.closed or bool(super().can_get_connection())

    async def close_and_wake(self) -> None:
        """Close the pool, and fail every call waiting for a connection now."""
        self.closed = True  # set by close() already; here too, for any other caller
        async with self._condition:
            self._condition.notify_all()


def _would_wait(lock: asyncio.Lock | None) -> bool:
    """Whether acquiring ``lock`` now would suspend the caller.

    A lock just released still makes a newcomer wait while the waiter it woke
    has not run yet; only a free lock with no live waiter is taken at once.
    """
    if lock is None or lock.locked():
        return True
    waiters: Iterable[asyncio.Future[None]] | None = getattr(lock, "_waiters", None)
    if not waiters:  # the common case: checked without building a generator
        return False
    return any(not waiter.cancelled() for waiter in waiters)


def no_maintenance_notifications() -> MaintNotificationsConfig:
    """The ``maint_notifications_config`` of every pool of ours.

    With maintenance notifications on (redis-py's default on RESP3), a pool skips
    its check that a connection handed out has no unread reply left.
    """
    return MaintNotificationsConfig(enabled=False)


def _pool_for(options: RedisOptions) -> BlockingConnectionPool:
    kwargs: dict[str, Any] = {
        "db": options.db,
        "username": login_user(options.username, options.password),
        "password": options.password,
        "socket_connect_timeout": options.dial_timeout,
        "socket_timeout": options.read_timeout,
        "client_name": options.client_name,
        "encoding_errors": "surrogateescape",
        # Retrying after a timeout would let one stalled call wait (retries + 1)
        # times read_timeout; only connection errors are retried.
        "retry": Retry(
            ExponentialWithJitterBackoff(cap=0.512, base=0.008),
            options.max_retries,
            supported_errors=(RedisConnectionError,),
        ),
    }
    if options.protocol is not None:
        kwargs["protocol"] = options.protocol
    connection_class: type[AbstractConnection]
    if options.network == "unix":
        connection_class = _UnixConnection
        kwargs["path"] = options.addr
    else:
        kwargs["host"], kwargs["port"] = options.host, options.port
        tls_context = options.ssl_context()
        if tls_context is None:
            connection_class = _TCPConnection
        else:
            connection_class = _TLSConnection
            kwargs["tls_context"] = tls_context
    pool_timeout = options.pool_timeout
    if pool_timeout is None and options.read_timeout is not None:
        pool_timeout = options.read_timeout + 1
    return _ClosablePool(
        max_connections=options.pool_size,
        timeout=pool_timeout,
        connection_class=connection_class,
        maint_notifications_config=no_maintenance_notifications(),
        **kwargs,
    )


def _opener_for(options: RedisOptions) -> Opener:
    if options.network == "unix":
        return unix_opener(options.addr)
    return tcp_opener(options.host, options.port, options.ssl_context())


def _mux_for(
    options: RedisOptions,
    *,
    node: str | None = None,
    select_db: bool = True,
    prepare: Callable[[], Awaitable[Sequence[Sequence[Arg]]]] | None = None,
    on_push: Callable[[list[Any]], None] | None = None,
    on_lost: Callable[[], None] | None = None,
    resolve: Callable[[], Awaitable[tuple[Opener, str]]] | None = None,
) -> MuxConnection:
    """A multiplexed connection that logs in and names itself as ``options`` say.

    ``select_db=False`` for pub/sub connections, whose channels span databases.
    ``resolve``, when given, finds the server before each connect instead of
    ``options.addr`` (Sentinel asks the sentinels for the primary).
    """
    auth = options._auth_command()
    handshake: list[tuple[Arg, ...]] = [auth] if auth else []
    if select_db and options.db:
        handshake.append(("SELECT", options.db))
    if options.client_name:
        handshake.append(("CLIENT", "SETNAME", options.client_name))
    return MuxConnection(
        _opener_for(options),
        node=node or options.addr,
        handshake=handshake,
        dial_timeout=options.dial_timeout,
        read_timeout=options.read_timeout,
        max_retries=options.max_retries,
        prepare=prepare,
        on_push=on_push,
        on_lost=on_lost,
        resolve=resolve,
    )


def _block_error(replies: Sequence[Any]) -> Exception | None:
    """The first error among a ``MULTI``..``EXEC`` block's replies, or in EXEC's results."""
    for reply in replies:
        if isinstance(reply, Exception):
            return reply
    results = replies[-1] if replies else None
    if isinstance(results, list):
        for result in results:
            if isinstance(result, Exception):
                return result
    return None


async def _multi_exec(mux: MuxConnection, commands: Sequence[tuple[Arg, ...]]) -> None:
    """Run ``commands`` as one ``MULTI``..``EXEC`` block on the multiplexed connection.

    The block leaves in one write, so no other caller's command lands inside it,
    and, as every command on that connection, it is never sent twice: a
    connection lost after the write fails the call, whether or not EXEC ran.
    """
    error = _block_error(await mux.execute_many([("MULTI",), *commands, ("EXEC",)]))
    if error is not None:
        raise ResponseError(str(error))


def _read_block(count: int) -> Callable[[AbstractConnection], Awaitable[list[Any]]]:
    """A reader of ``count`` replies that reads them all, server errors included as values.

    redis-py raises at an error reply: stopping there would leave the rest of the
    block's replies unread on the connection, for the next call to receive.
    """

    async def read(conn: AbstractConnection) -> list[Any]:
        replies: list[Any] = []
        for _ in range(count):
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies

    return read


class RedisBackend:
    """A backend on one Redis or Valkey server (standalone, or a primary).

    Every capability is implemented: batches are one round trip each
    (``MGET``; ``MSET`` or, with a TTL, ``SET ... PX`` inside ``MULTI/EXEC``;
    ``UNLINK``), so ``batch_set`` is atomic; TTLs are milliseconds
    (``PX``/``PEXPIRE``/``PTTL``); listing uses ``SCAN`` with the prefix's
    glob characters escaped; transactions are ``MULTI/EXEC`` with ``WATCH``.

    No later call can receive the reply of a call cancelled while waiting for
    it: on the multiplexed connection (the default) that reply is read and
    dropped when it arrives; a pooled connection is closed rather than reused.

    Example:
        ```python
        from kivigo_async import Client
        from kivigo_async.backends.redis import RedisBackend, RedisOptions

        backend = RedisBackend(RedisOptions(addr="localhost:6379", pool_size=20))
        async with Client(backend) as client:
            await client.set("greeting", "hello")
        ```
    """

    def __init__(self, options: RedisOptions | None = None) -> None:
        self._options = options if options is not None else RedisOptions.default()
        self._pool = _pool_for(self._options)
        self._redis: Redis = Redis.from_pool(self._pool)
        self._cache: LocalCache | None = None
        self._tracking: Tracking | None = None
        if self._options.client_cache is not None:
            self._cache = LocalCache(self._options.client_cache)
            self._tracking = Tracking(self._options, _opener_for(self._options), self._cache)
            self._mux: MuxConnection | None = _mux_for(
                self._options, prepare=self._tracking.data_handshake, on_lost=self._tracking.data_lost
            )
            self._tracking.attach(self._mux)
        else:
            self._mux = _mux_for(self._options) if self._options.auto_pipeline else None
        # One pre-bound entry point for single commands, so the hot path makes
        # no per-call choice between the multiplexed connection and the pool.
        self._exec: Callable[..., Awaitable[Any]] = (
            self._mux.execute if self._mux is not None else self._pool_execute
        )
        self._node = self._options.addr
        self._closing: asyncio.Task[None] | None = None

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> RedisBackend:
        """Build a backend from a ``redis://``, ``rediss://`` or ``unix://`` URL.

        See :meth:`RedisOptions.from_url` for the accepted query options.

        Example:
            ```python
            backend = RedisBackend.from_url("rediss://app:secret@cache:6380/0")
            ```
        """
        return cls(RedisOptions.from_url(url, **overrides))

    def __repr__(self) -> str:
        return f"RedisBackend(addr={self._node!r}, db={self._options.db})"

    @property
    def options(self) -> RedisOptions:
        """The options this backend was built with."""
        return self._options

    @property
    def client_cache(self) -> LocalCache | None:
        """The client-side cache (``RedisOptions(client_cache=...)``), for stats and listeners."""
        return self._cache

    @property
    def redis(self) -> Redis:
        """The underlying ``redis.asyncio.Redis`` client, for commands kivigo does not wrap."""
        return self._redis

    def _pool_execute(self, *args: Arg) -> Awaitable[Any]:
        """One command on a pooled connection, with redis-py's retry of connection errors.

        Not ``Redis.execute_command``: redis-py's asyncio connection packs every
        argument in Python (a 1,000-key MGET spends more time there than on the
        wire) and records metrics on each call. Replies are left unparsed, as on
        the multiplexed connection. A read cancelled or failed half-way closes
        the connection (redis-py's ``read_response`` does), so no later call can
        receive its reply.
        """
        # Packed here, before any connection is taken: a key that cannot be encoded
        # must not hold one. (Not a coroutine itself: one frame less per call.)
        return self._pool_call(pack(args), _read_one)

    async def _pool_call(
        self, payload: bytes, read: Callable[[AbstractConnection], Awaitable[R]], *, resend: bool = True
    ) -> R:
        """Send ``payload`` on a pooled connection and ``read`` its replies, retried as above.

        ``resend=False`` sends it at most once (opening the connection is still
        retried): after a lost reply, the caller learns the outcome is unknown.
        """
        pool = self._pool
        acquire: Callable[[], Awaitable[AbstractConnection]] = pool.get_connection
        conn = await acquire()

        async def attempt() -> R:
            writer = conn._writer
            if writer is not None and writer.transport.is_closing():
                # The server closed it (after a protocol error, say). Writing to it
                # would fail inside asyncio on Python 3.12+ (an AttributeError or a
                # TypeError, not an OSError redis-py would handle): open a new one.
                await conn.disconnect(nowait=True)
            await conn.send_packed_command(payload)
            return await read(conn)

        async def drop(error: Exception) -> None:
            await conn.disconnect()

        try:
            if not resend:
                try:
                    return await attempt()
                except Exception:
                    await conn.disconnect()  # nothing of it may be read by the next call
                    raise
            result: R = await conn.retry.call_with_retry(attempt, drop)
            return result
        finally:
            await pool.release(conn)

    async def _run_once(self, commands: Sequence[tuple[Arg, ...]]) -> None:
        """Run ``commands`` as one ``MULTI``..``EXEC`` block, sent at most once.

        Not through redis-py's pipeline: after a connection error it sends the
        whole block again, and a block that had run would run a second time, over
        what other clients wrote in between.
        """
        if self._mux is not None:
            await _multi_exec(self._mux, commands)
            return
        block = [("MULTI",), *commands, ("EXEC",)]
        payload = b"".join(pack(command) for command in block)
        error = _block_error(await self._pool_call(payload, _read_block(len(block)), resend=False))
        if error is not None:
            raise error

    def _error(self, exc: Exception, command: str, key: str | None = None) -> Exception:
        return translate(exc, command, key, self._node)

    # -- lifecycle -------------------------------------------------------

    async def connect(self) -> None:
        """Check the server answers and open ``min_idle_conns`` connections."""
        try:
            await self._exec("PING")
            wanted = self._options.min_idle_conns
            # Without the multiplexed connection the PING opened one pooled connection.
            if wanted > (0 if self._mux is not None else 1):
                await self._open_idle(wanted)
        except _FAILURES as exc:
            raise self._error(exc, "CONNECT") from exc

    async def _open_idle(self, wanted: int) -> None:
        # All held at once: the pool hands back the PING's connection first, so
        # only holding `wanted` together opens `wanted`.
        acquire: Callable[[], Awaitable[AbstractConnection]] = self._pool.get_connection
        acquisitions = [asyncio.ensure_future(acquire()) for _ in range(wanted)]

        async def give_back() -> None:
            for task in acquisitions:
                task.cancel()
            await asyncio.gather(*acquisitions, return_exceptions=True)
            for task in acquisitions:
                if not task.cancelled() and task.exception() is None:
                    await self._pool.release(task.result())

        try:
            await asyncio.wait(acquisitions)
        finally:
            # Shielded, and finished before a cancellation goes on: a connect()
            # cancelled (a startup timeout, say) must still return what it holds,
            # or those connections stay "in use" for good.
            cleanup = asyncio.ensure_future(give_back())
            try:
                await asyncio.shield(cleanup)
            except asyncio.CancelledError:
                await asyncio.wait([cleanup])
                raise
        for task in acquisitions:
            error = task.exception()
            if error is not None:
                raise error

    async def close(self) -> None:
        if isinstance(self._pool, _ClosablePool):
            self._pool.closed = True
        if self._closing is None:
            self._closing = detached(self._close_all(), f"kivigo close {self._node}")
        elif self._closing.done():
            return  # a failure was for the close() that ran it, not for every later one
        # Shielded: a caller that stops waiting (a timeout around the shutdown) must
        # not stop the closing half-way, since nobody would finish it.
        await asyncio.shield(self._closing)

    async def _close_all(self) -> None:
        # Every step runs even when an earlier one fails.
        async with contextlib.AsyncExitStack() as steps:
            steps.push_async_callback(self._close_pool)
            if self._mux is not None:
                steps.push_async_callback(self._mux.close)
            if self._tracking is not None:
                steps.push_async_callback(self._tracking.close)
            if isinstance(self._pool, _ClosablePool):
                # Pushed last, so run first: calls queued for a connection fail now.
                steps.push_async_callback(self._pool.close_and_wake)

    async def _close_pool(self) -> None:
        try:
            await self._redis.aclose()
        except _FAILURES as exc:
            raise self._error(exc, "CLOSE") from exc

    # -- AsyncBackend ----------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        cache, mux = self._cache, self._mux
        # The options allow a cache only with the multiplexed connection: tracking
        # follows the one connection that reads.
        if cache is not None and cache.enabled and mux is not None:
            return await self._cached_get(cache, mux, key)
        try:
            value: bytes | None = await self._exec("GET", key)
            return value
        except _FAILURES as exc:
            raise self._error(exc, "GET", key) from exc

    async def _cached_get(self, cache: LocalCache, mux: MuxConnection, key: str) -> bytes | None:
        hit = cache.lookup(key)
        if hit is not None:
            return hit
        epoch = cache.begin(key)
        sent_at = time.monotonic()
        keep: bool = False
        ttl_ms: int | None = None
        value: bytes | None = None
        try:
            # PTTL rides in the same write: the entry must not outlive the key, and
            # the server's invalidation for an expiry comes only when it gets to it.
            reply, pttl = await mux.execute_many((("GET", key), ("PTTL", key)))
            if reply.__class__ is hiredis.ReplyError:
                raise ResponseError(str(reply))
            value = reply
            keep, ttl_ms = ttl_reply(pttl)
            return value
        except _FAILURES as exc:
            raise self._error(exc, "GET", key) from exc
        finally:
            cache.complete(key, epoch, value if keep else None, ttl_ms, sent_at=sent_at)

    def _written(self, keys: Iterable[str]) -> None:
        # Our own writes drop local copies at once (read-your-writes), without
        # waiting for the server's invalidation message on the other connection.
        if self._cache is not None:
            self._cache.invalidate_many(keys)

    async def set(self, key: str, value: bytes, ttl_ms: int | None = None) -> None:
        try:
            if ttl_ms is None:
                await self._exec("SET", key, value)
            else:
                await self._exec("SET", key, value, "PX", ttl_ms)
        except _FAILURES as exc:
            raise self._error(exc, "SET", key) from exc
        finally:
            if self._cache is not None:
                self._cache.invalidate(key)

    async def delete(self, key: str) -> bool:
        try:
            return bool(await self._exec("UNLINK", key))
        except _FAILURES as exc:
            raise self._error(exc, "UNLINK", key) from exc
        finally:
            if self._cache is not None:
                self._cache.invalidate(key)

    #: Bumped when the server behind this backend changes (a Sentinel failover): a
    #: SCAN cursor means nothing to another server.
    _server_changes = 0

    async def scan(self, prefix: str) -> AsyncIterator[str]:
        pattern = match_pattern(prefix)
        cursor: int = 0
        changes = self._server_changes
        first: object = None  # where the first page came from (see _scan_page)
        while True:
            try:
                reply, origin = await self._scan_page(cursor, pattern)
            except _FAILURES as exc:
                raise self._error(exc, "SCAN") from exc
            # A cursor is only good on the server process that gave it (each hashes
            # keys with a seed of its own): sent to another, the listing would skip
            # and repeat keys without an error, so it cannot go on.
            if self._server_changes != changes:
                raise BackendUnavailableError(
                    f"SCAN on {self._node}: the primary changed (a failover) during the listing, "
                    "so keys may have been missed; list again"
                )
            if first is None:
                first = origin
            elif origin is not None and origin != first:
                raise BackendUnavailableError(
                    f"SCAN on {self._node}: the server may have restarted during the listing "
                    "(its connection was lost, or its run_id changed), so keys may have been "
                    "missed; list again"
                )
            # The pool parses the cursor to int, the multiplexed connection leaves bytes.
            cursor, keys = int(reply[0]), reply[1]
            for raw in keys:
                yield decode_key(raw)
            if cursor == 0:
                return

    async def _scan_page(self, cursor: int, pattern: str) -> tuple[Any, object]:
        """One ``SCAN`` page, and where it came from: a value that changes when the server may have.

        On the multiplexed connection, which socket answered (one lost and opened
        again may lead to a restarted server). On the pool, whose connections are
        also reopened after a cancelled call, the server's run_id, asked with
        ``INFO`` in the same write on the same connection; ``None`` when ``INFO`` is
        refused (an ACL user without it), which no page is then compared on.
        """
        command = ("SCAN", cursor, "MATCH", pattern, "COUNT", SCAN_COUNT)
        mux = self._mux
        if mux is not None:
            return await mux.execute(*command), mux.opened
        return await self._pool_call(pack(command) + _INFO_SERVER, _read_page_and_run_id)

    # -- BatchBackend ----------------------------------------------------

    async def batch_get(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:  # Redis refuses an MGET of no keys; nothing to ask
            return []
        cache, mux = self._cache, self._mux
        if cache is not None and cache.enabled and mux is not None:
            return await self._cached_batch_get(cache, mux, keys)
        try:
            values: list[bytes | None] = await self._exec("MGET", *keys)
            return values
        except _FAILURES as exc:
            raise self._error(exc, "MGET", keys[0] if len(keys) == 1 else None) from exc

    async def _cached_batch_get(
        self, cache: LocalCache, mux: MuxConnection, keys: Sequence[str]
    ) -> list[bytes | None]:
        """Hits from memory; the misses in one ``MGET``, cached as :meth:`_cached_get` caches."""
        out, misses = cache.lookup_many(keys)
        if not misses:
            return out
        wanted = [keys[i] for i in misses]
        caches = cache.settings.caches
        # Keys that may be kept, each with the cache epoch of this read and the
        # position of its PTTL among the replies (the MGET is reply 0).
        kept = [(i, cache.begin(key)) for i, key in enumerate(wanted) if caches(key)]
        sent_at = time.monotonic()
        values: list[bytes | None] | None = None  # set once the replies are in
        replies: list[Any] = []
        try:
            # One write: the MGET and a PTTL per key that may be kept, as a single
            # get sends GET and PTTL, so that no entry outlives its key.
            commands: list[tuple[Arg, ...]] = [("MGET", *wanted)]
            commands += [("PTTL", wanted[i]) for i, _ in kept]
            replies = await mux.execute_many(commands)
            if replies[0].__class__ is hiredis.ReplyError:
                raise ResponseError(str(replies[0]))
            values = replies[0]
            for index, value in zip(misses, values, strict=True):
                out[index] = value
            return out
        except _FAILURES as exc:
            raise self._error(exc, "MGET", wanted[0] if len(wanted) == 1 else None) from exc
        finally:
            for n, (i, epoch) in enumerate(kept, 1):
                if values is None:  # failed or cancelled: nothing to keep
                    cache.complete(wanted[i], epoch, None)
                else:
                    keep, ttl_ms = ttl_reply(replies[n])
                    cache.complete(wanted[i], epoch, values[i] if keep else None, ttl_ms, sent_at=sent_at)

    async def batch_set(self, items: Sequence[tuple[str, bytes]], ttl_ms: int | None = None) -> None:
        if not items:
            return
        try:
            if ttl_ms is None:
                await self._exec("MSET", *chain.from_iterable(items))
                return
            if self._mux is not None:
                await _multi_exec(self._mux, [("SET", key, value, "PX", ttl_ms) for key, value in items])
                return
            pipe: Pipeline = self._redis.pipeline(transaction=True)
            for key, value in items:
                pipe.execute_command("SET", key, value, "PX", ttl_ms)
            await pipe.execute()
        except _FAILURES as exc:
            raise self._error(exc, "MSET" if ttl_ms is None else "MULTI/SET PX") from exc
        finally:
            self._written(key for key, _ in items)  # lazy: read only with a cache

    async def batch_delete(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        try:
            return int(await self._exec("UNLINK", *keys))
        except _FAILURES as exc:
            raise self._error(exc, "UNLINK") from exc
        finally:
            self._written(keys)

    async def exists(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        try:
            return int(await self._exec("EXISTS", *keys))
        except _FAILURES as exc:
            raise self._error(exc, "EXISTS", keys[0] if len(keys) == 1 else None) from exc

    # -- TTLBackend ------------------------------------------------------

    async def expire(self, key: str, ttl_ms: int) -> bool:
        try:
            return bool(await self._exec("PEXPIRE", key, ttl_ms))
        except _FAILURES as exc:
            raise self._error(exc, "PEXPIRE", key) from exc
        finally:
            self._written((key,))  # a cached copy carries the key's old TTL

    async def ttl(self, key: str) -> int | None:
        try:
            ms = int(await self._exec("PTTL", key))
        except _FAILURES as exc:
            raise self._error(exc, "PTTL", key) from exc
        if ms == -2:
            raise KeyNotFoundError(key)
        return None if ms == -1 else ms

    async def persist(self, key: str) -> bool:
        try:
            return bool(await self._exec("PERSIST", key))
        except _FAILURES as exc:
            raise self._error(exc, "PERSIST", key) from exc
        finally:
            self._written((key,))

    # -- HealthBackend ---------------------------------------------------

    async def health(self) -> None:
        try:
            await self._exec("PING")
        except _FAILURES as exc:
            raise self._error(exc, "PING") from exc

    # -- TransactionBackend ----------------------------------------------

    async def begin(self, watch: Sequence[str]) -> BackendTransaction:
        pipe: Pipeline = self._redis.pipeline(transaction=True)
        if watch:
            try:
                await pipe.watch(*watch)
            except BaseException as exc:
                # Cancellation too: the pipeline may already hold a pooled
                # connection, and only reset() gives it back.
                await _reset(pipe)
                if isinstance(exc, _FAILURES):
                    raise self._error(exc, "WATCH") from exc
                raise
        return _RedisTransaction(self, pipe, bool(watch))

    # -- WatchBackend ----------------------------------------------------

    async def watch(
        self, prefix: str, *, max_pending: int = DEFAULT_MAX_PENDING, configure_server: bool = True
    ) -> ChangeStream:
        """Stream changes to keys under ``prefix`` (keyspace notifications); see :mod:`kivigo_async.watch`.

        Example:
            ```python
            stream = await backend.watch("user:")
            ```
        """
        from ._watch import watch_standalone  # imports this module

        return await watch_standalone(self, prefix, max_pending, configure_server)


async def _reset(pipe: Pipeline) -> None:
    """Give the pipeline's connection back, no longer watching; never raises a redis-py error.

    Abandoning a transaction needs nothing from the server: if its ``UNWATCH``
    fails (a timeout, a dropped connection), redis-py has closed that connection,
    and the WATCH ended with it. An error here would only hide the caller's
    own: the exception that left the ``async with`` block, or its result.
    """
    # Shielded: a reset interrupted by cancellation would keep a watching
    # connection out of the pool for good.
    reset: Callable[[], Awaitable[None]] = pipe.reset
    # redis-py disconnects a connection whose read failed or timed out, and puts
    # it back only afterwards: nothing is left to clean up here.
    with contextlib.suppress(RedisError):
        await asyncio.shield(reset())


class _RedisTransaction:
    def __init__(self, backend: RedisBackend, pipe: Pipeline, watching: bool) -> None:
        self._backend = backend
        self._pipe = pipe
        self._watching = watching
        # One connection, one reply at a time: reads from several tasks, or the
        # block's exit while a read runs, take turns instead of mixing replies.
        self._turn = asyncio.Lock()
        # A read that failed (or was cancelled) while watching ended the WATCH with
        # its connection: EXEC would then run unguarded, over concurrent writes.
        self._watch_lost = False

    async def get(self, key: str) -> bytes | None:
        if not self._watching:
            return await self._backend.get(key)
        async with self._turn:
            try:
                # While watching, the pipeline runs commands at once on its own connection.
                execute: Callable[..., Awaitable[Any]] = self._pipe.execute_command
                return await execute("GET", key)  # type: ignore[no-any-return]
            except _FAILURES as exc:
                self._watch_lost = True
                raise self._backend._error(exc, "GET", key) from exc
            except BaseException:
                self._watch_lost = True
                raise

    async def commit(self, ops: Sequence[TxOp]) -> None:
        async with self._turn:
            if self._watching and (self._watch_lost or not self._pipe.watching):
                raise TransactionConflictError(
                    f"EXEC on {self._backend._node}: the connection watching the keys was lost "
                    "before the block ended, so a concurrent change could not be seen; "
                    "nothing was written, run the transaction again"
                )
            await self._commit(ops)

    async def _commit(self, ops: Sequence[TxOp]) -> None:
        commands: list[tuple[Arg, ...]] = []
        for op in ops:
            if op[0] != "set":
                commands.append(("UNLINK", op[1]))
            elif op[3] is None:
                commands.append(("SET", op[1], op[2]))
            else:
                commands.append(("SET", op[1], op[2], "PX", op[3]))
        try:
            if not self._watching:
                await self._backend._run_once(commands)
                return
            pipe = self._pipe
            start: Callable[[], None] = pipe.multi
            start()
            for command in commands:
                pipe.execute_command(*command)
            await pipe.execute()
        except _FAILURES as exc:
            raise self._backend._error(exc, "EXEC") from exc
        finally:
            self._backend._written([op[1] for op in ops])

    async def discard(self) -> None:
        async with self._turn:
            await _reset(self._pipe)
