"""Options of the standalone Redis backend, and parsing of ``redis://`` URLs."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import ssl
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Literal, TypeVar
from urllib.parse import SplitResult, parse_qs, quote, unquote, urlencode, urlsplit

from ...errors import ConfigurationError
from ._cache import ClientCache

__all__ = ["URL_OPTIONS", "RedisOptions", "check_addr", "join_addr", "refuse_unknown_options"]


#: SELECT's range: the server refuses a larger index whatever its ``databases`` setting.
_MAX_DB = 2**31 - 1


def _default_pool_size() -> int:
    # The same default as go-redis: ten connections per CPU.
    return 10 * (os.cpu_count() or 1)


@dataclass(frozen=True)
class RedisOptions:
    """How :class:`~kivigo_async.backends.redis.RedisBackend` connects.

    The fields follow KiviGo's (go-redis') options. Durations are seconds.

    Attributes:
        addr: ``"host:port"`` (``"[::1]:6379"`` for IPv6), or a socket path when
            ``network="unix"``.
        network: ``"tcp"`` or ``"unix"``.
        username: the ACL user; ``None`` for the default user. Not shown in ``repr`` either.
        password: never shown in ``repr``, logs or error messages.
        db: the database number.
        pool_size: the most connections open at once; callers beyond it wait
            up to ``pool_timeout`` for a free one.
        min_idle_conns: pooled connections opened and checked when the client
            connects (with ``auto_pipeline``, the multiplexed connection comes on top).
        max_retries: how many times a command is retried after a *connection*
            error (never after a timeout, so ``read_timeout`` bounds every call),
            with jittered exponential backoff; ``0`` turns retries off.
            A retried write may have been applied once already: ``SET`` is
            idempotent, but ``delete`` may then report ``False``.
        dial_timeout: bound on opening a connection (TCP, TLS, AUTH).
        read_timeout: bound on waiting for a reply; ``None`` waits forever.
        write_timeout: bound on sending a command. The redis-py transport uses
            one socket timeout for both directions, so this must be ``None``
            (meaning "same as ``read_timeout``") or equal to ``read_timeout``.
        pool_timeout: how long a call waits for a free connection;
            ``None`` means ``read_timeout + 1`` (as go-redis).
        tls: ``True`` for TLS with certificate and host name verification
            against the system's trust store, or an :class:`ssl.SSLContext`
            (e.g. one trusting a private CA). Verification is only off when
            the context you pass turns it off.
        client_name: sent with ``CLIENT SETNAME`` (shown in ``CLIENT LIST``).
        protocol: RESP version of the pooled connections, 2 or 3; ``None`` for
            redis-py's default. The multiplexed connection speaks RESP2.
        auto_pipeline: send single-key and batch commands of all tasks over one
            multiplexed connection, coalescing the commands issued in the same
            event-loop iteration into one write (see "Auto-pipelining" in the
            docs). A transaction that watches keys takes a pooled connection of
            its own; one that does not is sent as one write on the multiplexed one.
            ``False`` sends every command over the pool instead.
        client_cache: a :class:`ClientCache` turns on client-side caching of
            ``get`` and ``batch_get``: values stay in a local LRU until Redis reports a change
            (``CLIENT TRACKING`` invalidation messages). Needs ``auto_pipeline``.

    Example:
        >>> opts = RedisOptions(addr="cache:6379", password="s3cret", pool_size=20)
        >>> "s3cret" in repr(opts)
        False
    """

    addr: str = "localhost:6379"
    network: Literal["tcp", "unix"] = "tcp"
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
    auto_pipeline: bool = True
    client_cache: ClientCache | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.addr, str) or not self.addr:
            raise ConfigurationError("addr must be a non-empty string")
        if self.network not in ("tcp", "unix"):
            raise ConfigurationError(f"network must be 'tcp' or 'unix', not {self.network!r}")
        if self.network == "tcp":
            _split_addr(self.addr)
        for name in ("username", "password"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                # The value is not quoted: it may be the password itself.
                raise ConfigurationError(f"{name} must be a str or None")
        for name in ("db", "pool_size", "min_idle_conns", "max_retries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigurationError(f"{name} must be a non-negative int, not {value!r}")
        if self.db > _MAX_DB:
            raise ConfigurationError(f"db must be at most {_MAX_DB} (the server's limit), not {self.db}")
        if self.pool_size < 1:
            raise ConfigurationError("pool_size must be at least 1")
        if self.min_idle_conns > self.pool_size:
            raise ConfigurationError("min_idle_conns cannot exceed pool_size")
        for name in ("dial_timeout", "read_timeout", "write_timeout", "pool_timeout"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, (int, float))
                or isinstance(value, bool)  # True would be a one-second timeout
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ConfigurationError(f"{name} must be a positive number of seconds or None")
        if self.write_timeout is not None and self.write_timeout != self.read_timeout:
            raise ConfigurationError(
                "write_timeout must be None or equal to read_timeout: "
                "the redis.asyncio transport applies one socket timeout to reads and writes"
            )
        if not isinstance(self.tls, (bool, ssl.SSLContext)):
            raise ConfigurationError("tls must be True, False or an ssl.SSLContext")
        if self.tls and self.network == "unix":
            raise ConfigurationError("tls is not available over a unix socket")
        if not isinstance(self.auto_pipeline, bool):
            raise ConfigurationError("auto_pipeline must be True or False")
        if self.client_cache is not None:
            if not isinstance(self.client_cache, ClientCache):
                raise ConfigurationError("client_cache must be a ClientCache or None")
            if not self.auto_pipeline:
                raise ConfigurationError(
                    "client_cache needs auto_pipeline=True (tracking follows that connection)"
                )
        if self.protocol not in (None, 2, 3):
            raise ConfigurationError(f"protocol must be 2, 3 or None, not {self.protocol!r}")
        check_client_name(self.client_name)

    @classmethod
    def default(cls) -> RedisOptions:
        """Options for a local server: ``localhost:6379``, database 0, no password.

        Example:
            >>> RedisOptions.default().addr
            'localhost:6379'
        """
        return cls()

    def replace(self, **changes: object) -> RedisOptions:
        """Return a copy with ``changes`` applied (and validated).

        Example:
            >>> RedisOptions.default().replace(db=2).db
            2
        """
        return checked_replace(self, changes)

    def _auth_command(self) -> tuple[str, ...] | None:
        """The AUTH command a new connection sends first, or ``None``.

        The same rule as the redis-py pool, so that every connection of a backend
        runs as the same user: a username alone logs in with an empty password
        (an ACL user with ``nopass``), and neither (or only an empty password)
        sends no AUTH at all.
        """
        if self.username:
            return ("AUTH", self.username, self.password or "")
        if self.password:
            return ("AUTH", self.password)
        return None

    @property
    def host(self) -> str:
        """The host part of ``addr`` (TCP only)."""
        return _split_addr(self.addr)[0]

    @property
    def port(self) -> int:
        """The port part of ``addr`` (TCP only)."""
        return _split_addr(self.addr)[1]

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context to connect with, or ``None`` without TLS."""
        if isinstance(self.tls, ssl.SSLContext):
            return self.tls
        return ssl.create_default_context() if self.tls else None

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> RedisOptions:
        """Parse a ``redis://``, ``rediss://`` (TLS) or ``unix://`` URL.

        ``redis://[[username]:password@]host[:port][/db][?option=value...]``.
        Query options: ``db``, ``client_name``, ``auto_pipeline``, ``pool_size``, ``min_idle_conns``,
        ``max_retries``, ``dial_timeout``, ``read_timeout``, ``write_timeout``, ``pool_timeout``,
        ``protocol``, and for ``rediss://`` ``ssl_ca_certs`` (a CA file) or
        ``ssl_cert_reqs=none`` (turns verification off, explicitly). An unknown
        option is an error, never silently ignored, and so is a host or port in a
        ``unix://`` URL. Numbers are plain ASCII. ``overrides`` win over the URL.

        Example:
            >>> o = RedisOptions.from_url("rediss://app:p%40ss@cache.internal:6380/2")
            >>> (o.addr, o.username, o.db, bool(o.tls))
            ('cache.internal:6380', 'app', 2, True)
        """
        parts = split_url(url)
        try:
            parsed_port = parts.port
        except ValueError:
            # urllib's message echoes the bad port, which is part of the password
            # when one holds an unescaped "/", "?" or "#".
            raise ConfigurationError(_UNESCAPED) from None
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss", "unix", "valkey", "valkeys"):
            raise ConfigurationError(f"unsupported URL scheme {scheme!r}: use redis://, rediss:// or unix://")
        refuse_unescaped_credentials(parts, unix=scheme == "unix")
        query = {k: v[0] for k, v in url_query(parts.query).items()}
        refuse_unknown_options(
            parts.query, URL_OPTIONS | ({"password", "username"} if scheme == "unix" else set())
        )
        kwargs: dict[str, object] = {}
        if parts.username:
            kwargs["username"] = url_unquote(parts.username, "the username")
        if parts.password is not None:
            kwargs["password"] = url_unquote(parts.password, "the password")
        if scheme == "unix":
            if not parts.path:
                raise ConfigurationError("a unix:// URL needs a socket path")
            _refuse_unix_host(parts)
            kwargs["network"] = "unix"
            kwargs["addr"] = url_unquote(parts.path, "the socket path")
            if "password" in query:
                kwargs["password"] = query.pop("password")
            if "username" in query:
                kwargs["username"] = query.pop("username")
        else:
            host = parts.hostname or "localhost"
            kwargs["addr"] = join_addr(host, 6379 if parsed_port is None else parsed_port)
            path = parts.path[1:].removesuffix("/")  # none, or "/<db>" (a trailing "/" allowed)
            if path:
                if not (path.isascii() and path.isdigit()):
                    raise ConfigurationError("invalid Redis URL: the path must be a database number")
                if "db" in query:
                    raise ConfigurationError("invalid Redis URL: the database is in the path and in ?db=")
                kwargs["db"] = int(path)
        tls_required = scheme in ("rediss", "valkeys")
        ca_file = query.pop("ssl_ca_certs", None)
        cert_reqs = query.pop("ssl_cert_reqs", None)
        if (ca_file is not None or cert_reqs is not None) and not tls_required:
            raise ConfigurationError("ssl_ca_certs and ssl_cert_reqs need a rediss:// URL")
        verify_off = cert_reqs is not None and cert_reqs.lower() in ("none", "cert_none")
        if ca_file and verify_off:
            # The CA would be loaded and never consulted: say so rather than guess.
            raise ConfigurationError(
                "ssl_ca_certs has no effect with ssl_cert_reqs=none (verification off): drop one of them"
            )
        if tls_required:
            try:
                ctx = ssl.create_default_context(cafile=ca_file or None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigurationError(f"cannot load ssl_ca_certs {ca_file!r}: {exc}") from None
            if verify_off:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            elif cert_reqs is not None and cert_reqs.lower() not in ("required", "cert_required"):
                raise ConfigurationError("ssl_cert_reqs must be 'required' or 'none'")
            kwargs["tls"] = ctx
        for name, raw in query.items():
            if name in ("db", "pool_size", "min_idle_conns", "max_retries", "protocol"):
                kwargs[name] = _int_option(name, raw)
            elif name in ("dial_timeout", "read_timeout", "write_timeout", "pool_timeout"):
                kwargs[name] = _float_option(name, raw)
            elif name == "client_name":
                kwargs[name] = raw
            elif name == "auto_pipeline":
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ConfigurationError("auto_pipeline must be true or false")
                kwargs[name] = raw.lower() in ("true", "1", "yes")
            else:
                raise ConfigurationError(f"unknown option {name!r} in Redis URL")
        kwargs.update(overrides)
        try:
            return cls(**kwargs)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ConfigurationError(str(exc)) from None


_Options = TypeVar("_Options")


def checked_replace(options: _Options, changes: Mapping[str, object]) -> _Options:
    """``dataclasses.replace``, with an unknown option a ConfigurationError like any bad value."""
    try:
        return dataclasses.replace(options, **changes)  # type: ignore[type-var]
    except TypeError as exc:
        raise ConfigurationError(f"{type(options).__name__}.replace(): {exc}") from None


def check_client_name(name: object) -> None:
    """Refuse a client name the server would refuse at every connect (spaces, newlines...)."""
    if name is None:
        return
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"client_name must be a non-empty str or None, not {name!r}")
    if any(not "!" <= c <= "~" for c in name):
        raise ConfigurationError(
            f"client_name {name!r} may hold only printable ASCII without spaces (the server's rule)"
        )


