"""Property tests: any key and any value round-trip on every backend and codec.

Keys are any Unicode text (glob characters, newlines, NUL, keys of tens of
thousands of characters); values are anything the codec under test supports.
Corrupted stored bytes must give a ``DecodeError`` naming the key, and a
tampered encrypted value must be rejected. Lone surrogates in keys are refused
with ``InvalidKeyError`` everywhere, except U+DC80..U+DCFF, which stand for the
bytes of a non-UTF-8 key (that is how the Redis backends list such keys).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from conftest import redis_options
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kivigo_async import Client, CompressedCodec, EncryptedCodec, JsonCodec, MsgspecCodec
from kivigo_async.backends.memory import MemoryBackend
from kivigo_async.backends.redis import RedisBackend
from kivigo_async.codecs import Codec
from kivigo_async.errors import DecodeError, InvalidKeyError
from kivigo_async.testing.servers import RedisServer

# Bounded, so the whole file takes seconds; no example database written to disk.
PROPERTY = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --------------------------------------------------------------------------- strategies

GLOB = "*?[]\\^"
unicode_chars = st.characters(exclude_categories=["Cs"])  # every code point but surrogates

keys = st.one_of(
    st.text(unicode_chars, min_size=1, max_size=40),
    st.text(st.sampled_from([*GLOB, "\n", "\r", "\t", " ", "\x00", ":", "{", "}"]), min_size=1, max_size=20),
    st.lists(st.one_of(st.sampled_from([*GLOB, "\n"]), unicode_chars), min_size=1, max_size=30).map("".join),
    # Very long keys: up to 70,000 characters around a random core.
    st.builds(
        lambda head, n, tail: head + "k" * n + tail,
        st.text(unicode_chars, max_size=5),
        st.integers(1_000, 70_000),
        st.text(unicode_chars, max_size=5),
    ),
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(unicode_chars, max_size=200),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(unicode_chars, max_size=10), inner, max_size=5)
    ),
    max_leaves=12,
)
msgspec_json_values = st.recursive(
    st.one_of(json_scalars, st.integers()),  # msgspec's JSON keeps ints of any size
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(unicode_chars, max_size=10), inner, max_size=5)
    ),
    max_leaves=12,
)
msgpack_values = st.recursive(
    st.one_of(json_scalars, st.floats(), st.binary(max_size=200), st.integers(-(2**63), 2**64 - 1)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(unicode_chars, max_size=10), inner, max_size=5)
    ),
    max_leaves=12,
)
# Large enough, often enough, that CompressedCodec really compresses.
compressible_values = st.one_of(json_values, st.text(st.sampled_from("ab c"), min_size=100, max_size=5000))


def _encrypted() -> Codec:
    return EncryptedCodec(MsgspecCodec("msgpack"), [EncryptedCodec.generate_key()])


#: codec id -> (factory, values it supports, a prefix that makes any stored value invalid)
CODECS: dict[str, tuple[Callable[[], Codec], st.SearchStrategy[Any], bytes]] = {
    "json": (JsonCodec, json_values, b"\xff"),
    "msgspec-json": (lambda: MsgspecCodec("json"), msgspec_json_values, b"\xff"),
    "msgpack": (lambda: MsgspecCodec("msgpack"), msgpack_values, b"\xc1"),  # 0xc1: never used in MessagePack
    "compressed-json": (lambda: CompressedCodec(JsonCodec(), min_size=64), compressible_values, b"\x7f"),
    "encrypted-msgpack": (_encrypted, msgpack_values, b"\x02"),  # an unknown format version
}


def same(a: Any, b: Any) -> bool:
    """Equal, with equal types all the way down (``True`` is not ``1``) and NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


# --------------------------------------------------------------------------- fixtures

BACKENDS = ["memory", "multiplexed", "pool"]


