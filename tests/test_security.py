"""Security: credentials and keys never leak, TLS is verified, ACL denials are clear.

Complements tests/test_redis_backend.py (wrong password on the default
transport, ``rediss://`` without the CA, ACL denial of single calls) with both
transports, every kind of call, log records at DEBUG and host name checks.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import ssl
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis.asyncio as aioredis
import trustme
from conftest import CheckedCard, CheckedStruct, chain_text, checked_card_models, redis_options
from redis.exceptions import ResponseError

from kivigo_async import AsyncBackend, Client, Codec, EncryptedCodec, JsonCodec, MsgspecCodec
from kivigo_async.backends.redis import (
    RedisBackend,
    RedisClusterBackend,
    RedisClusterOptions,
    RedisOptions,
    RedisSentinelBackend,
    RedisSentinelOptions,
)
from kivigo_async.backends.redis._errors import translate
from kivigo_async.errors import (
    BackendUnavailableError,
    ConfigurationError,
    DecodeError,
    EncodeError,
    HealthCheckError,
    KivigoError,
    PermissionDeniedError,
)
from kivigo_async.testing.proxy import FaultProxy
from kivigo_async.testing.pytest_plugin import ServerFactory, require_server
from kivigo_async.testing.servers import BinaryKind, RedisServer, ServerPool, ServerStartError

TRANSPORTS = pytest.mark.parametrize("auto_pipeline", [True, False], ids=["multiplexed", "pool"])


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record as a handler would write it, traceback included."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(record) for record in caplog.records)


def secret_forms(secret: str | bytes) -> list[str]:
    """The ways a secret could show up in text."""
    raw = secret.encode() if isinstance(secret, str) else secret
    forms = [repr(raw), raw.hex(), base64.b64encode(raw).decode()]
    if isinstance(secret, str):
        forms.append(secret)
    return forms


def assert_absent(text: str, *secrets: str | bytes) -> None:
    for secret in secrets:
        for form in secret_forms(secret):
            assert form not in text, f"a secret ({form[:4]}...) leaked"


# --------------------------------------------------------------------------- credentials


@pytest.mark.server
@TRANSPORTS
@pytest.mark.parametrize(
    ("variant", "wrong_user"),
    [("password", False), ("acl", False), ("acl", True)],
    ids=["password", "acl", "acl-user"],
)
async def test_failed_auth_leaks_no_credentials(
    kivigo_server_pool: ServerPool,
    caplog: pytest.LogCaptureFixture,
    auto_pipeline: bool,
    variant: Any,
    wrong_user: bool,
) -> None:
    server = require_server(kivigo_server_pool, "valkey", variant)
    assert server.password is not None
    wrong_password = "pw-" + uuid.uuid4().hex
    username = "user-" + uuid.uuid4().hex if wrong_user else server.username
    options = redis_options(server, auto_pipeline=auto_pipeline, max_retries=1).replace(
        username=username, password=wrong_password
    )
    caplog.set_level(logging.DEBUG)  # the root logger: ours, redis-py's and asyncio's records
    backend = RedisBackend(options)
    client = Client(backend)

    async def in_transaction() -> None:
        async with client.transaction(watch=["k"]) as tx:
            tx.set("k", 1)

    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: client.get("k"),
        lambda: client.set("k", "v"),
        lambda: client.batch_set({"a": 1, "b": 2}, ttl=60),
        in_transaction,
    ]
    texts = [repr(backend), repr(client), repr(backend.redis), repr(backend.redis.connection_pool)]
    try:
        with pytest.raises(BackendUnavailableError) as connect_error:
            async with Client(RedisBackend(options)):
                pass
        texts.append(chain_text(connect_error.value))
        for call in calls:
            with pytest.raises(BackendUnavailableError) as info:
                await call()
            assert "auth" in str(info.value).lower()
            texts.append(chain_text(info.value))
        with pytest.raises(HealthCheckError) as health_error:
            await client.health()
        texts.append(chain_text(health_error.value))
    finally:
        await client.close()
    texts.append(log_text(caplog))
    everything = "\n".join(texts)
    assert_absent(everything + repr(options), wrong_password, server.password)
    if wrong_user:
        # Neither errors nor logs name the user; RedisOptions' repr does, on purpose.
        assert username is not None
        assert_absent(everything, username)


def test_reprs_hide_credentials_and_keys() -> None:
    password, sentinel_password = "pw-" + uuid.uuid4().hex, "spw-" + uuid.uuid4().hex
    key = EncryptedCodec.generate_key()
    options = RedisOptions(addr="cache:6379", username="app", password=password)
    backend = RedisBackend(options)
    codec = EncryptedCodec(JsonCodec(), [key, EncryptedCodec.generate_key()])
    texts = [
        repr(options),
        str(options),
        repr(RedisOptions.from_url(f"rediss://app:{quote(password)}@cache:6380/1")),
        repr(backend),
        repr(backend.redis),
        repr(backend.redis.connection_pool),
        repr(Client(backend, codec=codec)),
        repr(codec),
        repr(RedisClusterOptions(addrs=["c1:7000"], username="app", password=password)),
        repr(
            RedisSentinelOptions(
                sentinels=["s1:26379"],
                service_name="cache",
                password=password,
                sentinel_password=sentinel_password,
            )
        ),
    ]
    assert_absent("\n".join(texts), password, sentinel_password, key)
    # The username is no secret in the options (it helps debugging), but the backend does not repeat it.
    assert "app" not in repr(backend) + repr(Client(backend))


async def test_encryption_keys_never_in_errors(caplog: pytest.LogCaptureFixture) -> None:
    from kivigo_async.backends.memory import MemoryBackend

    caplog.set_level(logging.DEBUG)
    key, other = EncryptedCodec.generate_key(), EncryptedCodec.generate_key()
    errors: list[BaseException] = []
    with pytest.raises(ConfigurationError) as bad_size:
        EncryptedCodec(JsonCodec(), [key[:31]])
    errors.append(bad_size.value)
    with pytest.raises(ConfigurationError) as duplicate:
        EncryptedCodec(JsonCodec(), [key, key])
    errors.append(duplicate.value)
    async with Client(MemoryBackend(), codec=EncryptedCodec(JsonCodec(), [key])) as client:
        await client.set("card", {"pan": "4111"})
        stored = bytearray(await client.get_raw("card"))
        stored[-1] ^= 0x01
        await client.set_raw("tampered", bytes(stored))
        with pytest.raises(DecodeError) as tampered:
            await client.get("tampered")
        assert "'tampered'" in str(tampered.value)
        errors.append(tampered.value)
        async with Client(client.backend, codec=EncryptedCodec(JsonCodec(), [other])) as stranger:
            with pytest.raises(DecodeError) as unknown_key:
                await stranger.get("card")
            errors.append(unknown_key.value)
    assert_absent("\n".join(chain_text(e) for e in errors) + log_text(caplog), key, other)


class ChainingCodec(JsonCodec):
    """Follows the old advice to codec authors: chains the error that quotes the value."""

    def encode(self, value: Any) -> bytes:
        with contextlib.suppress(EncodeError):
            return super().encode(value)
        try:
            raise ValueError(f"cannot serialise {value!r}")
        except ValueError as exc:
            raise EncodeError(f"cannot encode a value of type {type(value).__name__}") from exc

    def decode(self, data: bytes, type: Any) -> Any:
        with contextlib.suppress(DecodeError):
            return super().decode(data, type)
        try:
            raise ValueError(f"cannot parse {data!r}")
        except ValueError as exc:
            raise DecodeError(f"expected {type.__name__}") from exc


class QuotingCodec:
    """A third-party codec whose own exceptions, not CodecErrors, quote the value."""

    def encode(self, value: Any) -> bytes:
        try:
            return json.dumps(value).encode()
        except TypeError:
            raise ValueError(f"cannot serialise {value!r}") from None

    def decode(self, data: bytes, type: Any) -> Any:
        value = json.loads(data)
        if type is not object and not isinstance(value, type):
            raise TypeError(f"expected {type.__name__}, got {value!r}")
        return value


ENCODERS = pytest.mark.parametrize(
    "codec",
    [JsonCodec(), MsgspecCodec("json"), MsgspecCodec("msgpack"), ChainingCodec(), QuotingCodec()],
    ids=["json", "msgspec-json", "msgspec-msgpack", "chaining", "quoting"],
)


@ENCODERS
async def test_a_value_that_cannot_be_encoded_is_not_in_the_error_chain(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")
    from kivigo_async.backends.memory import MemoryBackend

    class Login(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        user: str
        pin: int

    login = Login(user="ada", pin=1)
    login.pin = "hunter2-Tiger42"  # type: ignore[assignment]  # unvalidated; pydantic's error quotes it
    errors: list[BaseException] = []
    async with Client(MemoryBackend(), codec=codec) as client:
        with pytest.raises(EncodeError) as single:
            await client.set("login", login)
        errors.append(single.value)
        with pytest.raises(EncodeError) as batch:
            await client.batch_set({"a": 1, "login": login})
        errors.append(batch.value)
        with pytest.raises(EncodeError) as filled:
            await client.get_or_set("login", lambda: login)
        errors.append(filled.value)
    for error in errors:
        assert "'login'" in str(error)
        assert "Tiger42" not in chain_text(error)
    if isinstance(codec, QuotingCodec):  # named by its type, as EncryptedCodec names an inner failure
        assert "QuotingCodec raised ValueError" in str(single.value)


@ENCODERS
async def test_a_value_that_cannot_be_decoded_is_not_in_the_error_chain(codec: Codec) -> None:
    from kivigo_async.backends.memory import MemoryBackend

    card = {"pan": "4111-Tiger42"}
    errors: list[BaseException] = []
    async with Client(MemoryBackend(), codec=codec) as client:
        await client.set("card", card)
        with pytest.raises(DecodeError) as single:
            await client.get("card", int)
        errors.append(single.value)
        with pytest.raises(DecodeError) as batch:
            await client.batch_get(["card"], int)
        errors.append(batch.value)
        with pytest.raises(DecodeError) as hit:
            await client.get_or_set("card", int, type=int)
        errors.append(hit.value)
        async with client.transaction() as tx:
            with pytest.raises(DecodeError) as read:
                await tx.get("card", int)
        errors.append(read.value)
        # The factory's result is read back before it is stored: that decode too.
        with pytest.raises(EncodeError) as filled:
            await client.get_or_set("fresh", lambda: card, type=int)
        errors.append(filled.value)
    for error in errors:
        assert "'card'" in str(error) or "'fresh'" in str(error)
        assert "Tiger42" not in chain_text(error)
    # A CodecError says what its codec wrote; any other exception is named by its type.
    expected = {ChainingCodec: "expected int", QuotingCodec: "QuotingCodec raised TypeError"}
    for error in errors:
        assert expected.get(type(codec), "expected int") in str(error)


@pytest.mark.parametrize(
    "codec",
    [JsonCodec(), MsgspecCodec("msgpack"), EncryptedCodec(JsonCodec(), [EncryptedCodec.generate_key()])],
    ids=["json", "msgspec-msgpack", "encrypted"],
)
async def test_a_types_own_error_does_not_quote_the_stored_value(codec: Codec) -> None:
    # msgspec puts the message of a ValueError or TypeError raised by the type's
    # own code (__post_init__, a pydantic validator in a list) in its error.
    from kivigo_async.backends.memory import MemoryBackend

    card_models = checked_card_models()
    card = {"number": "4111-Tiger42"}
    errors: list[BaseException] = []
    async with Client(MemoryBackend(), codec=codec) as client:
        await client.set("card", card)
        await client.set("cards", [card])
        for key, tp in (
            ("card", CheckedCard),
            ("card", CheckedStruct),
            ("cards", card_models),
            ("cards", list[CheckedCard]),
        ):
            with pytest.raises(DecodeError) as single:
                await client.get(key, tp)
            errors.append(single.value)
            with pytest.raises(DecodeError) as batch:
                await client.batch_get([key], tp)
            errors.append(batch.value)
    for error in errors:
        assert "Tiger42" not in chain_text(error)
    # What is said: the type of the exception, and where msgspec met it.
    assert str(errors[0]).endswith("): ValueError raised by the type's own code")
    assert str(errors[-1]).endswith("): ValueError raised by the type's own code - at `$[0]`")


URL_PARSERS = pytest.mark.parametrize(
    ("parse", "template"),
    [
        (RedisOptions.from_url, "redis://app:{}@cache:6379/0"),
        (RedisSentinelOptions.from_url, "redis+sentinel://app:{}@s1:26379,s2:26379/cache"),
        (RedisClusterOptions.from_url, "redis://app:{}@node1:7000"),
    ],
    ids=["redis", "sentinel", "cluster"],
)


@URL_PARSERS
@pytest.mark.parametrize(
    "password",
    ["pw\uff1aTiger42", "pw\uff20Tiger42", "pw[Tiger42]"],
    ids=["fullwidth-colon", "fullwidth-at", "brackets"],
)
def test_urls_urllib_cannot_split_never_show_the_password(
    parse: Callable[[str], Any], template: str, password: str
) -> None:
    # urllib's own message quotes the host part (password included) when NFKC turns a
    # character of it into a separator, or the text between brackets.
    with pytest.raises(ConfigurationError, match="percent-encode") as info:
        parse(template.format(password))
    assert "Tiger42" not in chain_text(info.value)
    assert parse(template.format(quote(password, safe=""))).password == password


# --------------------------------------------------------------------------- TLS


@pytest.fixture
def tls_server(kivigo_server_pool: ServerPool) -> RedisServer:
    return require_server(kivigo_server_pool, "redis", "tls")


@pytest.mark.server
@pytest.mark.parametrize("how", ["url", "tls=True"])
async def test_untrusted_certificate_refused_on_the_pool(tls_server: RedisServer, how: str) -> None:
    # The multiplexed transport's refusal is in tests/test_redis_backend.py.
    addr = f"{tls_server.host}:{tls_server.port}"
    if how == "url":
        backend = RedisBackend.from_url(f"{tls_server.url}?auto_pipeline=false&max_retries=0")
    else:
        backend = RedisBackend(RedisOptions(addr=addr, tls=True, auto_pipeline=False, max_retries=0))
    try:
        with pytest.raises(BackendUnavailableError) as info:
            await backend.get("tls:k")
        assert "certificate" in str(info.value).lower()
    finally:
        await backend.close()


@pytest.mark.server
@TRANSPORTS
async def test_trusted_certificate_works(tls_server: RedisServer, auto_pipeline: bool) -> None:
    assert tls_server.ca_path is not None
    query = f"ssl_ca_certs={quote(tls_server.ca_path)}&auto_pipeline={str(auto_pipeline).lower()}"
    url = f"{tls_server.url}?{query}"
    async with Client(RedisBackend.from_url(url)) as client:
        await client.set("tls:trusted", 1)
        assert await client.batch_get(["tls:trusted"]) == {"tls:trusted": 1}
        assert await client.delete("tls:trusted")


@pytest.mark.server
@TRANSPORTS
async def test_certificate_for_another_host_is_refused(tls_server: RedisServer, auto_pipeline: bool) -> None:
    # The server's certificate names 127.0.0.1 and localhost; a proxy on 127.0.0.2 makes
    # the same trusted server answer under a name the certificate does not hold.
    trusted = tls_server.ssl_context()
    assert trusted.check_hostname
    async with (
        FaultProxy(tls_server.host, tls_server.port, host="127.0.0.2") as elsewhere,
        FaultProxy(tls_server.host, tls_server.port) as same_name,
    ):
        wrong = RedisBackend(
            RedisOptions(addr=elsewhere.addr, tls=trusted, auto_pipeline=auto_pipeline, max_retries=0)
        )
        try:
            with pytest.raises(BackendUnavailableError) as info:
                await wrong.set("tls:k", b"v")
            text = str(info.value).lower()
            assert "certificate" in text or "hostname" in text or "ip address mismatch" in text, text
        finally:
            await wrong.close()
        right = RedisBackend(RedisOptions(addr=same_name.addr, tls=trusted, auto_pipeline=auto_pipeline))
        try:
            await right.set("tls:k", b"v")  # the proxy is not what failed: the name was
            assert await right.get("tls:k") == b"v"
            await right.delete("tls:k")
        finally:
            await right.close()


def test_tls_contexts_verify_by_default() -> None:
    for ctx in (
        RedisOptions(tls=True).ssl_context(),
        RedisOptions.from_url("rediss://cache:6380").ssl_context(),
        RedisOptions.from_url("valkeys://cache:6380").ssl_context(),
    ):
        assert isinstance(ctx, ssl.SSLContext)
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.check_hostname


@pytest.mark.parametrize(
    ("parse", "url"),
    [
        (RedisOptions.from_url, "rediss://cache:6380"),
        (RedisSentinelOptions.from_url, "rediss+sentinel://s1:26379/cache"),
        (RedisClusterOptions.from_url, "rediss://node1:7000"),
    ],
    ids=["redis", "sentinel", "cluster"],
)
def test_a_ca_file_whose_path_holds_a_space_or_a_plus(
    parse: Callable[[str], Any], url: str, tmp_path: Path
) -> None:
    # The sentinel and cluster parsers hand the query on to RedisOptions.from_url:
    # re-encoded with urlencode's default, a space came back as a "+", read as a plus.
    folder = tmp_path / "private ca+1"
    folder.mkdir()
    ca_file = folder / "my ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    expected = ssl.create_default_context(cafile=str(ca_file)).get_ca_certs()
    context = parse(f"{url}?ssl_ca_certs={quote(str(ca_file))}").tls
    assert isinstance(context, ssl.SSLContext)
    assert context.get_ca_certs() == expected  # that CA, and only it


# --------------------------------------------------------------------------- ACL


@pytest.mark.server
@TRANSPORTS
async def test_username_without_password_logs_in_as_that_user(
    redis_server_factory: ServerFactory, auto_pipeline: bool
) -> None:
    """Every connection (multiplexed, pool, transaction) runs as the named ``nopass`` user."""
    server: RedisServer = redis_server_factory("valkey")
    control = aioredis.Redis(**server.redis_kwargs())  # type: ignore[arg-type]
    try:
        execute: Callable[..., Awaitable[Any]] = control.execute_command
        await execute("ACL", "SETUSER", "app", "on", "nopass", "~app:*", "+@all")
        # The default user may only touch its own keys: a write as "default" fails.
        await execute("ACL", "SETUSER", "default", "resetkeys", "~default:*")
        options = redis_options(server, auto_pipeline=auto_pipeline).replace(username="app", password=None)
        async with Client(RedisBackend(options)) as client:
            await client.set("app:k", 1)
            assert await client.batch_get(["app:k"]) == {"app:k": 1}
            async with client.transaction(watch=["app:k"]) as tx:
                tx.set("app:k", await tx.get("app:k", int) + 1)
            assert await client.get("app:k") == 2
            with pytest.raises(PermissionDeniedError):
                await client.set("default:k", 1)
    finally:
        await control.aclose()


@pytest.mark.parametrize(
    ("username", "password", "expected"),
    [
        (None, None, None),
        (None, "", None),
        (None, "pw", ("AUTH", "pw")),
        ("app", None, ("AUTH", "app", "")),
        ("app", "pw", ("AUTH", "app", "pw")),
    ],
)
def test_auth_command_matches_the_pool(username: str | None, password: str | None, expected: object) -> None:
    assert RedisOptions(username=username, password=password)._auth_command() == expected


@pytest.fixture(params=["valkey", "redis"])
def acl_server(request: pytest.FixtureRequest, kivigo_server_pool: ServerPool) -> RedisServer:
    kind: BinaryKind = request.param
    return require_server(kivigo_server_pool, kind, "acl")


@pytest.mark.server
@TRANSPORTS
async def test_acl_user_outside_its_keys_gets_permission_denied(
    acl_server: RedisServer, auto_pipeline: bool
) -> None:
    secret_value = "value-" + uuid.uuid4().hex
    options = redis_options(acl_server, auto_pipeline=auto_pipeline).replace(
        username=acl_server.limited_username, password=acl_server.limited_password
    )

    async with Client(RedisBackend(options)) as client:
        await client.batch_delete(["allowed:a", "allowed:b", "allowed:c"])

        async def transaction_writing_outside() -> None:
            async with client.transaction() as tx:
                tx.set("allowed:c", secret_value)
                tx.set("secret:c", secret_value)

        async def transaction_watching_outside() -> None:
            async with client.transaction(watch=["secret:w"]) as tx:
                tx.set("allowed:c", secret_value)

        denied: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("get", lambda: client.get("secret:k")),
            ("set", lambda: client.set("secret:k", secret_value)),
            ("delete", lambda: client.delete("secret:k")),
            ("has_keys", lambda: client.has_keys(["allowed:a", "secret:k"])),
            ("expire", lambda: client.expire("secret:k", 10)),
            ("ttl", lambda: client.ttl("secret:k")),
            ("persist", lambda: client.persist("secret:k")),
            ("batch_get", lambda: client.batch_get(["allowed:a", "secret:k"])),
            ("batch_delete", lambda: client.batch_delete(["allowed:a", "secret:k"])),
            ("batch_set", lambda: client.batch_set({"allowed:a": secret_value, "secret:a": secret_value})),
            (
                "batch_set ttl",
                lambda: client.batch_set({"allowed:b": secret_value, "secret:b": secret_value}, ttl=60),
            ),
            ("transaction", transaction_writing_outside),
            ("watch", transaction_watching_outside),
        ]
        for name, call in denied:
            with pytest.raises(PermissionDeniedError) as info:
                await call()
            error = info.value
            assert type(error).__module__.startswith("kivigo_async"), (name, error)
            assert isinstance(error, (PermissionError, KivigoError))
            assert "permission denied" in str(error), (name, str(error))
            assert secret_value not in str(error), name  # redis-py's pipeline errors echo the command
        # The mixed batches and the transaction wrote nothing, not even their allowed keys.
        assert await client.batch_get(["allowed:a", "allowed:b", "allowed:c"]) == {}
        await client.set("allowed:k", 1)
        assert await client.get("allowed:k") == 1
        assert await client.delete("allowed:k")


# --------------------------------------------------------------------------- servers that echo


@pytest.mark.server
@TRANSPORTS
@pytest.mark.parametrize("missing", ["HELLO", "AUTH"])
async def test_a_server_echoing_the_login_never_shows_the_password(
    redis_server_factory: ServerFactory, auto_pipeline: bool, missing: str
) -> None:
    # A server (or proxy) that does not know the login command answers "unknown
    # command 'AUTH', with args beginning with: '<password>'".
    password = "pw-" + uuid.uuid4().hex
    if missing == "HELLO":
        # The pooled connections send HELLO 3 AUTH; the multiplexed one logs in with AUTH.
        server = redis_server_factory("redis", "password", extra_config={"rename-command": 'HELLO ""'})
        assert server.password is not None
        password = server.password
        options = redis_options(server, auto_pipeline=auto_pipeline, protocol=3, max_retries=1)
    else:
        server = redis_server_factory("redis", extra_config={"rename-command": 'AUTH ""'})
        options = redis_options(server, auto_pipeline=auto_pipeline, protocol=2, max_retries=1)
        options = options.replace(password=password)
    client = Client(RedisBackend(options))

    async def in_transaction() -> None:  # watching: on a pooled connection, whatever the transport
        async with client.transaction(watch=["k"]) as tx:
            tx.set("k", 1)

    async def set_one() -> None:
        await client.set("k", "v")

    calls: list[Callable[[], Awaitable[None]]] = [set_one, in_transaction]
    errors: list[BaseException] = []
    try:
        for call in calls:
            try:
                await call()
            except KivigoError as exc:
                errors.append(exc)
    finally:
        await client.close()
    # Only the multiplexed connection without HELLO logs in: everything else fails.
    assert len(errors) == (1 if (missing, auto_pipeline) == ("HELLO", True) else 2)
    for error in errors:
        assert isinstance(error, BackendUnavailableError), error
        assert f"does not know {missing}" in str(error)
        if missing == "HELLO":
            assert "protocol=2" in str(error)
        assert_absent(chain_text(error), password)


@pytest.mark.server
@pytest.mark.parametrize("topology", ["cluster", "sentinel"])
async def test_a_seed_or_sentinel_echoing_the_login_never_shows_the_password(
    redis_server_factory: ServerFactory, topology: str
) -> None:
    # redis-py logs in to a cluster seed or a sentinel with HELLO 3 AUTH; a server that
    # does not know HELLO echoes it, and the look-up's error quotes or chains that reply.
    server = redis_server_factory("redis", "password", extra_config={"rename-command": 'HELLO ""'})
    assert server.password is not None
    addr = f"{server.host}:{server.port}"
    backend: AsyncBackend
    if topology == "cluster":
        backend = RedisClusterBackend(
            RedisClusterOptions(addrs=[addr], password=server.password, protocol=3, max_retries=1)
        )
    else:
        backend = RedisSentinelBackend(
            RedisSentinelOptions(
                sentinels=[addr],
                service_name="cache",
                sentinel_password=server.password,
                password=server.password,
                protocol=3,
                max_retries=1,
            )
        )
    client = Client(backend)
    try:
        with pytest.raises(BackendUnavailableError) as info:
            await client.set("k", 1)
    finally:
        await client.close()
    assert_absent(chain_text(info.value), server.password)
    if topology == "sentinel":
        # Only the echo is cut: what the message says after it is kept.
        assert str(info.value).endswith(": unknown command 'HELLO')"), str(info.value)


@pytest.mark.parametrize(
    "reply",
    [
        "ERR unknown command 'AUTH', with args beginning with: 'default' 'Tiger42' ",
        "ERR unknown command `AUTH`, with args beginning with: `default`, `Tiger42`, ",  # Redis 5
        "unknown command 'HELLO', with args beginning with: '3' 'AUTH' 'default' 'Tiger42' ",
    ],
    ids=["redis-7", "redis-5", "hello"],
)
def test_an_echoed_login_is_cut_from_the_error_and_its_cause(reply: str) -> None:
    # Both quotings, including one no server this machine runs answers with.
    cause = ResponseError(reply)
    try:
        raise translate(cause, "SET", "k", "cache:6379") from cause
    except KivigoError as exc:
        error = exc
    assert isinstance(error, BackendUnavailableError)
    assert "Tiger42" not in chain_text(error)


@pytest.mark.server
def test_a_server_refusing_our_login_at_start_never_shows_the_password(
    kivigo_server_pool: ServerPool,
) -> None:
    # Short: the reply quoted was cut at 80 characters, which held all of this one.
    password = "pw-" + uuid.uuid4().hex[:10]
    binary = kivigo_server_pool.binary("redis", "password")
    server = RedisServer(binary, "password", password=password, extra_config={"rename-command": 'AUTH ""'})
    try:
        with pytest.raises(ServerStartError, match="rejected our credentials") as info:
            server.start()
    finally:
        server.stop()
    assert_absent(chain_text(info.value), password, password[:8])


# --------------------------------------------------------------------------- closed backends


@pytest.mark.server
@TRANSPORTS
async def test_a_transaction_refused_after_close_is_not_said_to_maybe_have_run(
    redis_server: RedisServer, auto_pipeline: bool
) -> None:
    # Nothing of it was sent: "may or may not have been applied" would send the
    # caller checking what it cannot have done.
    client = Client(RedisBackend(redis_options(redis_server, auto_pipeline=auto_pipeline)))
    await client.set("closed:k", 1)
    await client.close()

    async def in_transaction() -> None:
        async with client.transaction() as tx:
            tx.set("closed:k", 2)

    async def batch_with_ttl() -> None:
        await client.batch_set({"closed:a": 1}, ttl=60)

    calls: list[Callable[[], Awaitable[None]]] = [batch_with_ttl, in_transaction]
    for call in calls:
        with pytest.raises(BackendUnavailableError, match=r"Client\.close\(\) closes its backend") as info:
            await call()
        assert "may or may not" not in str(info.value)
