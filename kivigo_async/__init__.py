"""kivigo-async: an asyncio-native key-value client with Redis and Valkey as first-class backends.

Example:
    ```python
    from kivigo_async import Client
    from kivigo_async.backends.redis import RedisBackend

    async with Client(RedisBackend.from_url("redis://localhost:6379/0")) as client:
        await client.set("session:abc123", {"user_id": "u1"}, ttl=1800)
        print(await client.get("session:abc123"))
    ```
"""

from .backend import (
    AsyncBackend,
    BatchBackend,
    HealthBackend,
    LeaseBackend,
    TransactionBackend,
    TTLBackend,
    WatchBackend,
)
from .client import MAX_TTL_MS, Client, HealthCheck, Transaction
from .codecs import Codec, CompressedCodec, EncryptedCodec, JsonCodec, MsgspecCodec
from .errors import (
    BackendError,
    BackendUnavailableError,
    CodecError,
    ConfigurationError,
    ConnectTimeoutError,
    DecodeError,
    EncodeError,
    HealthCheckError,
    InvalidArgumentError,
    InvalidKeyError,
    KeyNotFoundError,
    KivigoError,
    OperationTimeoutError,
    PermissionDeniedError,
    TransactionConflictError,
    UnsupportedOperationError,
)
from .health import HealthReport, HealthStatus, HealthWatcher
from .hooks import EventType, HookEvent, HookHandle, HookRegistry
from .keys import KeyRegistry, KeyTemplate, KeyVars, default_registry
from .watch import ChangeEvent, ChangeType, NotificationsDisabledError, Watch, WatchOverflowError

__version__ = "0.1.0"

__all__ = [
    "MAX_TTL_MS",
    "AsyncBackend",
    "BackendError",
    "BackendUnavailableError",
    "BatchBackend",
    "ChangeEvent",
    "ChangeType",
    "Client",
    "Codec",
    "CodecError",
    "CompressedCodec",
    "ConfigurationError",
    "ConnectTimeoutError",
    "DecodeError",
    "EncodeError",
    "EncryptedCodec",
    "EventType",
    "HealthBackend",
    "HealthCheck",
    "HealthCheckError",
    "HealthReport",
    "HealthStatus",
    "HealthWatcher",
    "HookEvent",
    "HookHandle",
    "HookRegistry",
    "InvalidArgumentError",
    "InvalidKeyError",
    "JsonCodec",
    "KeyNotFoundError",
    "KeyRegistry",
    "KeyTemplate",
    "KeyVars",
    "KivigoError",
    "LeaseBackend",
    "MsgspecCodec",
    "NotificationsDisabledError",
    "OperationTimeoutError",
    "PermissionDeniedError",
    "TTLBackend",
    "Transaction",
    "TransactionBackend",
    "TransactionConflictError",
    "UnsupportedOperationError",
    "Watch",
    "WatchBackend",
    "WatchOverflowError",
    "__version__",
    "default_registry",
]