@pytest.fixture(params=BACKENDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


async def open_client(kind: str, codec: Codec, server: RedisServer | None) -> Client:
    if kind == "memory":
        return await Client(MemoryBackend(), codec=codec).__aenter__()
    assert server is not None
    # A database of its own on the shared server, emptied first.
    backend = RedisBackend(redis_options(server, auto_pipeline=kind == "multiplexed").replace(db=7))
    await backend.redis.flushdb()
    return await Client(backend, codec=codec).__aenter__()


@pytest.fixture
async def server_for(backend_kind: str, request: pytest.FixtureRequest) -> RedisServer | None:
    if backend_kind == "memory":
        return None
    server: RedisServer = request.getfixturevalue("valkey_server")
    return server


@pytest.fixture(params=list(CODECS))
def codec_id(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
async def client(backend_kind: str, codec_id: str, server_for: RedisServer | None) -> AsyncIterator[Client]:
    client = await open_client(backend_kind, CODECS[codec_id][0](), server_for)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def raw_client(backend_kind: str, server_for: RedisServer | None) -> AsyncIterator[Client]:
    client = await open_client(backend_kind, JsonCodec(), server_for)
    try:
        yield client
    finally:
        await client.close()


# --------------------------------------------------------------------------- properties


@PROPERTY
@given(data=st.data(), key=keys)
async def test_any_key_and_value_round_trip(
    client: Client, codec_id: str, data: st.DataObject, key: str
) -> None:
    values = CODECS[codec_id][1]
    value, other = data.draw(values, "value"), data.draw(values, "other")
    sibling = key + "\n+"
    try:
        await client.set(key, value)
        assert same(await client.get(key), value)
        listed = await client.list(key)
        assert key in listed
        assert all(k.startswith(key) for k in listed)  # glob characters match literally
        await client.batch_set({key: other, sibling: value})
        found = await client.batch_get([key, sibling, key + "\x00missing"])
        assert list(found) == [key, sibling]
        assert same(found[key], other)
        assert same(found[sibling], value)
        assert await client.has_keys([key, sibling])
    finally:
        assert await client.batch_delete([key, sibling]) == 2
    assert await client.get(key, default=None) is None


@PROPERTY
@given(key=keys, value=st.binary(max_size=5000))
async def test_any_key_and_raw_bytes_round_trip(raw_client: Client, key: str, value: bytes) -> None:
    await raw_client.set_raw(key, value)
    try:
        assert await raw_client.get_raw(key) == value
    finally:
        assert await raw_client.delete(key)


@PROPERTY
@given(data=st.data(), key=keys)
async def test_corrupted_bytes_give_decode_error_naming_the_key(
    client: Client, codec_id: str, data: st.DataObject, key: str
) -> None:
    _, values, poison = CODECS[codec_id]
    stored = client.codec.encode(data.draw(values, "value"))
    position = data.draw(st.integers(0, len(stored) - 1), "position")
    mutation = data.draw(st.sampled_from(["poison", "flip", "truncate", "append"]), "mutation")
    if mutation == "poison":
        corrupted = poison + stored
    elif mutation == "flip":
        corrupted = stored[:position] + bytes([stored[position] ^ 0xFF]) + stored[position + 1 :]
    elif mutation == "truncate":
        corrupted = stored[:position]
    else:
        corrupted = stored + data.draw(st.binary(min_size=1, max_size=8), "garbage")
    await client.set_raw(key, corrupted)
    try:
        outcome: BaseException | None = None
        try:
            await client.get(key)
        except DecodeError as exc:
            outcome = exc
        if outcome is None:
            # Some random damage still decodes (a JSON digit changed); a poisoned
            # value, or any damage to an encrypted one, never does.
            assert mutation != "poison", corrupted
            assert codec_id != "encrypted-msgpack", (mutation, corrupted)
        else:
            assert repr(key) in str(outcome)
    finally:
        assert await client.delete(key)


@PROPERTY
@given(
    value=msgpack_values,
    damage=st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
        st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
        st.tuples(st.just("splice"), st.integers(0, 10_000), st.integers(0, 255)),
    ),
)
async def test_tampered_encrypted_value_is_rejected(
    raw_client: Client, value: Any, damage: tuple[str, int, int]
) -> None:
    codec = _encrypted()
    client = Client(raw_client.backend, codec=codec)  # shares the backend, not closed here
    stored = bytearray(codec.encode(value))
    how, where, what = damage
    where %= len(stored)
    if how == "flip":
        stored[where] ^= 1 << what  # any single bit, header, nonce, ciphertext or tag
    elif how == "truncate":
        del stored[where:]
    else:
        stored.insert(where, what)
    await client.set_raw("sealed", bytes(stored))
    try:
        with pytest.raises(DecodeError, match="could not be authenticated") as info:
            await client.get("sealed")
        assert "'sealed'" in str(info.value)
    finally:
        await client.delete("sealed")


# Every lone surrogate except the U+DC80..U+DCFF escapes of non-UTF-8 bytes.
lone_surrogates = st.one_of(st.integers(0xD800, 0xDC7F), st.integers(0xDD00, 0xDFFF)).map(chr)
surrogate_keys = st.builds(
    lambda head, s, tail: head + s + tail,
    st.text(unicode_chars, max_size=5),
    lone_surrogates,
    st.text(unicode_chars, max_size=5),
)


@PROPERTY
@given(bad=surrogate_keys)
async def test_lone_surrogate_keys_are_invalid_everywhere(raw_client: Client, bad: str) -> None:
    client = raw_client
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: client.get(bad),
        lambda: client.set(bad, 1),
        lambda: client.delete(bad),
        lambda: client.has_key(bad),
        lambda: client.batch_get(["good", bad]),
        lambda: client.batch_set({"good": 1, bad: 2}),
        lambda: client.batch_set({"good": 1, bad: 2}, ttl=60),
        lambda: client.batch_delete(["good", bad]),
    ]
    for call in calls:
        with pytest.raises(InvalidKeyError, match="UTF-8"):
            await call()
    with pytest.raises(InvalidKeyError, match="UTF-8"):
        async with client.transaction() as tx:
            tx.set("good", 1)
            tx.set(bad, 2)
    assert not await client.has_key("good")  # nothing of a refused batch was written


@PROPERTY
@given(
    key=st.builds(
        lambda a, b: a + b, st.text(unicode_chars, max_size=5), st.integers(0xDC80, 0xDCFF).map(chr)
    )
)
async def test_surrogate_escapes_of_raw_bytes_round_trip(raw_client: Client, key: str) -> None:
    await raw_client.set(key, 1)
    try:
        assert await raw_client.get(key) == 1
        assert key in await raw_client.list(key)
    finally:
        assert await raw_client.delete(key)
