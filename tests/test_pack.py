"""Command packing: long key lists joined as text must be byte-for-byte what hiredis sends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import hiredis
import pytest
from conftest import redis_options
from hypothesis import given, settings
from hypothesis import strategies as st

from kivigo_async import Client, InvalidKeyError
from kivigo_async.backends.redis import RedisBackend
from kivigo_async.backends.redis._mux import _TEXT_PACK_FROM, Arg, _pack_text, pack
from kivigo_async.testing.servers import RedisServer


def _reference(args: Sequence[Arg]) -> bytes:
    return hiredis.pack_command(tuple(args))  # type: ignore[arg-type,no-any-return]


class _PosingAsStr(type):
    """A metaclass whose classes compare equal to str (and hash like it)."""

    def __eq__(cls, other: object) -> bool:
        return other is str or type.__eq__(cls, other)

    def __hash__(cls) -> int:
        return hash(str)


class _LyingLength(str):
    """A str subclass announcing a length its data does not have."""

    def __len__(self) -> int:
        return 3


class _LyingLengthPosingAsStr(str, metaclass=_PosingAsStr):
    def __len__(self) -> int:
        return 1


class _NotStrPosingAsStr(metaclass=_PosingAsStr):
    pass


def test_long_ascii_key_lists_are_joined_as_text() -> None:
    args = ["MGET", *(f"user:{i}" for i in range(100)), "", "x" * 511]
    packed = _pack_text(args)
    assert packed is not None
    assert packed == _reference(args)
    assert packed.startswith(b"*103\r\n$4\r\nMGET\r\n$6\r\nuser:0\r\n")
    assert packed.endswith(b"$0\r\n\r\n$511\r\n" + b"x" * 511 + b"\r\n")


@pytest.mark.parametrize(
    ("odd_one", "why"),
    [
        ("é", "non-ASCII: characters are not bytes"),
        ("x" * 512, "longer than the header table"),
        (b"raw", "bytes"),
        (7, "an int"),
        (1.5, "a float"),
        (_NotStrPosingAsStr(), "not a str, though its class compares equal to str"),
    ],
)
@pytest.mark.parametrize("at", ["last", "middle"])
def test_anything_but_short_ascii_str_goes_to_hiredis(odd_one: Arg, why: str, at: str) -> None:
    # "last" is MSET's shape (its last argument is a value), checked before the
    # full pass; "middle" goes through that pass.
    keys: list[Arg] = [f"k{i}" for i in range(40)]
    args: list[Arg] = ["DEL", *keys, odd_one] if at == "last" else ["DEL", *keys[:20], odd_one, *keys[20:]]
    assert _pack_text(args) is None, why
    if isinstance(odd_one, _NotStrPosingAsStr):
        with pytest.raises(TypeError):  # hiredis refuses it too
            pack(args)
    else:
        assert pack(args) == _reference(args), why


@pytest.mark.parametrize("liar", [_LyingLength("abcdef"), _LyingLengthPosingAsStr("abcdef")])
def test_str_subclasses_are_packed_by_their_data_not_their_len(liar: str) -> None:
    # A wrong length header would desynchronise the connection (or read another key).
    # The text packer measures exact str only and leaves subclasses to hiredis.
    args: list[Arg] = ["MGET", *(f"k{i}" for i in range(40)), liar]
    assert _pack_text(args) is None
    packed = pack(args)
    assert packed == _reference(args)
    assert packed.endswith(b"$6\r\nabcdef\r\n")


def test_short_commands_are_packed_by_hiredis_as_before() -> None:
    args = ["MGET", *(f"k{i}" for i in range(_TEXT_PACK_FROM - 2))]
    assert len(args) < _TEXT_PACK_FROM
    assert pack(args) == _reference(args)
    assert pack(("SET", "k", b"v", "PX", 1000)) == _reference(("SET", "k", b"v", "PX", 1000))


def test_keys_with_undecodable_bytes_still_pack() -> None:
    # SCAN hands such keys back with surrogateescape; the fallback must keep working.
    args = ["DEL", *(f"k{i}" for i in range(40)), "bad-\udcff"]
    assert pack(args).endswith(b"$5\r\nbad-\xff\r\n")


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.lists(
        st.one_of(
            st.text(max_size=40),
            st.text(alphabet=st.characters(max_codepoint=127), min_size=500, max_size=520),
            st.binary(max_size=20),
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
        ),
        min_size=1,
        max_size=80,
    )
)
def test_pack_matches_hiredis_for_any_arguments(args: list[Arg]) -> None:
    command: list[Arg] = ["MGET", *args]
    assert pack(command) == _reference(command)


@pytest.fixture
async def client(valkey_server: RedisServer) -> AsyncIterator[Client]:
    async with Client(RedisBackend(redis_options(valkey_server))) as client:
        yield client


async def test_long_batches_round_trip_on_a_server(client: Client) -> None:
    # Keys of every length from 7 to 511 characters: the batch is joined as text.
    joined = [f"pack:{i}:".ljust(7 + i % 505, "k") for i in range(1000)]
    assert {len(key) for key in joined} == set(range(7, 512))
    assert _pack_text(["MGET", *joined]) is not None
    # Longer and non-ASCII keys: the batch goes through hiredis.
    other = [f"pack:long:{i}:".ljust(512 + i, "k") for i in range(20)] + [f"pack:ü:{i}" for i in range(30)]
    assert _pack_text(["MGET", *other]) is None
    for keys in (joined, other):
        await client.batch_set({key: {"n": n} for n, key in enumerate(keys)})
        found = await client.batch_get([*keys, "pack:missing"])
        assert list(found) == keys
        assert [value["n"] for value in found.values()] == list(range(len(keys)))
        assert await client.batch_delete(keys[:30]) == 30
        assert await client.batch_get(keys[:30]) == {}
        assert len(await client.batch_get(keys)) == len(keys) - 30


@pytest.mark.parametrize("bad", [_LyingLengthPosingAsStr("abc"), _NotStrPosingAsStr()])
async def test_keys_posing_as_str_are_refused_before_anything_is_sent(client: Client, bad: object) -> None:
    keys: list[Any] = [f"pack:{i}" for i in range(30)] + [bad]
    with pytest.raises(InvalidKeyError, match="keys must be str"):
        await client.batch_get(keys)
    with pytest.raises(InvalidKeyError, match="keys must be str"):
        await client.batch_delete(keys)
    with pytest.raises(InvalidKeyError, match="keys must be str"):
        await client.get(bad)  # type: ignore[call-overload]
