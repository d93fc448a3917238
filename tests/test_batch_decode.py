"""The batch codec paths (batch_get: ``Codec.decode_many``; batch_set: ``encode_many``) and key checks."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from enum import Enum
from typing import Any, TypeVar

import msgspec
import pytest

from kivigo_async import Client
from kivigo_async.backends.memory import MemoryBackend
from kivigo_async.codecs import CompressedCodec, JsonCodec, MsgspecCodec
from kivigo_async.errors import DecodeError, EncodeError, InvalidKeyError

T = TypeVar("T")


class Point(msgspec.Struct):
    x: int
    y: int


@pytest.mark.parametrize("codec", [JsonCodec(), MsgspecCodec("json"), MsgspecCodec("msgpack")], ids=repr)
def test_decode_many_matches_decode(codec: JsonCodec | MsgspecCodec) -> None:
    values: list[Any] = [{"a": 1}, [1, "two"], "s", 3, None, True, 2**60]
    data = [codec.encode(v) for v in values]
    assert codec.decode_many(data, object) == [codec.decode(d, object) for d in data] == values
    points = [codec.encode(Point(i, -i)) for i in range(3)]
    assert codec.decode_many(points, Point) == [Point(0, 0), Point(1, -1), Point(2, -2)]
    assert codec.decode_many([], Point) == []


@pytest.mark.parametrize("codec", [JsonCodec(), MsgspecCodec("json")], ids=repr)
def test_decode_many_raises_decode_error_without_the_bytes(codec: JsonCodec | MsgspecCodec) -> None:
    data = [codec.encode({"x": 1, "y": 2}), b'{"x": "secret-value", "y": 2}']
    with pytest.raises(DecodeError, match="Point") as info:
        codec.decode_many(data, Point)
    assert "secret-value" not in str(info.value)
    with pytest.raises(DecodeError):
        codec.decode_many([b"{not json"], object)


class CountingCodec(JsonCodec):
    """JsonCodec that counts its batch calls."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    def decode_many(self, data: Sequence[bytes], type: type[T]) -> list[T]:
        self.batches += 1
        return super().decode_many(data, type)


@pytest.fixture
async def counted() -> AsyncIterator[tuple[Client, CountingCodec]]:
    codec = CountingCodec()
    async with Client(MemoryBackend(), codec=codec) as client:
        yield client, codec


async def test_batch_get_decodes_the_batch_in_one_call(counted: tuple[Client, CountingCodec]) -> None:
    client, codec = counted
    await client.batch_set({f"k{i}": {"i": i} for i in range(50)})
    found = await client.batch_get([*(f"k{i}" for i in range(50)), "missing", "k0"])
    assert found == {f"k{i}": {"i": i} for i in range(50)}
    assert list(found) == [f"k{i}" for i in range(50)]  # input order, repeats once
    assert codec.batches == 1


async def test_a_corrupt_value_is_named_by_its_key(counted: tuple[Client, CountingCodec]) -> None:
    client, codec = counted
    await client.batch_set({"a": 1, "c": 3})
    await client.set_raw("b", b"{corrupt")
    with pytest.raises(DecodeError, match="'b'"):
        await client.batch_get(["a", "b", "c"])
    # The batch call failed, so the client decoded one by one to find the key.
    assert codec.batches == 1


async def test_a_failing_decode_many_falls_back_to_decode() -> None:
    class Broken(JsonCodec):
        def decode_many(self, data: Sequence[bytes], type: type[T]) -> list[T]:
            raise RuntimeError("bug in a custom codec")

    async with Client(MemoryBackend(), codec=Broken()) as client:
        await client.batch_set({"a": [1], "b": [2]})
        assert await client.batch_get(["b", "a"], list[int]) == {"b": [2], "a": [1]}


class UpgradingCodec(JsonCodec):
    """Overrides decode only: old integers become {"n": ...}."""

    def decode(self, data: bytes, type: type[T]) -> T:
        value = super().decode(data, type)
        return {"n": value} if isinstance(value, int) else value  # type: ignore[return-value]