_UNESCAPED = (
    "invalid Redis URL: bad host or port (percent-encode '/', '?', '#' and '@' in the username and password)"
)


_UNSPLITTABLE = (
    "invalid Redis URL: its host part cannot be read (percent-encode '[', ']' and any "
    "non-ASCII character, as well as '/', '?', '#' and '@', in the username and password)"
)


def login_user(username: str | None, password: str | None) -> str | None:
    """The user name to give redis-py's connections: the default user's when only a password is set.

    Named, redis-py logs in with ``AUTH default <password>`` on RESP2 too (as
    ``HELLO 3 AUTH`` does on RESP3), which a server whose default user has no
    password yet accepts; a one-argument ``AUTH`` it refuses. (redis-py falls back
    to one argument for a server too old for two.)

    Example:
        >>> login_user(None, "secret"), login_user("app", "secret"), login_user(None, None)
        ('default', 'app', None)
    """
    return username or ("default" if password else None)


def split_url(url: str) -> SplitResult:
    """``urlsplit(url)``, refusing a URL it cannot split without quoting any of it.

    urllib's messages quote what it choked on: the whole host part, password
    included, when the password holds a character that NFKC normalization turns
    into a separator (a fullwidth colon or at sign, U+FF1A or U+FF20), or the
    text between ``[`` and ``]``, which may be part of the password.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigurationError(_UNSPLITTABLE) from None
    # Python 3.10 (and 3.11 before 3.11.4) lets brackets in the user name or password
    # through: refused here too, so that a URL means the same on every version.
    if any(c in parts.netloc.rpartition("@")[0] for c in "[]"):
        raise ConfigurationError(_UNSPLITTABLE)
    return parts


_NOT_UTF8 = "invalid Redis URL: {what} is not UTF-8 once percent-decoded"


def url_unquote(text: str, what: str) -> str:
    """``text`` percent-decoded; refused (not quoted: it may be a password) unless UTF-8.

    ``urllib``'s default would put U+FFFD in place of the bytes, and a password
    changed that way fails every login with no hint why.
    """
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ConfigurationError(_NOT_UTF8.format(what=what)) from None


def url_query(query: str, *, repeatable: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """A URL's query options; one given twice is refused (which one should win?).

    Only the options in ``repeatable`` (a cluster's extra ``addr``, say) may repeat.
    A ``+`` is a plus sign, as in the user and password part, not a space (HTML
    forms' rule): ``?password=a+b`` is the password ``a+b``.
    """
    try:
        options = parse_qs(query.replace("+", "%2B"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        # Not quoted: the value may be a password.
        raise ConfigurationError(_NOT_UTF8.format(what="an option")) from None
    for name, values in options.items():
        if len(values) > 1 and name not in repeatable:
            raise ConfigurationError(f"invalid Redis URL: the option {name!r} is given {len(values)} times")
    return options


def query_text(options: Mapping[str, str | Sequence[str]]) -> str:
    """The query string that :func:`url_query` reads back as ``options``.

    ``urlencode`` writes a space as ``+`` by default, which :func:`url_query`
    reads as a plus sign: a CA file path with a space would change on the way.
    """
    return urlencode(options, doseq=True, quote_via=quote)


def refuse_unescaped_credentials(parts: SplitResult, *, unix: bool = False) -> None:
    """Refuse a URL whose host part a password cut short, without echoing any of it.

    A password holding an unescaped ``/``, ``?`` or ``#`` ends the host part early,
    and the rest (with the real host after its ``@``) lands in the path, query or
    fragment, where it would be read as a database, an option or a service name.
    A ``unix://`` URL's path (a socket file) and query (``password=``) may hold one.
    """
    if "@" in parts.fragment or (not unix and ("@" in parts.path or "@" in parts.query)):
        raise ConfigurationError(_UNESCAPED)
    if parts.fragment:
        raise ConfigurationError("invalid Redis URL: a '#fragment' has no meaning in it")


#: The query options of :meth:`RedisOptions.from_url` (``unix://`` adds ``password`` and ``username``).
URL_OPTIONS = frozenset(
    {
        "db",
        "client_name",
        "auto_pipeline",
        "pool_size",
        "min_idle_conns",
        "max_retries",
        "dial_timeout",
        "read_timeout",
        "write_timeout",
        "pool_timeout",
        "protocol",
        "ssl_ca_certs",
        "ssl_cert_reqs",
    }
)
#: Query options whose value is a credential.
_CREDENTIAL_OPTIONS = frozenset({"password", "username", "sentinel_password", "sentinel_username"})


def refuse_unknown_options(query: str, known: AbstractSet[str]) -> None:
    """Refuse the first option of ``query`` not in ``known``, in the order written.

    Its name is quoted, unless a credential option comes before it: an ``&`` left
    unescaped in ``?password=`` makes the rest of the password read as an option name.
    """
    after_credential = False
    for pair in query.split("&"):
        if not pair:
            continue
        name = unquote(pair.partition("=")[0].replace("+", "%2B"))
        if name not in known:
            if after_credential:
                raise ConfigurationError(
                    "invalid Redis URL: an unknown option follows a credential option "
                    "(percent-encode '&' as %26 in the username and password)"
                )
            raise ConfigurationError(f"unknown option {name!r} in Redis URL")
        after_credential = after_credential or name in _CREDENTIAL_OPTIONS


def _refuse_unix_host(parts: SplitResult) -> None:
    """Refuse a ``unix://`` URL with a host or port, which nothing would use.

    ``unix://tmp/redis.sock`` (one slash short) has the host ``tmp`` and the path
    ``/redis.sock``: read silently, it would connect to another socket.
    """
    host = parts.netloc.rpartition("@")[2]  # not quoted: it follows the password
    if host:
        raise ConfigurationError(
            "invalid Redis URL: a unix:// URL takes no host or port; "
            "write unix:///absolute/path.sock (three slashes), credentials as unix://user:password@/path"
        )


# Plain ASCII numbers only: int() and float() also take "1_0", "+5", " 5" and
# non-ASCII digits, so a typo would quietly become another database or timeout.
# A leading "-" is kept, for the options' own "non-negative" / "positive" message.
_INT = re.compile(r"-?[0-9]+")
_FLOAT = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def _int_option(name: str, raw: str) -> int:
    if not _INT.fullmatch(raw):
        raise ConfigurationError(f"{name} must be an integer, not {raw!r}")
    return int(raw)


def _float_option(name: str, raw: str) -> float:
    if not _FLOAT.fullmatch(raw):
        raise ConfigurationError(f"{name} must be a number of seconds, not {raw!r}")
    return float(raw)


def join_addr(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets: the inverse of splitting ``addr``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_addr(addr: object, what: str = "addr", parser: str = "RedisOptions.from_url()") -> None:
    """Refuse an address that is not ``host:port``, naming the field ``what``.

    A URL or a ``user:password@host:port`` is refused before anything quotes it:
    its password would be shown in the error, and, accepted as a host name, in
    every ``repr`` and connection error after.
    """
    if not isinstance(addr, str) or not addr:
        raise ConfigurationError(f"{what} must be a non-empty 'host:port' string")
    _split_addr(addr, what, parser)


def _split_addr(addr: str, what: str = "addr", parser: str = "RedisOptions.from_url()") -> tuple[str, int]:
    if "://" in addr or "@" in addr or "/" in addr:
        raise ConfigurationError(f"{what} looks like a URL: give 'host:port' or use {parser}")
    if any(c.isspace() for c in addr):
        raise ConfigurationError(f"{what} must be 'host:port', without spaces")
    # Quoted from here on: without "@" or "/" it holds no credentials.
    host, sep, port = addr.rpartition(":")
    if not sep or not host:
        raise ConfigurationError(f"{what} must be 'host:port', not {addr!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or "[" in host or "]" in host:
        raise ConfigurationError(f"{what} must be 'host:port' ('[::1]:6379' for IPv6), not {addr!r}")
    # ASCII digits only: int() also takes "+10", "1_0", " 10" and fullwidth digits.
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigurationError(f"{what} needs a port from 1 to 65535, not {addr!r}")
    return host, int(port)
