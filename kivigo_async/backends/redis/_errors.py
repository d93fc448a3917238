"""Turn redis-py exceptions into :mod:`kivigo_async.errors` exceptions."""

from __future__ import annotations

import ast
import re

from redis import exceptions as rx

from ...errors import (
    BackendError,
    BackendUnavailableError,
    ConnectTimeoutError,
    InvalidKeyError,
    KivigoError,
    OperationTimeoutError,
    PermissionDeniedError,
    TransactionConflictError,
)

__all__ = [
    "DIAL_TIMEOUT_TEXT",
    "DialTimeoutError",
    "NotSentError",
    "is_dial_timeout",
    "scrub_chain",
    "strip_echo",
    "translate",
    "where",
]

#: How redis-py words a connection not opened within its connect timeout; the pooled
#: connections' own bound on the whole open (login included) says the same.
DIAL_TIMEOUT_TEXT = "Timeout connecting to server"


class DialTimeoutError(rx.ConnectionError):
    """The multiplexed connection could not open (socket, TLS, login) within ``dial_timeout``.

    A ``ConnectionError`` to redis-py (no command was sent), but not retried, as
    no timeout is.
    """


class NotSentError(rx.ConnectionError):
    """A call refused before any of it was sent (the backend was closed, the node retired).

    A ``ConnectionError`` to redis-py and to the callers that test for one; told
    apart so that a transaction refused this way is not reported as one whose
    outcome is unknown.
    """


def is_dial_timeout(exc: BaseException | None) -> bool:
    """``exc`` says no connection was made within dial_timeout (ours, or redis-py's wording)."""
    if isinstance(exc, DialTimeoutError):
        return True
    return isinstance(exc, rx.TimeoutError) and str(exc).startswith(DIAL_TIMEOUT_TEXT)


# redis-py reports a watching connection that failed as a WatchError with this
# message; a real conflict (EXEC answered nil) says "Watched variable changed.".
_WATCH_CONNECTION_LOST = re.compile(r"A (\w+) occurred while watching")

_UNKNOWN_OUTCOME = ": the transaction may or may not have been applied"
#: Calls sent as one MULTI/EXEC block: a transaction, and a batch written with a TTL.
_TRANSACTIONS = frozenset({"EXEC", "MULTI/SET PX"})

# redis-py rewrites a failed pipeline command's message as
# "Command # 2 (SET key value PX 60000) of pipeline caused error: ('OOM ...',)":
# the echoed command holds the value, which must not reach our messages.
_PIPELINE_ANNOTATION = re.compile(r"Command # \d+ \(.*\) of pipeline caused error: (.*)", re.DOTALL)


# A server that does not know a command answers "ERR unknown command 'AUTH', with args
# beginning with: 'default' '<password>'" (Redis 5 quotes with backticks and commas):
# the echo is cut off wherever a server's text goes, in our messages and in the
# chained redis-py exception alike.
_ARGS_ECHO = re.compile(r",? with args beginning with:.*", re.DOTALL)
# Only the login sends HELLO and AUTH: a server that does not know them cannot be logged
# into, whatever the call. The echo is already cut off when these are matched.
_UNKNOWN_LOGIN_COMMAND = re.compile(r"(?:ERR )?unknown command [`']?(HELLO|AUTH)\b", re.IGNORECASE)
_LOGIN_HINTS = {
    "HELLO": "the server does not know HELLO (older than Redis 6, or renamed): "
    "set protocol=2 to log in without it",
    "AUTH": "the server does not know AUTH (renamed or disabled): it cannot check a password",
}


def strip_echo(text: str) -> str:
    """``text`` without a server's echo of a command's arguments (which may hold a password)."""
    return _ARGS_ECHO.sub("", text)