class Forwarding:
    """A wrapper that forwards what it does not define to an inner codec."""

    def __init__(self) -> None:
        self._inner = JsonCodec()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def encode(self, value: Any) -> bytes:
        return self._inner.encode(value)

    def decode(self, data: bytes, type: type[T]) -> T:
        value = self._inner.decode(data, type)
        return {"n": value} if isinstance(value, int) else value  # type: ignore[return-value]


@pytest.mark.parametrize("codec", [UpgradingCodec(), Forwarding()], ids=["subclass", "wrapper"])
async def test_batches_go_through_an_overridden_decode(codec: Any) -> None:
    async with Client(MemoryBackend(), codec=codec) as client:
        await client.set_raw("old", b"5")
        await client.set_raw("new", b'{"n": 6}')
        assert await client.get("old") == {"n": 5}
        assert await client.batch_get(["old", "new"]) == {"old": {"n": 5}, "new": {"n": 6}}


async def test_codecs_without_decode_many_still_batch() -> None:
    codec = CompressedCodec(JsonCodec(), min_size=1)
    assert not hasattr(codec, "decode_many")
    async with Client(MemoryBackend(), codec=codec) as client:
        await client.batch_set({"a": "x" * 100, "b": "y"})
        assert await client.batch_get(["a", "b", "nope"]) == {"a": "x" * 100, "b": "y"}


class Color(str, Enum):
    RED = "red"


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        (["a", 1, "b"], "str, not int"),
        (["a", b"b"], "str, not bytes"),
        (["a", ""], "empty"),
        (["a", Color.RED], "str, not Color"),  # subclasses are refused, as for single keys
        (["a", None], "str, not NoneType"),
        ("ab", "single string"),
        (None, "not NoneType"),
        (5, "not int"),
    ],
)
async def test_batch_key_checks(keys: Any, match: str) -> None:
    backend = MemoryBackend()
    async with Client(backend) as client:
        await client.set("a", 1)
        for call in (client.batch_get, client.batch_delete, client.has_keys):
            with pytest.raises(InvalidKeyError, match=match):
                await call(keys)
        assert await client.get("a") == 1  # nothing was deleted by the refused batch


# --------------------------------------------------------------------------- encode_many

CODECS = [JsonCodec(), MsgspecCodec("json"), MsgspecCodec("msgpack")]


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_encode_many_matches_encode(codec: JsonCodec | MsgspecCodec) -> None:
    values: list[Any] = [
        {"a": 1, "b": [1.5, None, True]},
        "s",
        2**60,
        Point(1, 2),
        dt.datetime(2026, 11, 26, 12, 30, tzinfo=dt.timezone.utc),
        uuid.UUID(int=7),
        Decimal("1.10"),
        Color.RED,
    ]
    assert codec.encode_many(values) == [codec.encode(v) for v in values]
    assert codec.encode_many([]) == []


class Secret:
    def __repr__(self) -> str:
        return "Secret('hunter2')"


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_encode_many_raises_encode_errors_error(codec: JsonCodec | MsgspecCodec) -> None:
    # The first value that fails, described as encode() describes it: its type, never its value.
    with pytest.raises(EncodeError, match="Secret") as info:
        codec.encode_many([1, Secret(), 2])
    assert "hunter2" not in str(info.value)
    with pytest.raises(EncodeError) as single:
        codec.encode(Secret())
    assert str(info.value) == str(single.value)


