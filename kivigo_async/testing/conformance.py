"""The backend conformance suite: what every backend must do, through the Client.

Every backend shipped with kivigo-async passes this suite, against real
servers. Third-party backends can run it too: subclass
:class:`BackendConformance` in a test module and provide a ``kv_backend``
fixture that yields a fresh, *empty* backend for each test.

Example:
    ```python
    # tests/test_my_backend.py
    import pytest
    from kivigo_async.testing.conformance import BackendConformance

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        async def kv_backend(self):
            backend = MyBackend(...)
            yield backend
            await backend.close()
    ```

The suite needs ``pytest-asyncio`` (``asyncio_mode = "auto"``) and, for the
encrypted codec cases, ``cryptography``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any, TypedDict

import msgspec
import pytest

from ..backend import AsyncBackend, BatchBackend, TTLBackend, WatchBackend
from ..client import MAX_TTL_MS, Client
from ..codecs import Codec, CompressedCodec, EncryptedCodec, JsonCodec, MsgspecCodec
from ..errors import (
    BackendUnavailableError,
    DecodeError,
    EncodeError,
    HealthCheckError,
    InvalidArgumentError,
    InvalidKeyError,
    KeyNotFoundError,
    KivigoError,
    TransactionConflictError,
)

__all__ = ["BackendConformance", "CODECS"]


class _Session(msgspec.Struct):
    user_id: str
    login_time: dt.datetime
    ip_address: str


@dataclasses.dataclass
class _Point:
    x: int
    y: float
    label: str = ""


class _Config(TypedDict):
    host: str
    port: int


def _encrypted() -> Codec:
    return EncryptedCodec(MsgspecCodec("msgpack"), [bytes(range(32))])


#: The codecs every backend round-trips values through, by name.
CODECS: dict[str, Callable[[], Codec]] = {
    "json": JsonCodec,
    "msgspec-json": lambda: MsgspecCodec("json"),
    "msgspec-msgpack": lambda: MsgspecCodec("msgpack"),
    "zlib-json": lambda: CompressedCodec(JsonCodec(), "zlib", min_size=16),
    "encrypted-msgpack": _encrypted,
}

_PLAIN_VALUES: list[Any] = [
    "hello",
    "unicode: héllo wörld ✓ 日本語 🎉",
    "",
    0,
    -(2**53),
    3.25,
    True,
    False,
    None,
    [1, "two", 3.0, None, [4]],
    {"name": "Alice", "roles": ["admin"], "nested": {"depth": 2, "ok": True}},
    {"": "empty key in a document", "k" * 300: "long key"},
]

_NOW = dt.datetime(2025, 10, 1, 12, 30, 15, 123000, tzinfo=dt.timezone.utc)
_TYPED_VALUES: list[tuple[Any, Any]] = [
    (_Session("user123", _NOW, "192.168.1.100"), _Session),
    (_Point(1, 2.5, "p"), _Point),
    (_Config(host="localhost", port=5432), _Config),
    (_NOW, dt.datetime),
    (uuid.UUID("12345678-1234-5678-1234-567812345678"), uuid.UUID),
    (Decimal("12.3400"), Decimal),
    ([1, 2, 3], list[int]),
    ({"a": 1.5}, dict[str, float]),
]

_WEIRD_KEYS = [
    "ключ:ü:日本:🎉",
    "glob*star",
    "question?mark",
    "[brackets]",
    "back\\slash",
    "with space",
    "new\nline",
    "tab\tand:colon",
    "^caret",
    "x" * 1024,
]


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds (a generous bound)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"still false after {timeout} s"
        await asyncio.sleep(0.02)


async def _gone(client: Client, key: str) -> bool:
    return not await client.has_key(key)


class BackendConformance:
    """The conformance tests. Subclass it and provide a ``kv_backend`` fixture."""

    @pytest.fixture
    async def client(self, kv_backend: AsyncBackend) -> AsyncIterator[Client]:
        client = Client(kv_backend)
        yield client
        await client.hooks.aclose()

    @pytest.fixture(params=sorted(CODECS))
    async def codec_client(self, request: pytest.FixtureRequest, kv_backend: AsyncBackend) -> Client:
        return Client(kv_backend, codec=CODECS[request.param]())

    # -- round trips -----------------------------------------------------

    @pytest.mark.parametrize("value", _PLAIN_VALUES, ids=lambda v: type(v).__name__)
    async def test_round_trip(self, codec_client: Client, value: Any) -> None:
        await codec_client.set("rt", value)
        got = await codec_client.get("rt")
        assert got == value
        assert type(got) is type(value)  # True == 1 == 1.0: equality alone cannot tell

    @pytest.mark.parametrize(("value", "type_"), _TYPED_VALUES, ids=lambda v: getattr(v, "__name__", ""))
    async def test_typed_round_trip(self, codec_client: Client, value: Any, type_: Any) -> None:
        await codec_client.set("typed", value)
        got = await codec_client.get("typed", type_)
        assert got == value
        assert type(got) is type(value)

    async def test_pydantic_model_round_trip(self, codec_client: Client) -> None:
        pydantic = pytest.importorskip("pydantic")

        class User(pydantic.BaseModel):  # type: ignore[name-defined,misc]
            name: str
            joined: dt.datetime

        user = User(name="Bob", joined=_NOW)
        await codec_client.set("user:bob", user)
        got = await codec_client.get("user:bob", User)
        assert isinstance(got, User)
        assert got == user

    async def test_wrong_type_decode_names_key(self, client: Client) -> None:
        await client.set("not-an-int", "abc")
        with pytest.raises(DecodeError, match="not-an-int"):
            await client.get("not-an-int", int)

    async def test_corrupt_bytes_decode_error(self, client: Client) -> None:
        await client.set_raw("corrupt", b"\xff\x00{not json")
        with pytest.raises(DecodeError, match="corrupt"):
            await client.get("corrupt")

    async def test_raw_round_trip(self, client: Client) -> None:
        payload = bytes(range(256)) * 4
        await client.set_raw("raw", payload)
        got = await client.get_raw("raw")
        assert got == payload
        assert type(got) is bytes  # a memoryview or bytearray would compare equal too
        await client.set_raw("raw-view", memoryview(b"view"))
        assert await client.get_raw("raw-view") == b"view"
        with pytest.raises(KeyNotFoundError):
            await client.get_raw("raw-missing")
        with pytest.raises(InvalidArgumentError):
            await client.set_raw("raw-bad", "text")  # type: ignore[arg-type]
        assert not await client.has_key("raw-bad")

    async def test_ten_megabyte_value(self, client: Client) -> None:
        big = os.urandom(5 * 1024 * 1024).hex()  # 10 MiB of text
        await client.set("big", big)
        assert await client.get("big", str) == big
        await client.set_raw("big-raw", big.encode())
        assert await client.get_raw("big-raw") == big.encode()  # every byte, not just the length

    async def test_overwrite_replaces_value_and_ttl(self, client: Client) -> None:
        await client.set("ow", 1, ttl=60)
        await client.set("ow", 2)
        assert await client.get("ow") == 2
        assert await client.ttl("ow") is None

    # -- missing keys and bad input --------------------------------------

    async def test_missing_key_raises(self, client: Client) -> None:
        with pytest.raises(KeyNotFoundError) as info:
            await client.get("nope")
        assert isinstance(info.value, KeyError)
        assert info.value.key == "nope"

    async def test_missing_key_default(self, client: Client) -> None:
        assert await client.get("nope", default=None) is None
        assert await client.get("nope", int, default=7) == 7
        sentinel = object()
        assert await client.get("nope", default=sentinel) is sentinel

    @pytest.mark.parametrize("bad", ["", 1, b"bytes", None, ("t",)], ids=repr)
    async def test_invalid_keys_rejected(self, client: Client, bad: Any) -> None:
        with pytest.raises(InvalidKeyError):
            await client.set(bad, 1)
        with pytest.raises(InvalidKeyError):
            await client.get(bad)
        with pytest.raises(InvalidKeyError):
            await client.delete(bad)
        with pytest.raises(InvalidKeyError):
            await client.has_key(bad)
        with pytest.raises(InvalidKeyError):
            await client.set_raw(bad, b"x")
        with pytest.raises(InvalidKeyError):
            await client.batch_get(["ok", bad])
        with pytest.raises(InvalidKeyError):
            await client.batch_delete(["ok", bad])
        assert await client.list() == []

    @pytest.mark.parametrize(
        "ttl",
        [0, -1, float("nan"), float("inf"), 0.0001, "10", True, 1e300, 1e308, 10**400, 2**62],
    )
    async def test_invalid_ttl_rejected(self, client: Client, ttl: Any) -> None:
        with pytest.raises(InvalidArgumentError):
            await client.set("t", 1, ttl=ttl)
        with pytest.raises(InvalidArgumentError):
            await client.batch_set({"t": 1}, ttl=ttl)
        assert not await client.has_key("t")
        await client.set("t", 1)
        with pytest.raises(InvalidArgumentError):
            await client.expire("t", ttl)
        assert await client.ttl("t") is None

    async def test_longest_ttl_accepted(self, client: Client) -> None:
        longest = MAX_TTL_MS / 1000
        await client.set("t", 1, ttl=longest)
        await client.batch_set({"u": 2}, ttl=dt.timedelta.max)
        assert await client.batch_get(["t", "u"]) == {"t": 1, "u": 2}
        remaining = await client.ttl("t")
        assert remaining is not None
        assert remaining > longest - 60

    async def test_unencodable_value_writes_nothing(self, client: Client) -> None:
        with pytest.raises(EncodeError, match="bad"):
            await client.set("bad", object())
        assert not await client.has_key("bad")

    # -- keys and listing ------------------------------------------------

    @pytest.mark.parametrize("key", _WEIRD_KEYS, ids=lambda k: repr(k[:20]))
    async def test_unusual_keys(self, client: Client, key: str) -> None:
        await client.set(key, {"k": key})
        await client.set(key + "-sibling", 1)
        assert await client.get(key) == {"k": key}
        assert await client.has_key(key)
        assert await client.list(key) == sorted([key, key + "-sibling"])
        assert await client.delete(key)
        assert not await client.has_key(key)

    async def test_escaped_utf8_bytes_name_the_same_key_as_their_text(self, client: Client) -> None:
        # Keys are bytes on Redis. U+DC80..U+DCFF stand for bytes of a key that is not
        # UTF-8; escaped bytes that do form UTF-8 (those of "é") are the key "é" itself.
        escaped, text = "esc:\udcc3\udca9", "esc:é"
        await client.set(escaped, 1)
        assert await client.get(text) == 1
        await client.set(text, 2)
        assert await client.get(escaped) == 2
        assert await client.list("esc:") == [text]
        assert await client.delete(escaped)
        assert await client.list("esc:") == []

    async def test_a_prefix_ending_inside_a_utf8_sequence_matches_by_bytes(self, client: Client) -> None:
        # "\udcc3" is the first byte of "é" (C3 A9): on the server, a prefix of its key.
        await client.batch_set({"cut:é": 1, "cut:e": 2})
        assert await client.list("cut:\udcc3") == ["cut:é"]
        assert [key async for key in client.iter_keys("cut:\udcc3")] == ["cut:é"]

    async def test_list_sorts_by_the_stored_bytes(self, client: Client) -> None:
        # Keys that are not UTF-8 (bytes 0x80 and 0xFF, listed as U+DC80 and U+DCFF)
        # sort by those bytes, as in KiviGo: 0xFF after U+E000 (bytes EE 80 80) and
        # U+1F600 (F0 9F 98 80), 0x80 before them. Code-point order puts both first.
        keys = ["raw:\U0001f600", "raw:\udcff", "raw:\ue000", "raw:z", "raw:\udc80"]
        await client.batch_set(dict.fromkeys(keys, 1))
        in_byte_order = ["raw:z", "raw:\udc80", "raw:\ue000", "raw:\U0001f600", "raw:\udcff"]
        assert await client.list("raw:") == in_byte_order

    async def test_list_prefix_is_literal(self, client: Client) -> None:
        await client.batch_set({"user": 0, "user1": 1, "user:1": 2, "users:x": 3, "other": 4})
        assert await client.list("user") == ["user", "user1", "user:1", "users:x"]
        assert await client.list("user:") == ["user:1"]
        assert await client.list("nomatch") == []
        await client.batch_set({"a*b": 1, "a*c": 2, "axb": 3, "a?": 4, "a[1]": 5, "a\\": 6})
        assert await client.list("a*") == ["a*b", "a*c"]
        assert await client.list("a?") == ["a?"]
        assert await client.list("a[") == ["a[1]"]
        assert await client.list("a\\") == ["a\\"]
        # Escaping the glob characters one by one, not only the first of them.
        await client.batch_set({"p\\*q": 1, "p\\xq": 2, "p[1]": 3, "p[2]": 4, "p]": 5, "p[^x]-": 6})
        assert await client.list("p\\*") == ["p\\*q"]
        assert await client.list("p[1]") == ["p[1]"]
        assert await client.list("p]") == ["p]"]
        assert await client.list("p[^x]") == ["p[^x]-"]

    async def test_list_empty_prefix_lists_all_sorted(self, client: Client) -> None:
        keys = ["b", "a", "c:1", "A"]
        await client.batch_set(dict.fromkeys(keys, 1))
        assert await client.list("") == sorted(keys)
        assert await client.list() == sorted(keys)

    async def test_list_ten_thousand_keys(self, client: Client) -> None:
        wanted = {f"bulk:{i:05d}": i for i in range(10_000)}
        for start in range(0, 10_000, 1000):
            await client.batch_set(dict(list(wanted.items())[start : start + 1000]))
        await client.set("bulky-not-in-prefix", 1)
        assert await client.list("bulk:") == sorted(wanted)
        streamed = {key async for key in client.iter_keys("bulk:")}
        assert streamed == set(wanted)

    async def test_iter_keys_while_the_keyspace_changes(self, client: Client) -> None:
        # Keys present for the whole listing are all yielded, while others are deleted
        # and thousands more written (growing the keyspace past a resize on Redis).
        # In byte order, deleted keys come before the kept ones and new keys after them.
        kept = [f"churn:m:{i:04d}" for i in range(2000)]
        doomed = [f"churn:a:{i:04d}" for i in range(2000)]
        await client.batch_set_raw(dict.fromkeys(kept + doomed, b"1"))
        added: list[str] = []
        seen: set[str] = set()
        async for key in client.iter_keys("churn:"):
            seen.add(key)
            if len(seen) % 100 == 0 and len(added) < 5000:
                await client.batch_delete([doomed.pop() for _ in range(20)])
                batch = [f"churn:z:{len(added) + i:04d}" for i in range(50)]
                await client.batch_set_raw(dict.fromkeys(batch, b"1"))
                added += batch
        assert added, "the listing ended before the keyspace changed"
        assert set(kept) <= seen
        assert seen <= set(kept) | {f"churn:a:{i:04d}" for i in range(2000)} | set(added)

    async def test_invalid_prefix(self, client: Client) -> None:
        with pytest.raises(InvalidArgumentError):
            client.iter_keys(None)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            await client.list(b"x")  # type: ignore[arg-type]

    async def test_match_keys(self, client: Client) -> None:
        await client.batch_set({"m:1": 1, "m:2": 2})
        seen: list[list[str]] = []

        def two(keys: list[str]) -> bool:
            seen.append(keys)
            return len(keys) == 2

        async def has_three(keys: list[str]) -> bool:
            return "m:3" in keys

        assert await client.match_keys("m:", two)
        assert seen == [["m:1", "m:2"]]
        assert not await client.match_keys("m:", has_three)

    # -- single-key writes -----------------------------------------------

    async def test_delete_reports_existence(self, client: Client) -> None:
        await client.set("d", 1)
        assert await client.delete("d") is True
        assert await client.delete("d") is False

    async def test_has_key_and_has_keys(self, client: Client) -> None:
        await client.batch_set({"h1": 1, "h2": None})
        assert await client.has_key("h1")
        assert await client.has_key("h2")  # a stored null is a value, not a missing key
        assert not await client.has_key("h3")
        assert await client.has_keys(["h1", "h2", "h1"])
        assert not await client.has_keys(["h1", "h3"])
        assert await client.has_keys([])
        with pytest.raises(InvalidKeyError):
            await client.has_keys("h1")

    # -- batches ---------------------------------------------------------

    async def test_batch_round_trip_in_input_order(self, client: Client) -> None:
        data = {f"b:{i}": {"i": i} for i in range(50)}
        await client.batch_set(data)
        keys = list(reversed(data))
        got = await client.batch_get(keys)
        assert list(got) == keys
        assert got == data

    async def test_batch_get_omits_missing(self, client: Client) -> None:
        await client.batch_set({"a": 1, "b": 2})
        assert await client.batch_get(["a", "zz", "b", "a"], int) == {"a": 1, "b": 2}
        assert await client.batch_get(["zz"]) == {}
        assert await client.batch_get([]) == {}
        with pytest.raises(InvalidArgumentError, match="default=None"):
            await client.batch_get(["a"], None)  # type: ignore[call-overload]

    async def test_batch_set_one_unencodable_writes_nothing(self, client: Client) -> None:
        with pytest.raises(EncodeError, match="k2"):
            await client.batch_set({"k1": 1, "k2": object(), "k3": 3})
        assert await client.list() == []

    async def test_batch_set_one_bad_key_writes_nothing(self, client: Client) -> None:
        with pytest.raises(InvalidKeyError):
            await client.batch_set({"k1": 1, "": 2})
        assert await client.list() == []

    async def test_batch_raw_round_trip(self, client: Client) -> None:
        blob = bytes(range(256))
        await client.batch_set_raw(
            {"r:1": blob, "r:2": bytearray(b"\xff\x00"), "r:3": memoryview(b""), "r:4": b"{"}
        )
        got = await client.batch_get_raw(["r:4", "r:zz", "r:1", "r:3", "r:2", "r:1"])
        assert got == {"r:4": b"{", "r:1": blob, "r:3": b"", "r:2": b"\xff\x00"}
        assert list(got) == ["r:4", "r:1", "r:3", "r:2"]
        assert all(type(v) is bytes for v in got.values())
        assert await client.get_raw("r:1") == blob
        await client.batch_set({"r:j": {"a": 1}})
        assert await client.batch_get_raw(["r:j"]) == {"r:j": b'{"a":1}'}
        assert await client.batch_get_raw(["r:zz"]) == {}
        assert await client.batch_get_raw([]) == {}
        await client.batch_set_raw({})

    async def test_batch_set_raw_bad_input_writes_nothing(self, client: Client) -> None:
        with pytest.raises(InvalidArgumentError, match=r"str \(key 'r2'\)"):
            await client.batch_set_raw({"r1": b"1", "r2": "text", "r3": b"3"})  # type: ignore[dict-item]
        with pytest.raises(InvalidKeyError):
            await client.batch_set_raw({"r1": b"1", "": b"2"})
        with pytest.raises(InvalidArgumentError, match="mapping"):
            await client.batch_set_raw([("r1", b"1")])  # type: ignore[arg-type]
        with pytest.raises(InvalidKeyError):
            await client.batch_get_raw("r1")
        with pytest.raises(InvalidKeyError):
            await client.batch_get_raw(["r1", b"r2"])  # type: ignore[list-item]
        assert await client.list() == []

    async def test_batch_delete_with_an_unencodable_key_deletes_nothing(self, client: Client) -> None:
        await client.batch_set({"bd1": 1, "bd2": 2})
        with pytest.raises(InvalidKeyError):
            await client.batch_delete(["bd1", "\ud800", "bd2"])  # a lone surrogate is not UTF-8
        assert await client.batch_get(["bd1", "bd2"]) == {"bd1": 1, "bd2": 2}

    async def test_batch_delete_counts(self, client: Client) -> None:
        await client.batch_set({"x1": 1, "x2": 2, "x3": 3})
        assert await client.batch_delete(["x1", "x2", "missing", "x1"]) == 2
        assert await client.list("x") == ["x3"]
        assert await client.batch_delete([]) == 0

    async def test_empty_batches_on_the_backend(self, kv_backend: AsyncBackend) -> None:
        # The client never sends empty batches; a backend called directly answers
        # them without error (Redis itself refuses an MGET of no keys).
        if not isinstance(kv_backend, BatchBackend):
            pytest.skip("no batch operations")
        await kv_backend.set("present", b"1")
        assert await kv_backend.batch_get([]) == []
        assert await kv_backend.batch_delete([]) == 0
        assert await kv_backend.exists([]) == 0
        await kv_backend.batch_set([])
        await kv_backend.batch_set([], 1000)
        assert await kv_backend.batch_get(["present"]) == [b"1"]

    async def test_repeated_keys_in_batches_on_the_backend(self, kv_backend: AsyncBackend) -> None:
        # The client removes repeats where it can; a backend called directly meets them.
        if not isinstance(kv_backend, BatchBackend):
            pytest.skip("no batch operations")
        await kv_backend.batch_set([("{r}a", b"1"), ("{r}a", b"2")])
        await kv_backend.batch_set([("{r}t", b"1"), ("{r}t", b"2")], 60_000)
        assert await kv_backend.batch_get(["{r}a", "{r}t", "{r}a", "{r}zz"]) == [b"2", b"2", b"2", None]
        assert await kv_backend.exists(["{r}a", "{r}a", "{r}zz"]) == 2  # a repeat counts again
        assert await kv_backend.batch_delete(["{r}a", "{r}a", "{r}zz"]) == 1

    async def test_a_batch_with_a_key_the_server_cannot_hold_writes_nothing(self, client: Client) -> None:
        # A lone surrogate passes the client's checks (a non-empty str) and only fails
        # when the key is encoded: no key of the batch may have been written before.
        # One hash tag: on a cluster, the batch is not refused for spanning slots.
        for ttl in (None, 60):
            with pytest.raises(InvalidKeyError):
                await client.batch_set({"{sur}1": 1, "{sur}\ud800": 2}, ttl=ttl)
            with pytest.raises(InvalidKeyError):
                await client.batch_set_raw({"{sur}2": b"1", "{sur}\ud800": b"2"}, ttl=ttl)
        with pytest.raises(InvalidKeyError):
            async with client.transaction() as tx:
                tx.set("{sur}3", 1)
                tx.set("{sur}\ud800", 2)
        assert await client.list() == []

    async def test_batch_writes_replace_ttls(self, client: Client) -> None:
        # As a single set: a batch without a TTL leaves its keys without one.
        await client.batch_set({"bt:a": 1, "bt:b": 2}, ttl=60)
        await client.batch_set({"bt:a": 3})
        await client.batch_set_raw({"bt:b": b"4"})
        assert await client.ttl("bt:a") is None
        assert await client.ttl("bt:b") is None
        await client.batch_set({"bt:a": 5}, ttl=30)
        remaining = await client.ttl("bt:a")
        assert remaining is not None
        assert 0 < remaining <= 30

    async def test_batch_set_with_ttl(self, client: Client) -> None:
        # Sub-second TTLs, with room for a slow machine between the calls.
        start = time.monotonic()
        await client.batch_set({"bt1": 1, "bt2": 2}, ttl=0.4)
        for key in ("bt1", "bt2"):
            try:
                remaining = await client.ttl(key)
            except KeyNotFoundError:
                # Expired, which is right only if this machine stalled past the TTL.
                assert time.monotonic() - start >= 0.4
                continue
            assert remaining is not None
            assert 0 < remaining <= 0.4
        await asyncio.sleep(0.7)
        assert await client.batch_get(["bt1", "bt2"]) == {}

    # -- TTL ---------------------------------------------------------------

    async def test_ttl_expires_at_millisecond_scale(self, client: Client) -> None:
        start = time.monotonic()
        await client.set("short", "v", ttl=0.25)
        await client.set("long", "v", ttl=dt.timedelta(seconds=30))
        # Still there, unless this machine stalled past the TTL (then expired is right).
        read = await client.get("short", default=None)
        assert read == "v" or (read is None and time.monotonic() - start >= 0.25)
        await asyncio.sleep(0.5)
        assert await client.get("short", default=None) is None
        assert not await client.has_key("short")
        assert await client.list("short") == []
        assert await client.get("long") == "v"

    async def test_expired_keys_are_gone_from_every_read(self, client: Client) -> None:
        # Each read path meets a key nothing has read since it expired: a backend that
        # drops expired keys only on a plain get must still hide them everywhere.
        expiring = {f"gone:{path}": path for path in ("list", "iter", "batch", "has_keys", "ttl")}
        await client.batch_set(expiring, ttl=0.2)
        await client.set("gone:kept", 1)
        await asyncio.sleep(0.5)
        assert await client.list("gone:list") == []
        assert [k async for k in client.iter_keys("gone:iter")] == []
        assert await client.batch_get(["gone:batch", "gone:kept"]) == {"gone:kept": 1}
        assert not await client.has_keys(["gone:has_keys", "gone:kept"])
        with pytest.raises(KeyNotFoundError):
            await client.ttl("gone:ttl")
        assert await client.list("gone:") == ["gone:kept"]

    async def test_expired_keys_do_not_count_as_existing_for_writes(self, client: Client) -> None:
        # Each write meets a key nothing has read since it expired.
        paths = ("delete", "batch_delete", "expire", "persist", "tx")
        await client.batch_set({f"dead:{path}": 1 for path in paths}, ttl=0.2)
        await client.set("dead:kept", 1)
        await _until(lambda: _gone(client, "dead:tx"))
        assert await client.delete("dead:delete") is False
        assert await client.batch_delete(["dead:batch_delete", "dead:kept"]) == 1
        assert await client.expire("dead:expire", 60) is False
        assert await client.persist("dead:persist") is False
        assert await client.list("dead:") == []

    async def test_ttl_reads_remaining_time(self, client: Client) -> None:
        # A TTL no stall outlasts; its half second tells milliseconds from whole seconds.
        start = time.monotonic()
        await client.set("t", 1, ttl=30.5)
        remaining = await client.ttl("t")
        elapsed = time.monotonic() - start
        assert remaining is not None
        assert 30.5 - elapsed - 0.01 <= remaining <= 30.5
        await asyncio.sleep(0.3)
        later = await client.ttl("t")
        assert later is not None
        assert later <= remaining - 0.25  # the time left, not the TTL it was set with
        await client.set("forever", 1)
        assert await client.ttl("forever") is None
        with pytest.raises(KeyNotFoundError):
            await client.ttl("missing")

    async def test_expire_and_persist(self, client: Client) -> None:
        await client.set("e", 1)
        assert await client.expire("e", 30)
        remaining = await client.ttl("e")
        assert remaining is not None
        assert 29 < remaining <= 30
        assert await client.persist("e")
        assert not await client.persist("e")
        assert await client.ttl("e") is None  # the expiry is gone, not just later
        assert await client.get("e") == 1
        assert not await client.expire("missing", 10)
        assert not await client.persist("missing")
        assert await client.expire("e", dt.timedelta(milliseconds=250))
        await asyncio.sleep(0.5)
        assert not await client.has_key("e")
        with pytest.raises(InvalidArgumentError):
            await client.expire("e", 0)

    # -- lifecycle ---------------------------------------------------------

    async def test_close_is_idempotent_and_final(self, kv_backend: AsyncBackend) -> None:
        client = Client(kv_backend)
        await client.set("before-close", 1)
        await kv_backend.close()
        await kv_backend.close()  # safe to call twice
        for call in (
            lambda: kv_backend.get("before-close"),
            lambda: kv_backend.set("after-close", b"1"),
            lambda: kv_backend.delete("before-close"),
        ):
            with pytest.raises(BackendUnavailableError):
                await call()

    async def test_every_call_fails_once_closed(self, kv_backend: AsyncBackend) -> None:
        client = Client(kv_backend)
        await client.set("k", 1, ttl=60)
        await kv_backend.close()
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: client.get("k"),
            lambda: client.set("k", 2),
            lambda: client.delete("k"),
            lambda: client.has_key("k"),
            lambda: client.list(),
            lambda: client.batch_get(["k", "j"]),
            lambda: client.batch_set({"k": 2, "j": 3}),
            lambda: client.batch_set({"k": 2, "j": 3}, ttl=60),
            lambda: client.batch_delete(["k", "j"]),
            lambda: client.has_keys(["k", "j"]),
        ]
        if isinstance(kv_backend, TTLBackend):
            calls += [lambda: client.ttl("k"), lambda: client.expire("k", 5), lambda: client.persist("k")]
        for call in calls:
            with pytest.raises(BackendUnavailableError):
                await call()
        with pytest.raises(HealthCheckError) as unhealthy:
            await client.health()
        (error,) = unhealthy.value.errors
        assert isinstance(error, BackendUnavailableError)
        with pytest.raises(BackendUnavailableError):
            async with client.transaction() as tx:  # refused when it opens or when it commits
                tx.set("k", 2)
        if isinstance(kv_backend, WatchBackend):
            with pytest.raises(BackendUnavailableError):
                await kv_backend.watch("k")

    # -- transactions ------------------------------------------------------

    async def test_transaction_applies_all_writes(self, client: Client) -> None:
        await client.set("gone", 1)
        async with client.transaction() as tx:
            tx.set("a", 1)
            tx.set("b", {"x": 2}, ttl=60)
            tx.delete("gone")
            assert await tx.get("a", default=None) is None  # queued, not applied yet
        assert await client.batch_get(["a", "b", "gone"]) == {"a": 1, "b": {"x": 2}}
        assert (await client.ttl("b") or 0) > 59

    async def test_transaction_error_writes_nothing(self, client: Client) -> None:
        with pytest.raises(RuntimeError):
            async with client.transaction() as tx:
                tx.set("a", 1)
                raise RuntimeError("abort")
        with pytest.raises(EncodeError):
            async with client.transaction() as tx:
                tx.set("b", 1)
                tx.set("c", object())
        assert await client.list() == []

    async def test_transaction_conflict_detected(self, client: Client) -> None:
        await client.set("stock", 10)
        with pytest.raises(TransactionConflictError):
            async with client.transaction(watch=["stock"]) as tx:
                stock = await tx.get("stock", int)
                await client.set("stock", 3)  # a concurrent writer
                tx.set("stock", stock - 1)
                tx.set("order", 1)
        assert await client.get("stock") == 3
        assert not await client.has_key("order")

    async def test_transaction_conflict_on_delete_and_recreate(self, client: Client) -> None:
        with pytest.raises(TransactionConflictError):
            async with client.transaction(watch=["w"]) as tx:
                await client.set("w", 1)
                await client.delete("w")
                tx.set("w", 2)
        assert not await client.has_key("w")

    async def test_transaction_conflict_on_a_ttl_change(self, client: Client) -> None:
        # Changing only a watched key's TTL changes the key, as on Redis.
        await client.set("{w}ttl", 1)
        changes: list[Callable[[], Awaitable[bool]]] = [
            lambda: client.expire("{w}ttl", 60),
            lambda: client.persist("{w}ttl"),
        ]
        for change in changes:
            with pytest.raises(TransactionConflictError):
                async with client.transaction(watch=["{w}ttl"]) as tx:
                    assert await change()
                    tx.set("{w}out", 1)
        assert not await client.has_key("{w}out")

    async def test_transaction_conflict_when_a_watched_key_expires(self, client: Client) -> None:
        start = time.monotonic()
        await client.set("{x}w", 1, ttl=0.5)
        async with contextlib.AsyncExitStack() as stack:
            tx = await stack.enter_async_context(client.transaction(watch=["{x}w"]))
            if time.monotonic() - start >= 0.5:
                pytest.skip("this machine stalled past the TTL before the watch began")
            await _until(lambda: _gone(client, "{x}w"))
            tx.set("{x}out", 1)
            with pytest.raises(TransactionConflictError):
                await stack.aclose()
        assert not await client.has_key("{x}out")

    async def test_transaction_refuses_use_after_its_block(self, client: Client) -> None:
        # One hash tag: a cluster transaction stays in one slot.
        await client.set("{tx}k", 1)
        async with client.transaction(watch=["{tx}k"]) as tx:
            tx.set("{tx}a", 1)
        with pytest.raises(KivigoError, match="ended"):
            tx.set("{tx}b", 2)
        with pytest.raises(KivigoError, match="ended"):
            tx.delete("{tx}a")
        with pytest.raises(KivigoError, match="ended"):
            await tx.get("{tx}k")
        with pytest.raises(KivigoError):
            async with tx:
                pass
        assert await client.batch_get(["{tx}a", "{tx}b"]) == {"{tx}a": 1}

    async def test_transaction_without_conflict_commits(self, client: Client) -> None:
        await client.set("stock", 10)
        async with client.transaction(watch=["stock"]) as tx:
            tx.set("stock", await tx.get("stock", int) - 1)
        assert await client.get("stock") == 9

    async def test_optimistic_increments_from_100_tasks(self, client: Client) -> None:
        await client.set("counter", 0)

        async def increment() -> None:
            while True:
                try:
                    async with client.transaction(watch=["counter"]) as tx:
                        tx.set("counter", await tx.get("counter", int) + 1)
                    return
                except TransactionConflictError:
                    await asyncio.sleep(0)

        await asyncio.wait_for(asyncio.gather(*(increment() for _ in range(100))), 60)
        assert await client.get("counter") == 100

    # -- concurrency -------------------------------------------------------

    async def test_100_concurrent_tasks_on_the_same_keys(self, client: Client) -> None:
        keys = [f"shared:{i}" for i in range(5)]

        async def worker(n: int) -> None:
            for round_ in range(20):
                key = keys[(n + round_) % len(keys)]
                await client.set(key, {"writer": n, "round": round_})
                value = await client.get(key)
                assert set(value) == {"writer", "round"}  # a whole value, never a torn one
                await client.batch_get(keys)

        await asyncio.wait_for(asyncio.gather(*(worker(n) for n in range(100))), 120)
        final = await client.batch_get(keys)
        assert set(final) == set(keys)
        for value in final.values():
            assert 0 <= value["writer"] < 100

    async def test_concurrent_tasks_read_their_own_keys(self, client: Client) -> None:
        async def worker(n: int) -> None:
            for i in range(10):
                await client.set(f"own:{n}", [n, i])
                assert await client.get(f"own:{n}") == [n, i]

        await asyncio.wait_for(asyncio.gather(*(worker(n) for n in range(100))), 120)

    async def test_cancelled_calls_leave_every_other_reply_in_place(self, client: Client) -> None:
        # Calls cancelled at every stage (before sending, awaiting the reply...): each
        # call that finishes gets its own key's value, and the backend stays usable.
        values = {f"cx:{i}": i for i in range(40)}
        await client.batch_set(values)
        for yields in range(6):
            tasks = [asyncio.create_task(client.get(key)) for key in values]
            for _ in range(yields):
                await asyncio.sleep(0)
            for task in tasks[::3]:
                task.cancel()
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
            for value, result in zip(values.values(), results, strict=True):
                assert isinstance(result, asyncio.CancelledError) or result == value
        assert [await client.get(key) for key in values] == list(values.values())
        assert await client.batch_get(list(values)) == values

    # -- health and hooks --------------------------------------------------

    async def test_health(self, client: Client) -> None:
        # A healthy backend answers within a generous bound, and stays usable.
        await asyncio.wait_for(client.health(), 30)  # raises when unhealthy
        await client.set("health:after", 1)
        assert await client.get("health:after") == 1

    async def test_hooks_fire_after_writes(self, client: Client) -> None:
        events: list[tuple[str, str]] = []
        handle = client.hooks.register(lambda e: events.append((e.type.value, e.key)))
        await client.set("h", 1)
        await client.set_raw("hr", b"1")
        await client.batch_set({"h1": 1, "h2": 2})
        await client.batch_set_raw({"hb": b"1"})
        await client.delete("h")
        await client.batch_delete(["h1"])
        handle.remove()
        await client.set("after", 1)
        assert events == [
            ("set", "h"),
            ("set_raw", "hr"),
            ("batch_set", "h1"),
            ("batch_set", "h2"),
            ("batch_set_raw", "hb"),
            ("delete", "h"),
            ("batch_delete", "h1"),
        ]
