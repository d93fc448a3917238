"""The exception hierarchy of kivigo-async.

Every error the library raises derives from :class:`KivigoError`. Errors that
come from a driver (redis-py, the OS) keep the original exception as
``__cause__``; their messages name the key or the node involved, never a
password, token or encryption key.

Example:
    >>> from kivigo_async.errors import KeyNotFoundError, KivigoError
    >>> issubclass(KeyNotFoundError, KeyError) and issubclass(KeyNotFoundError, KivigoError)
    True
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendUnavailableError",
    "CodecError",
    "ConfigurationError",
    "ConnectTimeoutError",
    "CrossSlotError",
    "DecodeError",
    "EncodeError",
    "HealthCheckError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "KeyNotFoundError",
    "KivigoError",
    "OperationTimeoutError",
    "PermissionDeniedError",
    "NotificationsDisabledError",
    "TransactionConflictError",
    "UnsupportedOperationError",
    "WatchOverflowError",
]


class KivigoError(Exception):
    """Base class of every exception raised by kivigo-async."""


class InvalidArgumentError(KivigoError, ValueError):
    """An argument is out of range or of the wrong kind (a negative TTL, an empty batch...)."""


class InvalidKeyError(InvalidArgumentError):
    """A key is empty or not a ``str``."""


class KeyNotFoundError(KivigoError, KeyError):
    """The key does not exist (or has expired)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"key not found: {self.key!r}"


class CodecError(KivigoError):
    """A value could not be encoded or decoded."""


class EncodeError(CodecError, TypeError):
    """A value could not be encoded by the codec; nothing was written."""


class DecodeError(CodecError, ValueError):
    """Stored bytes could not be decoded into the requested type."""


class BackendError(KivigoError):
    """The backend failed to carry out an operation (server error, out of memory...)."""


class BackendUnavailableError(BackendError, ConnectionError):
    """The backend cannot be reached: connection refused or reset, or authentication failed."""


class PermissionDeniedError(BackendError, PermissionError):
    """The server refused the command for this user (an ACL rule)."""


class OperationTimeoutError(BackendError, TimeoutError):
    """The backend did not answer within the configured timeout."""


class ConnectTimeoutError(BackendUnavailableError, OperationTimeoutError):
    """No connection could be opened within ``dial_timeout`` (socket, TLS and login).

    Both a :class:`BackendUnavailableError` and an :class:`OperationTimeoutError`,
    so either ``except`` clause catches it, whichever transport raised it.

    Example:
        >>> from kivigo_async.errors import BackendUnavailableError, ConnectTimeoutError
        >>> issubclass(ConnectTimeoutError, BackendUnavailableError)
        True
        >>> issubclass(ConnectTimeoutError, TimeoutError)
        True
    """


class UnsupportedOperationError(KivigoError, NotImplementedError):
    """The backend does not implement this capability."""


class TransactionConflictError(KivigoError):
    """A watched key changed before the transaction committed; nothing was written."""


class HealthCheckError(KivigoError):
    """A health check failed. ``errors`` holds every underlying failure."""

    def __init__(self, message: str, errors: list[BaseException] | None = None) -> None:
        super().__init__(message)
        self.errors: list[BaseException] = list(errors or [])


class ConfigurationError(KivigoError, ValueError):
    """Options or a URL are invalid; raised before any connection is made."""


class CrossSlotError(InvalidArgumentError):
    """A cluster transaction names keys in more than one hash slot; nothing was sent.

    Keys sharing a hash tag (the part in braces: ``{user:1}:a``, ``{user:1}:b``)
    share a slot.
    """


class WatchOverflowError(KivigoError):
    """The consumer fell more than ``max_pending`` events behind; later events were dropped.

    The events buffered before the overflow are delivered first; then the
    watch ends with this error, its subscription already released.
    """


class NotificationsDisabledError(UnsupportedOperationError):
    """The server does not publish the keyspace notifications a watch needs, and may not be told to.

    Raised when ``CONFIG GET`` / ``CONFIG SET notify-keyspace-events`` is refused
    (an ACL rule, or ``CONFIG`` renamed or disabled, as on many managed
    services). The fix is on the server: set ``notify-keyspace-events`` to
    include ``K``, ``g``, ``$``, ``x`` and ``e`` (``Kg$xe``, or ``KEA``), then
    watch with ``configure_server=False``, which skips the check.

    Also what ends a running watch when a flag it needs is turned off on the
    server after it subscribed: the changes made since were not published.
    """
