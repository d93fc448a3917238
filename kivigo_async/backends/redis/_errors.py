"""Turn redis-py exceptions into :mod:`kivigo_async.errors` exceptions."""

from __future__ import annotations

import ast
import re

from redis import exceptions as rx

from ...errors import (
    BackendError,
    BackendUnavailableError,
    InvalidKeyError,
    KivigoError,
    OperationTimeoutError,
    PermissionDeniedError,
    TransactionConflictError,
)

__all__ = ["translate"]

# redis-py rewrites a failed pipeline command's message as
# "Command # 2 (SET key value PX 60000) of pipeline caused error: ('OOM ...',)":
# the echoed command holds the value, which must not reach our messages.
_PIPELINE_ANNOTATION = re.compile(r"Command # \d+ \(.*\) of pipeline caused error: (.*)", re.DOTALL)


def _server_text(exc: Exception) -> str:
    """The server's own error text, without redis-py's echo of a pipelined command."""
    text = str(exc)
    match = _PIPELINE_ANNOTATION.fullmatch(text)
    if match is None:
        return text
    detail = match.group(1)
    try:
        args = ast.literal_eval(detail)
    except (ValueError, SyntaxError):
        return detail
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return detail


def translate(exc: Exception, command: str, key: str | None, node: str) -> KivigoError:
    """Map ``exc`` to our hierarchy; the message names the command, key and node.

    redis-py messages carry no credentials (they name the host and the
    server's reply), so they are safe to include once a pipelined command's
    echo (which holds the value) is cut off.
    """
    where = f"{command} on {node}" if key is None else f"{command} for key {key!r} on {node}"
    if isinstance(exc, rx.WatchError):
        return TransactionConflictError(f"{where}: a watched key changed before commit")
    if isinstance(exc, UnicodeEncodeError):
        return InvalidKeyError(f"{where}: the key cannot be encoded as UTF-8 (a lone surrogate?)")
    text = _server_text(exc)
    if isinstance(exc, (rx.AuthenticationError, rx.AuthenticationWrongNumberOfArgsError)):
        return BackendUnavailableError(f"{where}: authentication failed ({text})")
    if isinstance(exc, rx.NoPermissionError):
        return PermissionDeniedError(f"{where}: permission denied ({text})")
    if isinstance(exc, rx.TimeoutError):
        return OperationTimeoutError(f"{where}: timed out ({text})")
    if isinstance(exc, rx.ConnectionError):
        if "No connection available" in text:
            return OperationTimeoutError(f"{where}: no free connection in the pool in time")
        if "NOAUTH" in text:
            return BackendUnavailableError(f"{where}: authentication failed ({text})")
        return BackendUnavailableError(f"{where}: {text}")
    if isinstance(exc, rx.OutOfMemoryError) or text.startswith("OOM"):
        # redis-py's parser strips the "OOM" prefix when it raises OutOfMemoryError.
        return BackendError(f"{where}: the server is out of memory (maxmemory reached): {text}")
    if isinstance(exc, rx.ResponseError):
        if text.startswith("NOPERM"):
            return PermissionDeniedError(f"{where}: permission denied ({text})")
        if text.startswith(("NOAUTH", "WRONGPASS")):
            return BackendUnavailableError(f"{where}: authentication failed ({text})")
        return BackendError(f"{where}: server error: {text}")
    return BackendError(f"{where}: {type(exc).__name__}: {text}")
