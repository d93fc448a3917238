"""A multiplexed (auto-pipelining) Redis connection on the hiredis parser.

Commands from any number of tasks share one connection. Each command's bytes
are appended to an output buffer that is flushed once per event-loop
iteration, so commands issued concurrently leave in one write; replies are
matched to callers strictly in order (Redis answers in order on a
connection).

Why this is cancellation-safe by construction: a caller that is cancelled
or times out leaves its slot in the reply queue; when its reply arrives it is
read and dropped. No caller can ever receive another caller's reply, and the
connection never has to be thrown away because someone gave up waiting.

A reply that does not arrive within ``read_timeout`` means the server (or the
network) stalled: the connection is aborted and every call waiting on it fails
with a timeout; the next call reconnects.
"""

from __future__ import annotations

import asyncio
import random
import re
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Union, cast

import hiredis
from redis import exceptions as rx

from ._errors import DialTimeoutError, NotSentError, strip_echo

__all__ = ["MuxConnection", "OptionalCommand", "backoff", "listener_backoff", "pack"]

Arg = Union[str, bytes, int, float]  # noqa: UP007 (runtime alias)


class OptionalCommand(tuple[Arg, ...]):
    """A command from a :class:`MuxConnection`'s ``prepare`` that the server may refuse.

    A refusal does not fail the connect: the socket opens all the same, and
    ``on_refused`` is called with the server's error once the rest of the login
    has succeeded. For what the connection can serve without, such as the
    client cache's tracking: losing it must cost the cache, not every call.
    """

    on_refused: Callable[[str], None]

    def __new__(cls, args: Sequence[Arg], on_refused: Callable[[str], None]) -> OptionalCommand:
        command = super().__new__(cls, args)
        command.on_refused = on_refused
        return command


#: Below this many arguments hiredis packs faster; above it, _pack_text does (it
#: costs about 30% fewer instructions per argument: hiredis formats every length
#: header with sprintf and copies every argument twice).
_TEXT_PACK_FROM = 24
#: RESP length headers of arguments up to 511 characters, ready to join. A list, not
#: a tuple: list.__getitem__ is a fast method call, tuple.__getitem__ a slot wrapper.
_HEADS = [f"${n}" for n in range(512)]


def _pack_text(args: Sequence[Arg]) -> bytes | None:
    """RESP for a long command of ASCII str arguments (MGET and DEL of many keys), or None.

    The whole command is joined as one str and encoded once, instead of one bytes
    object per argument. None (the caller falls back to hiredis) for any other
    argument: bytes, numbers, non-ASCII text, or a string of 512 characters or more.
    """
    if type(args[-1]) is not str:
        # MSET's last argument is a value (bytes): spare it the full pass below.
        return None
    try:
        # Exact str only: a subclass's __len__ (or its metaclass) could claim any
        # length, and the header must match the data joined. The comprehension
        # checks and measures in one pass (faster on CPython 3.11+ than map()s).
        heads = [_HEADS[len(arg)] for arg in args if type(arg) is str]
    except IndexError:  # a string of 512 characters or more
        return None
    count = len(heads)
    if count != len(args):  # bytes, numbers or a str subclass among the arguments
        return None
    # "*N", then header and argument alternately, then "" so that the join ends in CRLF.
    pieces = [""] * (2 * count + 2)
    pieces[0] = f"*{count}"
    pieces[1:-1:2] = heads
    pieces[2:-1:2] = cast("Sequence[str]", args)  # all exact str, checked above
    text = "\r\n".join(pieces)
    # isascii() is a flag lookup: character counts are byte counts only for ASCII.
    return text.encode() if text.isascii() else None


def pack(args: Sequence[Arg]) -> bytes:
    """Serialize one command as RESP (hiredis does it in C; long key lists are joined as text)."""
    if len(args) >= _TEXT_PACK_FROM:
        packed = _pack_text(args)
        if packed is not None:
            return packed
    try:
        # hiredis' stub types the argument as a 1-tuple; any tuple is accepted.
        return hiredis.pack_command(tuple(args))  # type: ignore[arg-type,no-any-return]
    except UnicodeEncodeError:
        # Keys that came back from SCAN with undecodable bytes use surrogateescape.
        return hiredis.pack_command(  # type: ignore[no-any-return]
            tuple(a.encode("utf-8", "surrogateescape") if isinstance(a, str) else a for a in args)  # type: ignore[arg-type]
        )