def scrub_chain(exc: BaseException) -> None:
    """Cut the argument echo out of ``exc`` and of every exception chained to it.

    Our errors are raised from redis-py's: a logged traceback prints the whole
    chain, so a password echoed by the server must go from each link too.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if any(isinstance(arg, str) and _ARGS_ECHO.search(arg) for arg in current.args):
            current.args = tuple(strip_echo(arg) if isinstance(arg, str) else arg for arg in current.args)
        current = current.__cause__ or current.__context__


#: Replies of a server that cannot serve commands for now: loading its data, a
#: replica without its primary, or no room for one more client.
_NOT_SERVING = ("LOADING", "MASTERDOWN", "ERR max number of clients reached")


def _server_text(exc: Exception) -> str:
    """The server's own error text, without redis-py's echo of a pipelined command or ours."""
    text = str(exc)
    match = _PIPELINE_ANNOTATION.fullmatch(text)
    if match is None:
        return strip_echo(text)
    detail = match.group(1)
    try:
        args = ast.literal_eval(detail)
    except (ValueError, SyntaxError):
        return strip_echo(detail)
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return strip_echo(args[0])
    return strip_echo(detail)


def where(command: str, key: str | None, node: str) -> str:
    """How an error message names the call: the command, the key if any, the node."""
    return f"{command} on {node}" if key is None else f"{command} for key {key!r} on {node}"


def translate(exc: Exception, command: str, key: str | None, node: str) -> KivigoError:
    """Map ``exc`` to our hierarchy; the message names the command, key and node.

    redis-py messages carry no credentials (they name the host and the
    server's reply), so they are safe to include once a pipelined command's
    echo (which holds the value) is cut off.
    """
    call = where(command, key, node)
    scrub_chain(exc)
    if isinstance(exc, rx.WatchError):
        lost = _WATCH_CONNECTION_LOST.match(str(exc))
        if lost is None:
            return TransactionConflictError(f"{call}: a watched key changed before commit")
        # Not a conflict: the connection failed. After EXEC was sent its outcome is
        # unknown, and reporting a conflict would invite a retry that applies it twice.
        cause = lost.group(1)
        failure = OperationTimeoutError if cause == "TimeoutError" else BackendUnavailableError
        if command == "EXEC":
            return failure(f"{call}: the connection failed before the reply ({cause}){_UNKNOWN_OUTCOME}")
        return failure(f"{call}: the connection failed while watching keys ({cause}); nothing was written")
    if isinstance(exc, UnicodeEncodeError):
        return InvalidKeyError(f"{call}: the key cannot be encoded as UTF-8 (a lone surrogate?)")
    text = _server_text(exc)
    if text != str(exc):
        # The echo is in redis-py's exception itself, which our error is raised
        # from: a logged traceback prints it, so it goes there too.
        exc.args = (text,)
    login = _UNKNOWN_LOGIN_COMMAND.match(text)
    if login is not None:
        return BackendUnavailableError(
            f"{call}: cannot log in: {_LOGIN_HINTS[login.group(1).upper()]} ({text})"
        )
    if isinstance(exc, (rx.AuthenticationError, rx.AuthenticationWrongNumberOfArgsError)):
        return BackendUnavailableError(f"{call}: authentication failed ({text})")
    if isinstance(exc, rx.NoPermissionError):
        return PermissionDeniedError(f"{call}: permission denied ({text})")
    # A transaction whose EXEC got no reply may have been applied; say so, since the
    # caller decides from this whether running it again is safe.
    # Refused before anything was sent (the pool, or the multiplexed connection, was
    # closed): nothing can have been applied. A connection that refuses to reopen
    # after a first attempt raises a plain ConnectionError: that outcome is unknown.
    outcome = _UNKNOWN_OUTCOME if command in _TRANSACTIONS and not isinstance(exc, NotSentError) else ""
    if is_dial_timeout(exc):
        # The same error whichever transport (or backend) tried to connect.
        return ConnectTimeoutError(f"{call}: no connection within dial_timeout ({text}){outcome}")
    if isinstance(exc, rx.TimeoutError):
        return OperationTimeoutError(f"{call}: timed out ({text}){outcome}")
    if isinstance(exc, rx.MaxConnectionsError):
        return OperationTimeoutError(f"{call}: every connection of the pool is in use (pool_size)")
    if "DB index is out of range" in text:
        # SELECT is sent only when connecting: no call can work on this server.
        return BackendUnavailableError(
            f"{call}: cannot select the database: db is not below the server's 'databases' setting ({text})"
        )
    if isinstance(exc, rx.ConnectionError):
        if "No connection available" in text:
            return OperationTimeoutError(f"{call}: no free connection in the pool in time")
        if "NOAUTH" in text:
            return BackendUnavailableError(f"{call}: authentication failed ({text})")
        return BackendUnavailableError(f"{call}: {text}{outcome}")
    if isinstance(exc, rx.OutOfMemoryError) or text.startswith("OOM"):
        # redis-py's parser strips the "OOM" prefix when it raises OutOfMemoryError.
        return BackendError(f"{call}: the server is out of memory (maxmemory reached): {text}")
    if isinstance(exc, rx.ResponseError):
        if text.startswith("NOPERM"):
            return PermissionDeniedError(f"{call}: permission denied ({text})")
        if text.startswith(("NOAUTH", "WRONGPASS")):
            return BackendUnavailableError(f"{call}: authentication failed ({text})")
        if text.startswith(_NOT_SERVING):
            # The server is there but serves nobody yet (or no more): the same error
            # redis-py's pool gives, which maps these replies to connection errors.
            return BackendUnavailableError(f"{call}: the server is not serving: {text}")
        return BackendError(f"{call}: server error: {text}")
    return BackendError(f"{call}: {type(exc).__name__}: {text}")