class CountingEncoder(JsonCodec):
    """JsonCodec that counts its batch and single encodes."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = self.singles = 0

    def encode(self, value: Any) -> bytes:
        self.singles += 1
        return super().encode(value)

    def encode_many(self, values: Sequence[Any]) -> list[bytes]:
        self.batches += 1
        return super().encode_many(values)


async def test_batch_set_encodes_the_batch_in_one_call() -> None:
    class CountingBatches(JsonCodec):
        def __init__(self) -> None:
            super().__init__()
            self.sizes: list[int] = []

        def encode_many(self, values: Sequence[Any]) -> list[bytes]:
            self.sizes.append(len(values))
            return super().encode_many(values)

    codec = CountingBatches()
    async with Client(MemoryBackend(), codec=codec) as client:
        await client.batch_set({f"k{i}": {"i": i} for i in range(50)})
        assert codec.sizes == [50]
        assert await client.batch_get([f"k{i}" for i in range(50)]) == {f"k{i}": {"i": i} for i in range(50)}


async def test_an_unencodable_value_is_named_by_its_key_and_nothing_is_written() -> None:
    async with Client(MemoryBackend()) as client:
        with pytest.raises(EncodeError, match=r"'b'.*Secret") as info:
            await client.batch_set({"a": 1, "b": Secret(), "c": 3})
        assert "hunter2" not in str(info.value)
        assert await client.list() == []


async def test_bad_keys_are_refused_before_any_value_is_encoded() -> None:
    codec = CountingEncoder()
    async with Client(MemoryBackend(), codec=codec) as client:
        for mapping in ({"a": 1, "": 2}, {"a": 1, 5: 2}, {"a": 1, Color.RED: 2}):
            with pytest.raises(InvalidKeyError):
                await client.batch_set(mapping)  # type: ignore[arg-type]
        assert (codec.batches, codec.singles) == (0, 0)
        assert await client.list() == []


async def test_a_failing_encode_many_falls_back_to_encode() -> None:
    class Broken(JsonCodec):
        def encode_many(self, values: Sequence[Any]) -> list[bytes]:
            raise RuntimeError("bug in a custom codec")

    async with Client(MemoryBackend(), codec=Broken()) as client:
        await client.batch_set({"a": [1], "b": [2]})
        assert await client.batch_get(["b", "a"], list[int]) == {"b": [2], "a": [1]}


class Versioned(JsonCodec):
    """Overrides encode only: every value is written inside an envelope."""

    def encode(self, value: Any) -> bytes:
        return super().encode({"v": 1, "data": value})


class VersionedMsgpack(MsgspecCodec):
    def encode(self, value: Any) -> bytes:
        return super().encode({"v": 1, "data": value})


@pytest.mark.parametrize("codec", [Versioned(), VersionedMsgpack("msgpack")], ids=["json", "msgpack"])
async def test_batches_go_through_an_overridden_encode(codec: JsonCodec | MsgspecCodec) -> None:
    assert codec.encode_many([1, "x"]) == [codec.encode(1), codec.encode("x")]
    async with Client(MemoryBackend(), codec=codec) as client:
        await client.batch_set({"a": 1, "b": "x"})
        assert await client.batch_get(["a", "b"]) == {"a": {"v": 1, "data": 1}, "b": {"v": 1, "data": "x"}}


class Miscounting(JsonCodec):
    """A third-party codec whose batch methods do not return one result per value."""

    def __init__(self, change: str) -> None:
        super().__init__()
        self.change = change

    def _miscount(self, results: list[Any]) -> Any:
        if self.change == "short":
            return results[:-1]
        if self.change == "long":
            return [*results, results[0]]
        return None

    def encode_many(self, values: Sequence[Any]) -> list[bytes]:
        return self._miscount(super().encode_many(values))  # type: ignore[no-any-return]

    def decode_many(self, data: Sequence[bytes], type: type[T]) -> list[T]:
        return self._miscount(super().decode_many(data, type))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("change", "written", "read"),
    [
        ("short", "2 result(s)", "1 result(s)"),
        ("long", "4 result(s)", "3 result(s)"),
        ("none", "a NoneType", "a NoneType"),
    ],
)
async def test_a_batch_method_that_miscounts_raises_a_codec_error_and_writes_nothing(
    change: str, written: str, read: str
) -> None:
    heard: list[object] = []
    async with Client(MemoryBackend(), codec=Miscounting(change)) as client:
        client.hooks.register(heard.append)
        with pytest.raises(
            EncodeError, match=re.escape(f"Miscounting.encode_many returned {written} for 3 values:")
        ):
            await client.batch_set({"a": 1, "b": 2, "c": 3})
        assert await client.list() == []
        assert heard == []
        await client.batch_set_raw({"a": b"1", "b": b"2"})
        with pytest.raises(
            DecodeError, match=re.escape(f"Miscounting.decode_many returned {read} for 2 values:")
        ):
            await client.batch_get(["a", "b"])
