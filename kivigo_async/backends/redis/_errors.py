"""Turn redis-py exceptions into :mod:`kivigo_async.errors` exceptions."""

from __future__ import annotations

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


def translate(exc: Exception, command: str, key: str | None, node: str) -> KivigoError:
    """Map ``exc`` to our hierarchy; the message names the command, key and node.

    redis-py messages carry no credentials (they name the host and the
    server's reply), so they are safe to include.
    """
    where = f"{command} on {node}" if key is None else f"{command} for key {key!r} on {node}"
    if isinstance(exc, rx.WatchError):
        return TransactionConflictError(f"{where}: a watched key changed before commit")
    if isinstance(exc, (rx.AuthenticationError, rx.AuthenticationWrongNumberOfArgsError)):
        return BackendUnavailableError(f"{where}: authentication failed ({exc})")
    if isinstance(exc, rx.NoPermissionError):
        return PermissionDeniedError(f"{where}: permission denied ({exc})")
    if isinstance(exc, rx.TimeoutError):
        return OperationTimeoutError(f"{where}: timed out ({exc})")
    if isinstance(exc, rx.ConnectionError):
        if "No connection available" in str(exc):
            return OperationTimeoutError(f"{where}: no free connection in the pool in time")
        if "NOAUTH" in str(exc):
            return BackendUnavailableError(f"{where}: authentication failed ({exc})")
        return BackendUnavailableError(f"{where}: {exc}")
    if isinstance(exc, rx.ResponseError):
        text = str(exc)
        if text.startswith("NOPERM"):
            return PermissionDeniedError(f"{where}: permission denied ({text})")
        if text.startswith(("NOAUTH", "WRONGPASS")):
            return BackendUnavailableError(f"{where}: authentication failed ({text})")
        if text.startswith("OOM"):
            return BackendError(f"{where}: the server is out of memory (maxmemory reached): {text}")
        return BackendError(f"{where}: server error: {text}")
    if isinstance(exc, UnicodeEncodeError):
        return InvalidKeyError(f"{where}: the key cannot be encoded as UTF-8 (a lone surrogate?)")
    return BackendError(f"{where}: {type(exc).__name__}: {exc}")