#: The server's answer to ``AUTH <password>`` when the default user has no password:
#: the connection is logged in as that user all the same. Taken as a success, as
#: redis-py's ``HELLO 3 AUTH default <password>`` is, so that clients can be given
#: the password before the server asks for it.
_NO_PASSWORD_NEEDED = re.compile(r"ERR AUTH <password> called without any password configured")


def backoff(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (1, 2...).

    Full jitter, capped: many clients retrying at once spread out.
    """
    # The exponent is capped too: 2**attempt past 1023 is too large for a float.
    return random.uniform(0, 0.008 * (1 << min(attempt, 6)))  # at most 0.512 s


def listener_backoff(attempt: int) -> float:
    """Seconds before a client-cache listener's connect attempt number ``attempt``.

    Doubles from 0.1 s up to 5 s, with jitter. A listener may retry for as long
    as the process lives (an ACL user who may not subscribe): the exponent is
    capped, or 2**attempt would overflow a float after about an hour.
    """
    return min(5.0, 0.05 * (1 << min(attempt, 7))) * random.uniform(0.5, 1.0)


def _seen(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _replies(futures: Sequence[asyncio.Future[Any]]) -> list[Any]:
    """Await every reply of a multi-command write, in order.

    When one fails (the connection was lost) or the caller gives up, nobody
    awaits the others: their errors are marked as seen, or asyncio would log
    "Future exception was never retrieved" for each.
    """
    try:
        return [await f for f in futures]
    except BaseException:
        for future in futures:
            if future.done():
                _seen(future)
            else:
                future.add_done_callback(_seen)
        raise


class _Stalled(rx.TimeoutError):
    pass


class _Protocol(asyncio.Protocol):
    """Byte stream <-> reply queue for one socket."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        read_timeout: float | None,
        node: str,
        on_push: Callable[[list[Any]], None] | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self._loop = loop
        self._read_timeout = read_timeout
        self._node = node
        self._on_push = on_push
        self._on_lost = on_lost
        self._reader = hiredis.Reader()
        # (future, deadline) per command written, oldest first.
        self._waiters: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._lost: BaseException | None = None
        self._retiring = False
        self.closed = False
        self.generation = 0  # the MuxConnection's, when it was opened

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports are not asyncio.Transport subclasses.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiters = self._waiters
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._abort(rx.ConnectionError(f"protocol error from {self._node}: {exc}"))
                return
            if reply is False:
                return
            if (
                self._on_push is not None
                and reply.__class__ is list
                and len(reply) >= 3
                and reply[0] in (b"message", b"pmessage")
            ):
                # A pub/sub message: nobody's reply, so it must not take a waiter's place.
                self._on_push(reply)
                continue
            if not waiters:  # a reply nobody asked for: the stream is out of step
                self._abort(rx.ConnectionError(f"unexpected reply from {self._node}"))
                return
            future = waiters.popleft()[0]
            if not future.done():  # a cancelled caller's reply is read and dropped
                future.set_result(reply)
            if reply.__class__ is hiredis.ReplyError and str(reply).startswith("ERR Protocol error"):
                # The server closes the connection after this reply (a value over
                # proto-max-bulk-len, say) and runs nothing sent behind it: fail
                # those now, and let the next call open a new connection rather
                # than write to a closing one.
                self._abort(rx.ConnectionError(f"{self._node} closed the connection: {reply}"))
                return
            if self._retiring and not waiters:
                self.close()
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        error = self._lost or rx.ConnectionError(
            f"connection to {self._node} lost" + (f": {exc}" if exc else "")
        )
        while self._waiters:
            future = self._waiters.popleft()[0]
            if not future.done():
                future.set_exception(error)
        if self._on_lost is not None:
            self._on_lost()

    # -- sending ---------------------------------------------------------------

    def send(self, payload: bytes, count: int = 1) -> list[asyncio.Future[Any]]:
        """Queue ``payload`` (``count`` commands) and return one future per reply."""
        if self.closed:
            raise self._lost or rx.ConnectionError(f"connection to {self._node} is closed")
        loop = self._loop
        deadline = loop.time() + self._read_timeout if self._read_timeout is not None else 0.0
        futures = [loop.create_future() for _ in range(count)]
        self._waiters.extend((f, deadline) for f in futures)
        self._out.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if self._read_timeout is not None and self._timer is None:
            self._timer = loop.call_at(deadline, self._check_deadline)
        return futures

    def send_one(self, payload: bytes) -> asyncio.Future[Any]:
        """:meth:`send` for a single command, without the list."""
        if self.closed:
            raise self._lost or rx.ConnectionError(f"connection to {self._node} is closed")
        loop = self._loop
        future = loop.create_future()
        if self._read_timeout is None:
            self._waiters.append((future, 0.0))
        else:
            deadline = loop.time() + self._read_timeout
            self._waiters.append((future, deadline))
            if self._timer is None:
                self._timer = loop.call_at(deadline, self._check_deadline)
        self._out.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._transport is None or self.closed or not self._out:
            return
        out = self._out
        self._out = []
        if len(out) == 1:
            self._transport.write(out[0])
        else:
            self._transport.write(b"".join(out))

    # -- deadlines ---------------------------------------------------------------

    def _check_deadline(self) -> None:
        # One timer per connection, re-armed lazily for the oldest waiter: a
        # per-call timeout would cost more than the rest of the call.
        self._timer = None
        if not self._waiters or self.closed:
            return
        deadline = self._waiters[0][1]
        if deadline <= self._loop.time():
            self._abort(_Stalled(f"no reply from {self._node} within {self._read_timeout} s"))
        else:
            self._timer = self._loop.call_at(deadline, self._check_deadline)

    def _abort(self, error: BaseException) -> None:
        self._lost = error
        # Closed at once, not when connection_lost() runs on a later turn: a call
        # made in between would be queued on this socket only to fail.
        self.closed = True
        if self._transport is not None:
            self._transport.abort()  # connection_lost fails every waiter with ``error``
        else:
            self.connection_lost(None)

    def close(self) -> None:
        if not self.closed:
            self._abort(rx.ConnectionError(f"connection to {self._node} was closed by the client"))

    def close_when_idle(self) -> None:
        """Close once every reply asked for has arrived (or ``read_timeout`` aborts it)."""
        self._retiring = True
        if not self._waiters:
            self.close()


#: Opens a transport to the server with the given protocol factory.
Opener = Callable[[Callable[[], _Protocol]], Awaitable[tuple[asyncio.BaseTransport, _Protocol]]]


def tcp_opener(host: str, port: int, tls: ssl.SSLContext | None) -> Opener:
    async def open_(factory: Callable[[], _Protocol]) -> tuple[asyncio.BaseTransport, _Protocol]:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_connection(
            factory, host, port, ssl=tls, server_hostname=host if tls is not None else None
        )
        sock = transport.get_extra_info("socket")
        if sock is not None:
            import socket

            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:  # a peer that reset already, on some systems: retried, not leaked
                transport.close()
                raise
        return transport, protocol

    return open_


def unix_opener(path: str) -> Opener:
    async def open_(factory: Callable[[], _Protocol]) -> tuple[asyncio.BaseTransport, _Protocol]:
        loop = asyncio.get_running_loop()
        return await loop.create_unix_connection(factory, path)

    return open_


class MuxConnection:
    """A self-reconnecting multiplexed connection.

    ``handshake`` commands (AUTH, SELECT, CLIENT SETNAME) run on every new
    socket before any user command. Connecting is retried ``max_retries``
    times with jittered backoff; a command whose bytes were sent is never
    retried, since it may have been applied. ``resolve``, when given, is awaited
    before each connect and returns the opener to use instead of ``opener``, and
    the address it leads to (named in the errors of that connect).
    """

    def __init__(
        self,
        opener: Opener,
        *,
        node: str,
        handshake: Sequence[Sequence[Arg]] = (),
        dial_timeout: float | None = 5.0,
        read_timeout: float | None = 3.0,
        max_retries: int = 3,
        prepare: Callable[[], Awaitable[Sequence[Sequence[Arg]]]] | None = None,
        on_push: Callable[[list[Any]], None] | None = None,
        on_lost: Callable[[], None] | None = None,
        resolve: Callable[[], Awaitable[tuple[Opener, str]]] | None = None,
    ) -> None:
        self._opener = opener
        self._resolve = resolve
        self._prepare = prepare
        self._on_push = on_push
        self._on_lost = on_lost
        self._node = node
        self._handshake = [pack(cmd) for cmd in handshake]
        self._dial_timeout = dial_timeout
        self._read_timeout = read_timeout
        self._max_retries = max_retries
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self._generation = 0  # bumped by reconnect(): a connection opened before is not used
        self._draining: set[_Protocol] = set()  # left by reconnect(), closing once answered
        self._closed = False
        self._closed_why = "is closed"  # said to calls made after close() or retire()
        #: Sockets opened so far: when it moves, the one before was lost or left.
        self.opened = 0

    @property
    def connected(self) -> bool:
        return self._protocol is not None and not self._protocol.closed

    @property
    def draining(self) -> bool:
        """Whether a socket left by :meth:`reconnect` or :meth:`retire` still waits for replies."""
        return any(not protocol.closed for protocol in self._draining)

    async def execute(self, *args: Arg) -> Any:
        """Send one command and return its reply (raises redis-py exceptions)."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        reply = await protocol.send_one(pack(args))
        if reply.__class__ is hiredis.ReplyError:
            raise rx.ResponseError(str(reply))
        return reply

    async def send_command(self, args: Sequence[Arg]) -> Any:
        """Send one command and return its reply, a server error as a ``hiredis.ReplyError``."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        return await protocol.send_one(pack(args))

    async def execute_many(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Send ``commands`` in one write and return their replies (errors as values)."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        futures = protocol.send(b"".join(pack(cmd) for cmd in commands), len(commands))
        return await _replies(futures)

    async def _connect(self) -> _Protocol:
        while True:
            if self._closed:
                raise NotSentError(f"connection to {self._node} {self._closed_why}")
            if self._connecting is None:
                self._connecting = asyncio.get_running_loop().create_task(self._open_with_retries())
                self._connecting.add_done_callback(self._connected)
            connecting = self._connecting
            # Waited for, not awaited: one caller giving up must not abort the connect
            # the others wait for, and a connect that close() stopped must reach its
            # callers as a closed connection, not as a cancellation of their own
            # (which before Python 3.11 cannot be told apart from a real one).
            await asyncio.wait((connecting,))
            if connecting.cancelled() and self._closed:
                raise NotSentError(f"connection to {self._node} {self._closed_why}")
            protocol = connecting.result()
            if protocol.generation == self._generation:
                return protocol
            # reconnect() came after the open and before this caller resumed: that
            # socket may lead where reconnect() meant to leave, so open another.

    def _connected(self, task: asyncio.Task[_Protocol]) -> None:
        self._connecting = None
        if not task.cancelled() and task.exception() is None:
            protocol = task.result()
            if self._closed or protocol.generation != self._generation:
                protocol.close()
            else:
                self._protocol = protocol
                self.opened += 1

    async def _open_with_retries(self) -> _Protocol:
        attempt = 0
        while True:
            generation = self._generation  # stamped: _connected and _connect drop a stale one
            try:
                protocol = await self._open()
            except (rx.AuthenticationError, rx.ResponseError, DialTimeoutError):
                # A timeout is not retried (on the pool neither): dial_timeout, not
                # (max_retries + 1) times it, bounds waiting for a silent server.
                raise
            except rx.ConnectionError:
                attempt += 1
                if attempt > self._max_retries or self._closed:
                    raise
                await asyncio.sleep(backoff(attempt))
                continue
            protocol.generation = generation
            return protocol

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        # Finding the server (Sentinel asks the sentinels) is bounded by its own
        # timeouts: dial_timeout bounds what follows, as on the pool's connections.
        opener, node = (self._opener, self._node) if self._resolve is None else await self._resolve()
        started = loop.time()
        try:
            _, protocol = await asyncio.wait_for(
                opener(lambda: _Protocol(loop, self._read_timeout, self._node, self._on_push, self._on_lost)),
                self._dial_timeout,
            )
        except asyncio.TimeoutError:
            raise DialTimeoutError(f"timed out connecting to {node}") from None
        except ssl.SSLError as exc:
            raise rx.ConnectionError(f"TLS handshake with {node} failed: {exc}") from exc
        except OSError as exc:
            raise rx.ConnectionError(f"cannot connect to {node}: {exc.strerror or exc}") from exc
        handshake = self._handshake
        prepared: Sequence[Sequence[Arg]] = ()
        if self._prepare is not None:
            try:
                prepared = await self._prepare()
                handshake = handshake + [pack(cmd) for cmd in prepared]
            except BaseException:
                protocol.close()
                raise
        if handshake:
            # dial_timeout bounds the whole open, the login included: a server that
            # accepts connections but never answers must not hold callers for read_timeout.
            bound = self._dial_timeout
            left = None if bound is None else max(0.0, bound - (loop.time() - started))
            try:
                replies = await asyncio.wait_for(
                    _replies(protocol.send(b"".join(handshake), len(handshake))), left
                )
            except (asyncio.TimeoutError, _Stalled):
                # _Stalled: read_timeout, which the login's replies wait under too, ran
                # out first. The call's command was never sent: a dial timeout, retried.
                protocol.close()
                raise DialTimeoutError(f"timed out connecting to {node} (no reply to the login)") from None
            except BaseException:
                protocol.close()
                raise
            refused: list[tuple[OptionalCommand, str]] = []
            first = len(self._handshake)  # the prepared commands' replies come after the login's
            for index, reply in enumerate(replies):
                if reply.__class__ is hiredis.ReplyError and not _NO_PASSWORD_NEEDED.match(str(reply)):
                    # A server that does not know AUTH echoes its arguments: the password.
                    text = strip_echo(str(reply))
                    command = prepared[index - first] if index >= first else None
                    if isinstance(command, OptionalCommand):
                        refused.append((command, text))
                        continue
                    protocol.close()
                    if text.startswith(("WRONGPASS", "NOAUTH", "ERR invalid password", "ERR AUTH")):
                        raise rx.AuthenticationError(text)
                    raise rx.ResponseError(text)
            # Told only once the socket is sure to open: a failed login reports its own error.
            try:
                for command, text in refused:
                    command.on_refused(text)
            except BaseException:
                protocol.close()
                raise
        return protocol

    def drop(self) -> None:
        """Close the current socket; the next call opens a new one."""
        if self._protocol is not None:
            self._protocol.close()

    def reconnect(self, *, wait_for_replies: bool) -> None:
        """Open a new socket for the next call; a connect under way is not used either.

        With ``wait_for_replies``, the current socket closes once the replies already
        asked for are in, so no call in flight fails; without, it closes at once and
        the calls in flight on it fail as on a lost connection.
        """
        self._generation += 1
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            return
        if wait_for_replies:
            self._draining = {p for p in self._draining if not p.closed}
            self._draining.add(protocol)
            protocol.close_when_idle()
        else:
            protocol.close()

    def retire(self) -> None:
        """Take no new calls; the socket closes once the replies asked for are in.

        For a node that left the layout: the calls in flight on it end as they
        would have, and :meth:`close` still ends the socket at once. A connect
        under way is left to finish; its callers then fail with a ``ConnectionError``.
        """
        self._closed = True
        self._closed_why = "is closed: the node left the cluster"
        self.reconnect(wait_for_replies=True)

    async def close(self) -> None:
        self._closed = True
        # The backend was closed, by its own close() or its client's: not an outage.
        self._closed_why = "was closed with the backend (Client.close() closes its backend)"
        if self._connecting is not None:
            self._connecting.cancel()
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None
        for protocol in self._draining:
            protocol.close()  # its calls fail: none may complete after close() returns
        self._draining.clear()
