"""Tests of kivigo_async.codecs: round trips, typed decoding, errors, compression, encryption."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
import os
import sys
import traceback
import tracemalloc
import uuid
import warnings
import zlib
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypedDict, cast

import msgspec
import orjson
import pytest
from conftest import CheckedCard, CheckedStruct, checked_card_models

from kivigo_async.codecs import Codec, CompressedCodec, EncryptedCodec, JsonCodec, MsgspecCodec
from kivigo_async.errors import CodecError, ConfigurationError, DecodeError, EncodeError, KivigoError

if TYPE_CHECKING:
    from collections.abc import Callable

SECRET = "s3cr3t-Value-Do-Not-Leak"

# -- sample types --------------------------------------------------------------


@dataclasses.dataclass
class Point:
    x: int
    y: float
    label: str = ""


class UserStruct(msgspec.Struct):
    name: str
    age: int
    tags: list[str] = []
    joined: datetime | None = None


class Scores(msgspec.Struct):
    values: list[float]


class MovieDict(TypedDict):
    title: str
    year: int


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Pair(NamedTuple):
    left: int
    right: str


class FakeValidationError(ValueError):
    """Mimics pydantic.ValidationError: str() holds the input, errors() can leave it out."""

    def __init__(self, loc: tuple[str, ...], msg: str, input_value: object) -> None:
        super().__init__(f"{msg} [input_value={input_value!r}]")
        self._details = [{"loc": loc, "msg": msg, "input": input_value}]

    def errors(
        self, *, include_url: bool = True, include_context: bool = True, include_input: bool = True
    ) -> list[dict[str, object]]:
        return [{k: v for k, v in d.items() if include_input or k != "input"} for d in self._details]


class FakeModel:
    """Duck-types the pydantic v2 model API the codecs rely on (pydantic may be absent)."""

    name: str
    age: int

    def __init__(self, name: str, age: int) -> None:
        self.name = name
        self.age = age

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FakeModel) and (self.name, self.age) == (other.name, other.age)

    __hash__ = None  # type: ignore[assignment]

    def model_dump(
        self, *, mode: str = "python", by_alias: bool = False, round_trip: bool = False
    ) -> dict[str, Any]:
        assert mode == "json"
        assert by_alias
        assert round_trip
        return {"name": self.name, "age": self.age}

    @classmethod
    def model_validate(cls, obj: object) -> FakeModel:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise FakeValidationError(("name",), "Input should be a valid string", obj)
        age = obj.get("age")
        if not isinstance(age, int) or isinstance(age, bool):
            raise FakeValidationError(("age",), "Input should be a valid integer", age)
        return cls(obj["name"], age)

    @classmethod
    def model_validate_json(cls, data: bytes | str) -> FakeModel:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise FakeValidationError((), "Invalid JSON", data) from exc
        return cls.model_validate(obj)


# -- codec matrix ------------------------------------------------------------------

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))

CODEC_FACTORIES: dict[str, Callable[[], Codec]] = {
    "json": JsonCodec,
    "msgspec-json": lambda: MsgspecCodec("json"),
    "msgspec-msgpack": lambda: MsgspecCodec("msgpack"),
    "compressed-json": lambda: CompressedCodec(JsonCodec(), min_size=0),
    "compressed-msgpack": lambda: CompressedCodec(MsgspecCodec("msgpack"), level=9, min_size=16),
    "encrypted-json": lambda: EncryptedCodec(JsonCodec(), [KEY_A]),
    "encrypted-compressed": lambda: EncryptedCodec(CompressedCodec(JsonCodec(), min_size=0), [KEY_A, KEY_B]),
}


@pytest.fixture(params=list(CODEC_FACTORIES), ids=list(CODEC_FACTORIES))
def codec(request: pytest.FixtureRequest) -> Codec:
    factory = CODEC_FACTORIES[request.param]
    return factory()


def roundtrip(codec: Codec, value: object, tp: Any = object) -> Any:
    data = codec.encode(value)
    assert isinstance(data, bytes)
    return codec.decode(data, tp)


# -- error classes -------------------------------------------------------------------


def test_error_classes_subclass_the_right_builtins() -> None:
    assert issubclass(EncodeError, TypeError)
    assert issubclass(DecodeError, ValueError)
    assert issubclass(ConfigurationError, ValueError)
    for cls in (EncodeError, DecodeError):
        assert issubclass(cls, CodecError)
        assert issubclass(cls, KivigoError)


def test_codecs_satisfy_the_protocol(codec: Codec) -> None:
    assert isinstance(codec, Codec)


def test_protocol_rejects_non_codecs() -> None:
    assert not isinstance(object(), Codec)


def test_public_names() -> None:
    import kivigo_async.codecs as mod

    assert set(mod.__all__) == {"Codec", "JsonCodec", "MsgspecCodec", "CompressedCodec", "EncryptedCodec"}


# -- untyped round trips ---------------------------------------------------------------

UNTYPED_VALUES: list[Any] = [
    "hello",
    "",
    0,
    -42,
    2**63 - 1,
    -(2**63),
    3.5,
    -0.0,
    1e308,
    True,
    False,
    None,
    [],
    {},
    [1, "two", 3.0, None, True],
    {"a": {"b": {"c": [1, {"d": None}]}}, "e": []},
    'unicode: héllo wörld — 日本語 — emoji 🎉🔑 — nul \x00 — quote " backslash \\',
    {"ключ": "значение", "🔑": ["ü", "ß"]},
]


@pytest.mark.parametrize("value", UNTYPED_VALUES, ids=repr)
def test_untyped_round_trip(codec: Codec, value: object) -> None:
    assert roundtrip(codec, value) == value


@pytest.mark.parametrize("value", UNTYPED_VALUES, ids=repr)
def test_typed_round_trip_of_builtins(codec: Codec, value: object) -> None:
    assert roundtrip(codec, value, type(value)) == value


def test_untyped_decode_returns_plain_containers(codec: Codec) -> None:
    out = roundtrip(codec, UserStruct("ada", 36, ["x"]))
    assert out == {"name": "ada", "age": 36, "tags": ["x"], "joined": None}


def test_tuple_comes_back_as_list_untyped_and_tuple_typed(codec: Codec) -> None:
    assert roundtrip(codec, (1, 2)) == [1, 2]
    assert roundtrip(codec, (1, "a"), tuple[int, str]) == (1, "a")


def test_typing_any_is_untyped(codec: Codec) -> None:
    assert roundtrip(codec, {"a": [1]}, Any) == {"a": [1]}


# -- typed round trips -------------------------------------------------------------------

NOW = datetime(2024, 5, 17, 13, 45, 30, 123456, tzinfo=timezone(timedelta(hours=2)))


def test_datetime_tz_aware(codec: Codec) -> None:
    out = roundtrip(codec, NOW, datetime)
    assert isinstance(out, datetime)
    assert out == NOW
    assert out.tzinfo is not None
    assert out.utcoffset() is not None


def test_date(codec: Codec) -> None:
    assert roundtrip(codec, date(2024, 2, 29), date) == date(2024, 2, 29)


def test_uuid(codec: Codec) -> None:
    u = uuid.uuid4()
    out = roundtrip(codec, u, uuid.UUID)
    assert isinstance(out, uuid.UUID)
    assert out == u


def test_decimal(codec: Codec) -> None:
    d = Decimal("12345678901234567890.000000000123")
    out = roundtrip(codec, d, Decimal)
    assert isinstance(out, Decimal)
    assert out == d
    assert roundtrip(codec, {"price": Decimal("9.99")}, dict[str, Decimal]) == {"price": Decimal("9.99")}


def test_dataclass(codec: Codec) -> None:
    p = Point(1, 2.5, "p")
    out = roundtrip(codec, p, Point)
    assert isinstance(out, Point)
    assert out == p


def test_msgspec_struct(codec: Codec) -> None:
    u = UserStruct("ada", 36, ["admin", "ünï"], joined=NOW)
    out = roundtrip(codec, u, UserStruct)
    assert isinstance(out, UserStruct)
    assert out == u


def test_typed_dict(codec: Codec) -> None:
    m: MovieDict = {"title": "Metropolis", "year": 1927}
    assert roundtrip(codec, m, MovieDict) == m


def test_enum_namedtuple_and_sets(codec: Codec) -> None:
    assert roundtrip(codec, Color.BLUE, Color) is Color.BLUE
    assert roundtrip(codec, Pair(1, "x"), Pair) == Pair(1, "x")
    assert roundtrip(codec, {3, 1, 2}, set[int]) == {1, 2, 3}
    assert roundtrip(codec, frozenset({"a"}), frozenset[str]) == frozenset({"a"})
    assert sorted(roundtrip(codec, {3, 1, 2})) == [1, 2, 3]


def test_generic_containers(codec: Codec) -> None:
    assert roundtrip(codec, [1, 2, 3], list[int]) == [1, 2, 3]
    value = {"a": [Point(1, 2.0)], "b": []}
    assert roundtrip(codec, value, dict[str, list[Point]]) == value
    assert roundtrip(codec, None, int | None) is None
    assert roundtrip(codec, 5, int | None) == 5
    structs = [UserStruct("a", 1), UserStruct("b", 2)]
    assert roundtrip(codec, structs, list[UserStruct]) == structs


def test_int_is_accepted_as_float(codec: Codec) -> None:
    out = roundtrip(codec, 3, float)
    assert out == 3.0
    assert isinstance(out, float)


def test_fake_pydantic_model(codec: Codec) -> None:
    m = FakeModel("ada", 36)
    out = roundtrip(codec, m, FakeModel)
    assert isinstance(out, FakeModel)
    assert out == m
    assert roundtrip(codec, m) == {"name": "ada", "age": 36}
    # nested inside msgspec-decoded types, through the dec_hook
    assert roundtrip(codec, [m, FakeModel("bob", 1)], list[FakeModel]) == [m, FakeModel("bob", 1)]


def test_fake_pydantic_validation_error_is_redacted(codec: Codec) -> None:
    data = codec.encode({"name": "ada", "age": SECRET})
    with pytest.raises(DecodeError) as info:
        codec.decode(data, FakeModel)
    assert SECRET not in str(info.value)
    assert "age" in str(info.value)
    # Nor in what a log prints with it: the validation error (which quotes the
    # input) is neither its cause nor its context.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    assert SECRET not in "".join(traceback.format_exception(info.value))
    with pytest.raises(DecodeError) as info:
        codec.decode(codec.encode([{"name": "ada", "age": SECRET}]), list[FakeModel])
    assert SECRET not in str(info.value)


def test_real_pydantic_model(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Address(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        city: str
        zip: str

    class Person(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        name: str
        age: int
        born: datetime
        id: uuid.UUID
        address: Address
        balance: Decimal

    p = Person(
        name="ada",
        age=36,
        born=NOW,
        id=uuid.uuid4(),
        address=Address(city="London", zip="N1"),
        balance=Decimal("1.10"),
    )
    out = roundtrip(codec, p, Person)
    assert type(out) is Person
    assert out == p
    assert roundtrip(codec, p)["address"] == {"city": "London", "zip": "N1"}
    with pytest.raises(DecodeError) as info:
        roundtrip(codec, {"name": "x", "age": SECRET}, Person)
    assert SECRET not in str(info.value)
    assert SECRET not in "".join(traceback.format_exception(info.value))


def test_pydantic_fields_with_aliases_read_back(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Account(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        user_name: str = pydantic.Field(alias="userName")

    class Lenient(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        model_config = pydantic.ConfigDict(populate_by_name=True)
        user_name: str = pydantic.Field(alias="userName")

    assert roundtrip(codec, Account(userName="ada"), Account) == Account(userName="ada")
    assert roundtrip(codec, Account(userName="ada")) == {"user_name": "ada"}  # stored by field name
    assert roundtrip(codec, Lenient(user_name="ada"), Lenient) == Lenient(user_name="ada")
    assert roundtrip(codec, [Account(userName="ada")], list[Account]) == [Account(userName="ada")]


def test_pydantic_fields_with_an_alias_for_one_direction_read_back(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Written(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        name: str = "anonymous"
        admin: bool = pydantic.Field(False, serialization_alias="isAdmin")

    class Read(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        admin: bool = pydantic.Field(False, validation_alias="isAdmin")

    class Generated(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        model_config = pydantic.ConfigDict(
            alias_generator=pydantic.AliasGenerator(serialization_alias=lambda n: n.upper())
        )
        user_name: str = "anonymous"

    # Each came back with its defaults: the value was written under a key never read.
    assert roundtrip(codec, Written(name="ada", admin=True), Written) == Written(name="ada", admin=True)
    assert roundtrip(codec, Read(isAdmin=True), Read) == Read(isAdmin=True)
    assert roundtrip(codec, Generated(user_name="ada"), Generated) == Generated(user_name="ada")
    assert roundtrip(codec, [Written(admin=True)], list[Written]) == [Written(admin=True)]


def test_a_strict_pydantic_model_reads_back_nested_and_in_msgpack(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Event(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        model_config = pydantic.ConfigDict(strict=True)
        at: datetime
        id: uuid.UUID

    event = Event(at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), id=uuid.UUID(int=7))
    assert roundtrip(codec, event, Event) == event
    assert roundtrip(codec, [event], list[Event]) == [event]


def test_a_pydantic_value_that_does_not_match_its_field_is_not_stored(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Quota(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        n: int

    quota = Quota(n=1)
    quota.n = SECRET  # type: ignore[assignment]  # no validation on assignment
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(EncodeError) as info:  # stored, every typed read would fail
            codec.encode(quota)
    assert SECRET not in str(info.value)
    assert not [w for w in caught if SECRET in str(w.message)]  # pydantic's warning quotes it
    # Nor in what a log prints with it: pydantic's serialization error, which quotes
    # the value, is neither its cause nor its context.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    assert SECRET not in "".join(traceback.format_exception(info.value))


def test_pydantic_decode_error_shows_no_stored_dict_key(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Grant(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        scope: str

    class Wallet(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        tokens: dict[str, int]
        grants: dict[str, Grant]
        history: list[Grant]
        last: Grant | int | None = None

    doc = {
        "tokens": {SECRET: "x"},
        "grants": {SECRET: {"scope": 1}},
        "history": [{"scope": "ok"}, {"scope": 2}],
        "last": {"scope": 3},
    }
    for tp, value in ((Wallet, doc), (list[Wallet], [doc])):
        with pytest.raises(DecodeError) as info:
            codec.decode(codec.encode(value), tp)
        message = str(info.value)
        assert SECRET not in "".join(traceback.format_exception(info.value))
        # Dict keys read from the store are hidden, as msgspec hides them; list
        # indexes and the names the model declares are kept.
        assert "tokens.[...]: " in message
        assert "grants.[...].scope: " in message
        assert "history.1.scope: " in message
        assert "last.Grant.scope: " in message


def test_pydantic_secret_is_refused_not_masked(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Inner(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        password: pydantic.SecretStr  # type: ignore[name-defined]

    class Outer(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        name: str
        logins: list[Inner] | None = None

    for value, field in (
        (Inner(password=SECRET), "Inner.password"),
        (Outer(name="svc", logins=[Inner(password=SECRET)]), "Outer.logins"),
        ({"nested": [Inner(password=SECRET)]}, "Inner.password"),
    ):
        with pytest.raises(EncodeError, match=rf"{field}` holds a pydantic secret") as info:
            codec.encode(value)
        assert SECRET not in str(info.value)
    # Decided per model class, not per value: the same model must not store fine
    # today and fail the day its list is filled.
    with pytest.raises(EncodeError, match=r"Outer\.logins"):
        codec.encode(Outer(name="svc"))


def test_pydantic_secrets_are_refused_in_generics_dataclasses_and_typed_dicts(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")
    from pydantic.dataclasses import dataclass as pydantic_dataclass

    class Pin(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        pin: pydantic.Secret[int]  # type: ignore[name-defined]

    @pydantic_dataclass
    class Login:
        password: pydantic.SecretStr  # type: ignore[name-defined]

    class WithDataclass(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        login: Login

    typing_extensions = pytest.importorskip("typing_extensions")  # pydantic's TypedDict before 3.12
    Creds = typing_extensions.TypedDict("Creds", {"token": pydantic.SecretStr})

    class WithTypedDict(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        creds: Creds  # type: ignore[valid-type]

    for value, field in (
        (Pin(pin=1234), "Pin.pin"),
        (WithDataclass(login=Login(password=SECRET)), "WithDataclass.login"),
        (WithTypedDict(creds={"token": SECRET}), "WithTypedDict.creds"),
    ):
        with pytest.raises(EncodeError, match=rf"{field}` holds a pydantic secret") as info:
            codec.encode(value)
        assert SECRET not in str(info.value)


def test_pydantic_secrets_revealed_by_their_own_serializer_are_stored_at_any_depth(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")
    typing_extensions = pytest.importorskip("typing_extensions")
    from typing import Annotated

    from pydantic.dataclasses import dataclass as pydantic_dataclass

    reveal = pydantic.PlainSerializer(lambda v: v.get_secret_value(), return_type=str, when_used="json")
    Revealed = Annotated[pydantic.SecretStr, reveal]  # type: ignore[name-defined]
    Creds = typing_extensions.TypedDict("Creds", {"token": Revealed})

    @pydantic_dataclass
    class ByAnnotation:
        token: Revealed

    @pydantic_dataclass
    class ByDecorator:
        token: pydantic.SecretStr  # type: ignore[name-defined]

        @pydantic.field_serializer("token", when_used="json")  # type: ignore[untyped-decorator]
        def _reveal(self, token: Any) -> str:
            return str(token.get_secret_value())

    class WithTypedDict(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        creds: Creds  # type: ignore[valid-type]

    class WithAnnotated(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        creds: ByAnnotation

    class WithDecorated(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        creds: ByDecorator

    for value in (
        WithTypedDict(creds={"token": SECRET}),
        WithAnnotated(creds=ByAnnotation(token=SECRET)),
        WithDecorated(creds=ByDecorator(token=SECRET)),
    ):
        stored = codec.decode(codec.encode(value), object)
        assert stored == {"creds": {"token": SECRET}}  # revealed, as its serializer says


def test_pydantic_values_written_by_alias_still_read_back(codec: Codec) -> None:
    # Earlier releases wrote models by alias: what they stored must not read back
    # as the fields' defaults.
    pydantic = pytest.importorskip("pydantic")

    class Account(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        name: str = "root"
        is_admin: bool = pydantic.Field(False, alias="isAdmin")

    old = Account(name="ada", isAdmin=True)
    stored = codec.encode(old.model_dump(mode="json", by_alias=True))  # as a plain dict, by alias
    assert codec.decode(stored, Account) == old
    assert codec.decode(codec.encode(old), Account) == old  # and as written now, by name


def test_pydantic_secret_with_its_own_serializer_round_trips(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")
    from typing import Annotated

    reveal = pydantic.PlainSerializer(lambda v: v.get_secret_value(), when_used="json")

    class ByDecorator(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        token: pydantic.SecretStr  # type: ignore[name-defined]

        @pydantic.field_serializer("token", when_used="json")  # type: ignore[untyped-decorator]
        def _reveal(self, token: Any) -> str:
            return str(token.get_secret_value())

    class ByAnnotation(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        tokens: list[Annotated[pydantic.SecretStr, reveal]]  # type: ignore[name-defined]

    assert roundtrip(codec, ByDecorator(token=SECRET), ByDecorator).token.get_secret_value() == SECRET
    out = roundtrip(codec, ByAnnotation(tokens=[SECRET]), ByAnnotation)
    assert [t.get_secret_value() for t in out.tokens] == [SECRET]


@dataclasses.dataclass
class _Order:
    item: Item  # type: ignore[name-defined]  # noqa: F821 (never defined: cannot resolve)


@pytest.mark.parametrize(
    "factory", [JsonCodec, lambda: MsgspecCodec("json"), lambda: MsgspecCodec("msgpack")]
)
def test_unresolvable_annotation_is_a_decode_error(factory: Callable[[], Codec]) -> None:
    codec = factory()
    data = codec.encode({"item": 1})
    with pytest.raises(DecodeError, match=r"_Order.*'Item' is not defined"):
        codec.decode(data, _Order)
    decode_many = cast("Any", codec).decode_many
    with pytest.raises(DecodeError, match="'Item' is not defined"):
        decode_many([data], _Order)


# -- decode errors ---------------------------------------------------------------------------


def test_wrong_type_decode(codec: Codec) -> None:
    data = codec.encode("abc")
    with pytest.raises(DecodeError) as info:
        codec.decode(data, int)
    message = str(info.value)
    assert "int" in message
    assert "abc" not in message
    assert "abc" not in "".join(traceback.format_exception(info.value))


def test_wrong_struct_field_type(codec: Codec) -> None:
    data = codec.encode({"name": "ada", "age": SECRET})
    with pytest.raises(DecodeError) as info:
        codec.decode(data, UserStruct)
    assert "UserStruct" in str(info.value)
    assert "age" in str(info.value)
    assert SECRET not in str(info.value)


def test_literal_and_enum_mismatch_does_not_leak_the_value(codec: Codec) -> None:
    data = codec.encode(SECRET)
    targets: list[Any] = [Literal["a", "b"], Color]
    for tp in targets:
        with pytest.raises(DecodeError) as info:
            codec.decode(data, tp)
        assert SECRET not in str(info.value)
        assert "Invalid enum value" in str(info.value)


# Invalid in every format (JSON, MessagePack, and for the wrappers' headers): empty,
# 0xc1 (never used by MessagePack), a truncated array, a truncated str32.
CORRUPT: list[bytes] = [
    b"",
    b"\xc1",
    b"\xc1garbage" + SECRET.encode(),
    b"\x92\x01",
    b"\xdb\xff\xff\xff\xffgarbage" + SECRET.encode(),
]


@pytest.mark.parametrize("data", CORRUPT, ids=repr)
@pytest.mark.parametrize("tp", [object, int, UserStruct, dict[str, int]], ids=repr)
def test_corrupt_bytes(codec: Codec, data: bytes, tp: Any) -> None:
    with pytest.raises(DecodeError) as info:
        codec.decode(data, tp)
    assert SECRET not in str(info.value)
    assert "garbage" not in str(info.value)


def test_decode_error_carries_no_exception_that_quotes_the_value(codec: Codec) -> None:
    # The decoder's own exception may quote the stored value (an enum value, a
    # pydantic input): it is neither the cause nor the context a log would print.
    with pytest.raises(DecodeError) as info:
        codec.decode(codec.encode([1, SECRET]), list[int])
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    assert SECRET not in "".join(traceback.format_exception(info.value))


class Level(enum.Enum):
    LOW = "low"


def test_a_bad_enum_value_is_not_quoted_even_after_a_path_like_text(codec: Codec) -> None:
    value = SECRET + " - at `$.x` " + SECRET
    with pytest.raises(DecodeError) as info:
        codec.decode(codec.encode({"level": value}), dict[str, Level])
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    "factory", [JsonCodec, lambda: MsgspecCodec("json"), lambda: MsgspecCodec("msgpack")]
)
def test_unsupported_decode_target(factory: Callable[[], Codec]) -> None:
    codec = factory()
    with pytest.raises(DecodeError, match="not a supported type"):
        codec.decode(codec.encode(1), 5)  # type: ignore[arg-type]


def test_json_decode_error_messages() -> None:
    codec = JsonCodec()
    with pytest.raises(DecodeError, match="expected a JSON document"):
        codec.decode(b"{", object)
    with pytest.raises(DecodeError, match=r"expected int \(JSON\)"):
        codec.decode(b'"abc"', int)
    with pytest.raises(DecodeError, match=r"expected list\[int\]"):
        codec.decode(b"[1, 2, {}]", list[int])


def test_decoders_are_cached_per_type() -> None:
    codec = JsonCodec()
    for _ in range(3):
        codec.decode(b'{"name": "a", "age": 1}', UserStruct)
        codec.decode(b"[1]", list[int])
        codec.decode(b"1", object)
    assert len(codec._decoders) == 3
    first = codec._decoders[UserStruct]
    codec.decode(b'{"name": "b", "age": 2}', UserStruct)
    assert codec._decoders[UserStruct] is first


# -- encode errors -------------------------------------------------------------------------


class Secretive:
    def __repr__(self) -> str:
        return SECRET

    __str__ = __repr__


def some_function() -> None:
    pass


UNENCODABLE: list[tuple[object, str]] = [
    (object(), "object"),
    (some_function, "function"),
    (Secretive(), "Secretive"),
    ({"nested": [Secretive()]}, "Secretive"),
    (UserStruct("a", 1, tags=[Secretive()]), "Secretive"),  # type: ignore[list-item]
]


@pytest.mark.parametrize(("value", "type_name"), UNENCODABLE, ids=lambda v: type(v).__name__)
def test_unencodable_values(codec: Codec, value: object, type_name: str) -> None:
    with pytest.raises(EncodeError) as info:
        codec.encode(value)
    message = str(info.value)
    assert type_name in message
    assert repr(value) not in message
    assert SECRET not in message
    assert "0x" not in message  # no default object repr (address)


def test_json_rejects_bytes_with_a_hint() -> None:
    for value in (b"\x00\x01", {"blob": bytearray(b"x")}, [memoryview(b"y")]):
        with pytest.raises(EncodeError, match="set_raw") as info:
            JsonCodec().encode(value)
        assert "msgpack" in str(info.value)


def test_json_big_int_is_rejected_but_msgspec_json_handles_it() -> None:
    with pytest.raises(EncodeError, match="64-bit"):
        JsonCodec().encode(2**64)
    assert roundtrip(MsgspecCodec("json"), 2**100, int) == 2**100


def test_failing_model_dump_becomes_encode_error() -> None:
    class Broken:
        def model_dump(self, *, mode: str = "python", by_alias: bool = False) -> dict[str, Any]:
            raise RuntimeError(SECRET)

    with pytest.raises(EncodeError) as info:
        JsonCodec().encode(Broken())
    assert "Broken" in str(info.value)
    assert SECRET not in str(info.value)
    with pytest.raises(EncodeError) as info:
        MsgspecCodec().encode(Broken())
    assert SECRET not in str(info.value)


def test_json_surrogates_rejected() -> None:
    with pytest.raises(EncodeError, match="str"):
        JsonCodec().encode("\ud800")


# -- JsonCodec choices ---------------------------------------------------------------------


def test_json_output_is_compact_json() -> None:
    assert JsonCodec().encode({"a": [1, "é"]}) == '{"a":[1,"é"]}'.encode()
    assert JsonCodec().encode(Decimal("1.50")) == b'"1.50"'
    assert JsonCodec().encode(UserStruct("a", 1)) == b'{"name":"a","age":1,"tags":[],"joined":null}'


def test_json_nan_and_infinity_become_null() -> None:
    codec = JsonCodec()
    for value in (math.nan, math.inf, -math.inf):
        assert codec.encode(value) == b"null"
        assert codec.decode(codec.encode(value), object) is None
    data = codec.encode({"values": [1.0, math.nan]})
    assert codec.decode(data, object) == {"values": [1.0, None]}
    with pytest.raises(DecodeError):  # a typed read notices
        codec.decode(data, Scores)


def test_msgpack_keeps_nan_and_infinity() -> None:
    codec = MsgspecCodec("msgpack")
    out = roundtrip(codec, [math.nan, math.inf, -math.inf], list[float])
    assert math.isnan(out[0])
    assert out[1:] == [math.inf, -math.inf]


@pytest.mark.parametrize(
    "codec",
    [MsgspecCodec("msgpack"), CompressedCodec(MsgspecCodec("msgpack"), min_size=0)],
    ids=["msgpack", "compressed-msgpack"],
)
def test_msgpack_keeps_nan_and_infinity_in_pydantic_models(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Reading(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        value: float
        low: float | None = None  # null would be read back as None, without an error

    class Series(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        first: Reading
        rest: list[Reading]

    def same(a: float | None, b: float | None) -> bool:
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))

    def check(got: Reading, sent: Reading) -> None:
        assert type(got) is Reading
        assert same(got.value, sent.value)
        assert same(got.low, sent.low)

    readings = [
        Reading(value=v, low=w) for v, w in ((math.inf, -math.inf), (math.nan, math.nan), (-0.0, 1.5))
    ]
    series = Series(first=readings[0], rest=readings)
    for sent in readings:
        check(roundtrip(codec, sent, Reading), sent)
    # In a msgspec type, through the dec_hook; and models inside a model.
    for got, sent in zip(roundtrip(codec, readings, list[Reading]), readings, strict=True):
        check(got, sent)
    for out in (roundtrip(codec, series, Series), roundtrip(codec, {"s": series}, dict[str, Series])["s"]):
        check(out.first, series.first)
        for got, sent in zip(out.rest, series.rest, strict=True):
            check(got, sent)


def test_json_non_string_keys() -> None:
    codec = JsonCodec()
    data = codec.encode({1: "a", 2: "b"})
    assert codec.decode(data, object) == {"1": "a", "2": "b"}
    assert codec.decode(data, dict[int, str]) == {1: "a", 2: "b"}
    u = uuid.uuid4()
    assert codec.decode(codec.encode({u: 1}), dict[uuid.UUID, int]) == {u: 1}


def test_bytes_in_msgspec_codecs() -> None:
    blob = os.urandom(64)
    msgpack = MsgspecCodec("msgpack")
    assert roundtrip(msgpack, blob) == blob
    assert roundtrip(msgpack, {"b": blob}, dict[str, bytes]) == {"b": blob}
    json = MsgspecCodec("json")
    assert isinstance(roundtrip(json, blob), str)  # base64 when untyped
    assert roundtrip(json, blob, bytes) == blob


def test_msgspec_codec_config() -> None:
    assert MsgspecCodec().format == "json"
    assert MsgspecCodec("msgpack").format == "msgpack"
    with pytest.raises(ConfigurationError, match="format"):
        MsgspecCodec("yaml")  # type: ignore[arg-type]


# -- reprs ------------------------------------------------------------------------------------


def test_reprs() -> None:
    assert repr(JsonCodec()) == "JsonCodec()"
    assert repr(MsgspecCodec("msgpack")) == "MsgspecCodec(format='msgpack')"
    assert (
        repr(CompressedCodec(JsonCodec(), level=3, min_size=10))
        == "CompressedCodec(inner=JsonCodec(), algorithm='zlib', level=3, min_size=10, max_size=67108864)"
    )
    assert repr(EncryptedCodec(JsonCodec(), [KEY_A])) == "EncryptedCodec(inner=JsonCodec(), keys=<1 key>)"
    assert (
        repr(EncryptedCodec(CompressedCodec(MsgspecCodec()), [KEY_A, KEY_B]))
        == "EncryptedCodec(inner=CompressedCodec(inner=MsgspecCodec(format='json'), algorithm='zlib', "
        "level=6, min_size=512, max_size=67108864), keys=<2 keys>)"
    )


# -- CompressedCodec ------------------------------------------------------------------------


def test_compressed_small_values_are_stored_raw() -> None:
    inner = JsonCodec()
    codec = CompressedCodec(inner, min_size=100)
    data = codec.encode({"small": True})
    assert data == b"\x00" + inner.encode({"small": True})
    assert codec.decode(data, object) == {"small": True}


def test_compressed_large_values_are_compressed_and_smaller() -> None:
    inner = JsonCodec()
    codec = CompressedCodec(inner)
    value = {"rows": [{"id": i, "name": f"user-{i}", "active": True} for i in range(500)]}
    data = codec.encode(value)
    assert data[:1] == b"\x01"
    assert len(data) < len(inner.encode(value)) / 4
    assert zlib.decompress(data[1:]) == inner.encode(value)
    assert codec.decode(data, object) == value
    assert codec.decode(data, dict[str, list[dict[str, Any]]]) == value


def test_compressed_min_size_boundary() -> None:
    inner = JsonCodec()
    payload = inner.encode("a" * 100)
    exact = CompressedCodec(inner, min_size=len(payload))
    assert exact.encode("a" * 100)[:1] == b"\x01"
    above = CompressedCodec(inner, min_size=len(payload) + 1)
    assert above.encode("a" * 100)[:1] == b"\x00"


def test_compressed_incompressible_values_are_stored_raw() -> None:
    inner = MsgspecCodec("msgpack")
    codec = CompressedCodec(inner, min_size=0)
    blob = os.urandom(4096)
    data = codec.encode(blob)
    assert data == b"\x00" + inner.encode(blob)
    assert codec.decode(data, bytes) == blob


def test_compressed_level_zero_never_grows_beyond_raw() -> None:
    codec = CompressedCodec(JsonCodec(), level=0, min_size=0)
    data = codec.encode("x" * 2000)
    assert data[:1] == b"\x00"
    assert codec.decode(data, str) == "x" * 2000


@pytest.mark.parametrize("header", [2, 3, 0x7B, 0xFF])
def test_compressed_unknown_header(header: int) -> None:
    codec = CompressedCodec(JsonCodec())
    with pytest.raises(DecodeError, match="header"):
        codec.decode(bytes([header]) + b'{"a":1}', object)


def test_compressed_empty_and_corrupt() -> None:
    codec = CompressedCodec(JsonCodec())
    with pytest.raises(DecodeError):
        codec.decode(b"", object)
    with pytest.raises(DecodeError, match="zlib") as info:
        codec.decode(b"\x01not zlib " + SECRET.encode(), object)
    assert isinstance(info.value.__cause__, zlib.error)
    assert SECRET not in str(info.value)
    good = CompressedCodec(JsonCodec(), min_size=0).encode("y" * 1000)
    with pytest.raises(DecodeError):
        codec.decode(good[:-5], object)  # truncated stream


def test_a_value_that_inflates_past_max_size_is_refused_unread() -> None:
    # A few kilobytes in the store, which anyone who can write there could put,
    # would otherwise inflate to whatever they chose in every reader.
    bomb = b"\x01" + zlib.compress(b'"' + b"a" * (8 * 1024 * 1024) + b'"', 9)
    assert len(bomb) < 10_000
    codec = CompressedCodec(JsonCodec(), max_size=1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="max_size"):
            codec.decode(bomb, object)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024  # about max_size was inflated, not the 8 MiB
    # Within the limit, it reads; a value larger than max_size is stored uncompressed.
    assert CompressedCodec(JsonCodec(), max_size=16 * 1024 * 1024).decode(bomb, str) == "a" * 8 * 1024 * 1024
    big = "x" * 3000
    small_limit = CompressedCodec(JsonCodec(), min_size=10, max_size=1000)
    assert small_limit.encode(big)[:1] == b"\x00"
    assert small_limit.decode(small_limit.encode(big), str) == big
    with pytest.raises(ConfigurationError, match="max_size"):
        CompressedCodec(JsonCodec(), max_size=0)


def test_compressed_inner_errors_pass_through() -> None:
    codec = CompressedCodec(JsonCodec(), min_size=0)
    with pytest.raises(EncodeError):
        codec.encode(object())
    with pytest.raises(DecodeError):
        codec.decode(codec.encode("abc"), int)
    assert codec.inner.__class__ is JsonCodec


@pytest.mark.parametrize(
    "kwargs",
    [
        {"algorithm": "lz4"},
        {"level": 10},
        {"level": -2},
        {"level": True},
        {"level": 1.5},
        {"min_size": -1},
        {"min_size": "512"},
        {"min_size": False},
    ],
    ids=repr,
)
def test_compressed_config_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        CompressedCodec(JsonCodec(), **kwargs)


def test_compressed_needs_a_codec() -> None:
    with pytest.raises(ConfigurationError, match="inner"):
        CompressedCodec(object())  # type: ignore[arg-type]


# -- EncryptedCodec -------------------------------------------------------------------------


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:8]


def test_encrypted_round_trip_and_layout() -> None:
    inner = JsonCodec()
    codec = EncryptedCodec(inner, [KEY_A])
    value = {"card": SECRET}
    data = codec.encode(value)
    plaintext = inner.encode(value)
    assert data[:1] == b"\x01"
    assert data[1:9] == _key_id(KEY_A)
    assert len(data) == 1 + 8 + 12 + len(plaintext) + 16
    assert SECRET.encode() not in data
    assert codec.decode(data, object) == value
    assert codec.decode(data, dict[str, str]) == value


def test_encrypted_uses_fresh_nonces() -> None:
    codec = EncryptedCodec(JsonCodec(), [KEY_A])
    a, b = codec.encode("same"), codec.encode("same")
    assert a != b
    assert a[9:21] != b[9:21]
    assert codec.decode(a, str) == codec.decode(b, str) == "same"


def test_encrypted_typed_values() -> None:
    codec = EncryptedCodec(MsgspecCodec("msgpack"), [KEY_A])
    u = UserStruct("ada", 36, joined=NOW)
    assert roundtrip(codec, u, UserStruct) == u
    blob = os.urandom(100)
    assert roundtrip(codec, blob, bytes) == blob


def test_encrypted_key_rotation() -> None:
    old, new = EncryptedCodec.generate_key(), EncryptedCodec.generate_key()
    old_codec = EncryptedCodec(JsonCodec(), [old])
    rotated = EncryptedCodec(JsonCodec(), [new, old])
    legacy = old_codec.encode({"v": 1})
    assert rotated.decode(legacy, object) == {"v": 1}

    fresh = rotated.encode({"v": 2})
    assert fresh[1:9] == _key_id(new)
    assert rotated.decode(fresh, object) == {"v": 2}
    with pytest.raises(DecodeError, match="could not be authenticated") as info:
        old_codec.decode(fresh, object)
    assert "not configured" in str(info.value)
    assert EncryptedCodec(JsonCodec(), [new]).decode(fresh, object) == {"v": 2}


def test_encrypted_tampering_with_any_byte_is_detected() -> None:
    codec = EncryptedCodec(JsonCodec(), [KEY_A, KEY_B])
    data = codec.encode({"amount": 100})
    for i in range(len(data)):
        for flip in (0x01, 0x80):
            tampered = bytearray(data)
            tampered[i] ^= flip
            with pytest.raises(DecodeError, match="could not be authenticated"):
                codec.decode(bytes(tampered), object)


def test_encrypted_header_is_authenticated() -> None:
    # Re-labelling a ciphertext with another configured key's id must fail the tag check.
    codec = EncryptedCodec(JsonCodec(), [KEY_A, KEY_B])
    data = codec.encode("x")
    relabelled = data[:1] + _key_id(KEY_B) + data[9:]
    with pytest.raises(DecodeError, match="tampered") as info:
        codec.decode(relabelled, object)
    assert info.value.__cause__ is not None


def test_encrypted_truncated_extended_and_garbage() -> None:
    codec = EncryptedCodec(JsonCodec(), [KEY_A])
    data = codec.encode("hello")
    for bad in (b"", data[:1], data[:20], data[:36], data[:-1], data + b"\x00", os.urandom(64)):
        with pytest.raises(DecodeError, match="could not be authenticated"):
            codec.decode(bad, object)


def test_encrypted_wrong_version() -> None:
    codec = EncryptedCodec(JsonCodec(), [KEY_A])
    data = codec.encode("hello")
    with pytest.raises(DecodeError, match="version"):
        codec.decode(b"\x02" + data[1:], object)


def test_encrypted_errors_hold_no_key_material() -> None:
    codec = EncryptedCodec(JsonCodec(), [KEY_A])
    other = EncryptedCodec(JsonCodec(), [KEY_B]).encode("x")
    data = codec.encode("x")
    for bad in (other, data[:-1] + bytes([data[-1] ^ 1]), b"\x02" + data[1:], data[:10]):
        with pytest.raises(DecodeError) as info:
            codec.decode(bad, object)
        message = str(info.value)
        for key in (KEY_A, KEY_B):
            assert key.hex() not in message
            assert _key_id(key).hex() not in message
            assert repr(key) not in message


def test_encrypted_inner_decode_errors_pass_through() -> None:
    codec = EncryptedCodec(JsonCodec(), [KEY_A])
    with pytest.raises(DecodeError) as info:
        codec.decode(codec.encode("abc"), int)
    assert "int" in str(info.value)
    with pytest.raises(EncodeError):
        codec.encode(object())


def test_encrypted_repr_hides_keys() -> None:
    keys = [EncryptedCodec.generate_key() for _ in range(3)]
    codec = EncryptedCodec(JsonCodec(), keys)
    text = repr(codec) + str(codec)
    assert text == "EncryptedCodec(inner=JsonCodec(), keys=<3 keys>)" * 2
    for key in keys:
        assert key.hex() not in text
        assert key.hex().upper() not in text
        assert repr(key) not in text
        assert _key_id(key).hex() not in text


def test_generate_key() -> None:
    a, b = EncryptedCodec.generate_key(), EncryptedCodec.generate_key()
    assert isinstance(a, bytes)
    assert len(a) == 32
    assert a != b


@pytest.mark.parametrize("length", [0, 1, 16, 24, 31, 33, 64])
def test_encrypted_bad_key_length(length: int) -> None:
    key = b"k" * length
    with pytest.raises(ConfigurationError, match="32 bytes") as info:
        EncryptedCodec(JsonCodec(), [KEY_A, key])
    assert "#1" in str(info.value)
    if length:
        assert repr(key) not in str(info.value)


@pytest.mark.parametrize(
    "keys",
    [
        [],
        (),
        KEY_A,  # a single key instead of a list of keys
        KEY_A.hex(),
        [KEY_A.hex()],
        [KEY_A, KEY_A],
        [32],
        None,
        [bytes(32)],  # a placeholder left in a config file
        [KEY_A, b"\xff" * 32],
    ],
    ids=[
        "empty-list",
        "empty-tuple",
        "bare-bytes",
        "bare-str",
        "hex-str",
        "duplicate",
        "int",
        "none",
        "zeros",
        "repeated-byte",
    ],
)
def test_encrypted_bad_keys(keys: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        EncryptedCodec(JsonCodec(), keys)
    assert KEY_A.hex() not in str(info.value)


def test_encrypted_accepts_bytearray_keys_and_tuples() -> None:
    keys: Any = (bytearray(KEY_A),)
    codec = EncryptedCodec(JsonCodec(), keys)
    assert codec.decode(EncryptedCodec(JsonCodec(), [KEY_A]).encode(1), int) == 1


def test_encrypted_needs_a_codec() -> None:
    with pytest.raises(ConfigurationError, match="inner"):
        EncryptedCodec("json", [KEY_A])  # type: ignore[arg-type]


def test_encrypted_without_cryptography(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", None)
    with pytest.raises(ConfigurationError, match=r"kivigo-async\[encryption\]") as info:
        EncryptedCodec(JsonCodec(), [KEY_A])
    assert isinstance(info.value.__cause__, ImportError)


# -- large values -----------------------------------------------------------------------------


def _ten_megabytes() -> dict[str, Any]:
    rows = [
        {"id": i, "name": f"user-{i:07d}", "score": i / 7, "tags": ["a", "bc", "déf"]} for i in range(140_000)
    ]
    value = {"rows": rows, "blob": "x" * 1_000_000}
    return value


def test_ten_megabyte_value_json() -> None:
    codec = JsonCodec()
    value = _ten_megabytes()
    data = codec.encode(value)
    assert len(data) >= 10_000_000
    assert codec.decode(data, object) == value


def test_ten_megabyte_value_compressed() -> None:
    inner = JsonCodec()
    codec = CompressedCodec(inner)
    value = _ten_megabytes()
    data = codec.encode(value)
    assert data[:1] == b"\x01"
    assert len(data) < len(inner.encode(value)) / 3
    assert codec.decode(data, object) == value
    assert codec.decode(data, dict[str, Any]) == value


def test_ten_megabyte_value_encrypted_and_compressed() -> None:
    codec = EncryptedCodec(CompressedCodec(MsgspecCodec("msgpack")), [KEY_A])
    value = {"blob": os.urandom(10 * 1024 * 1024)}
    assert codec.decode(codec.encode(value), dict[str, bytes]) == value


# -- values that must read back as written ---------------------------------------------


@dataclasses.dataclass
class Cart:
    user: str
    _version: int = 0


@dataclasses.dataclass
class CsrfSession:
    user: str
    _csrf: str


def test_dataclass_fields_named_with_an_underscore_are_kept(codec: Codec) -> None:
    # orjson's own dataclass writer leaves them out: a default came back silently,
    # and a field without one failed every read.
    assert roundtrip(codec, Cart("ada", 7), Cart) == Cart("ada", 7)
    assert roundtrip(codec, CsrfSession("ada", "tok"), CsrfSession) == CsrfSession("ada", "tok")
    assert roundtrip(codec, [Cart("ada", 7)], list[Cart]) == [Cart("ada", 7)]
    # The batch path (one codec call for a whole batch_set) writes the same bytes.
    many = getattr(codec, "encode_many", None)
    if many is not None:
        assert many([Cart("a", 1), Cart("b", 2)]) == [codec.encode(Cart("a", 1)), codec.encode(Cart("b", 2))]


def test_pydantic_json_and_computed_fields_read_back(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Hook(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        payload: pydantic.Json[dict[str, int]]  # type: ignore[name-defined]

    class Price(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        model_config = pydantic.ConfigDict(extra="forbid")
        net: int

        @pydantic.computed_field  # type: ignore[prop-decorator,untyped-decorator]
        @property
        def gross(self) -> int:
            return self.net * 2

    hook = Hook(payload='{"a": 1}')
    assert roundtrip(codec, hook, Hook) == hook
    assert roundtrip(codec, Price(net=5), Price) == Price(net=5)


def test_pydantic_alias_that_is_another_fields_name_reads_back(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        first: str = pydantic.Field(alias="name")
        name: str = pydantic.Field(alias="full_name")

    class Team(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        lead: Person

    person = Person(name="Ada", full_name="Ada Lovelace")
    assert roundtrip(codec, person, Person) == person
    assert roundtrip(codec, Team(lead=person), Team) == Team(lead=person)


def test_pydantic_secrets_are_refused_in_stdlib_dataclasses_named_tuples_and_aliases(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")
    typing_extensions = pytest.importorskip("typing_extensions")

    # Built from type objects: a class in a function body, with postponed annotations,
    # names types that only pydantic (which reads the frame) can resolve.
    Creds = dataclasses.make_dataclass("Creds", [("token", pydantic.SecretStr)])
    Pair = NamedTuple("Pair", [("token", pydantic.SecretStr)])  # type: ignore[name-defined]  # noqa: UP014
    Token = typing_extensions.TypeAliasType("Token", pydantic.SecretStr)

    class WithDataclass(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        creds: Creds  # type: ignore[valid-type]

    class WithNamedTuple(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        creds: Pair

    class WithAlias(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        token: Token  # type: ignore[valid-type]

    for value, field in (
        (WithDataclass(creds=Creds(pydantic.SecretStr(SECRET))), "WithDataclass.creds"),
        (WithNamedTuple(creds=Pair(pydantic.SecretStr(SECRET))), "WithNamedTuple.creds"),
        (WithAlias(token=pydantic.SecretStr(SECRET)), "WithAlias.token"),
    ):
        with pytest.raises(EncodeError, match=rf"{field}` holds a pydantic secret") as info:
            codec.encode(value)
        assert SECRET not in str(info.value)


def test_a_pydantic_secret_excluded_from_the_dump_is_not_refused(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Config(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        host: str
        password: pydantic.SecretStr | None = pydantic.Field(default=None, exclude=True)  # type: ignore[name-defined]

    data = codec.encode(Config(host="db", password=SECRET))
    assert SECRET.encode() not in data
    assert codec.decode(data, Config) == Config(host="db")


def test_decode_errors_quote_no_stored_tag_key_or_validator_text(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")

    class A(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        kind: Literal["a"]

    class B(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        kind: Literal["b"]

    class Holder(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        item: A | B = pydantic.Field(discriminator="kind")

    class Checked(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        email: str

        @pydantic.field_validator("email")  # type: ignore[untyped-decorator]
        @classmethod
        def at_sign(cls, value: str) -> str:
            raise ValueError(f"not an address: {value}")  # an application quoting its input

    class Strict(msgspec.Struct, forbid_unknown_fields=True):
        name: str

    for stored, tp in (
        ({"item": {"kind": SECRET}}, Holder),
        ({"email": SECRET}, Checked),
        ({"name": "x", SECRET: 1}, Strict),
    ):
        with pytest.raises(DecodeError) as info:
            codec.decode(codec.encode(stored), tp)
        assert SECRET not in "".join(traceback.format_exception(info.value)), tp


def test_a_bytes_field_that_is_not_valid_hex_or_base64_is_not_quoted(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Hex(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        model_config = pydantic.ConfigDict(val_json_bytes="hex")
        blob: bytes

    class Base64(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        model_config = pydantic.ConfigDict(val_json_bytes="base64")
        blob: bytes

    # pydantic's messages name a character of the input: "Invalid character 'Z' at
    # position 0" (hex), "Invalid symbol 36, offset 24" (base64: the `$`).
    hex_doc, base64_doc = {"blob": "Zx" + SECRET}, {"blob": SECRET + "$"}
    cases: list[tuple[object, Any]] = [
        (hex_doc, Hex),
        ([hex_doc], list[Hex]),
        (base64_doc, Base64),
        ([base64_doc], list[Base64]),
    ]
    for value, tp in cases:
        with pytest.raises(DecodeError) as info:
            codec.decode(codec.encode(value), tp)
        message = str(info.value)
        assert "blob: bytes_invalid_encoding" in message
        assert "Invalid" not in message
        assert SECRET not in "".join(traceback.format_exception(info.value))


class _SelfValidated(msgspec.Struct):
    number: str

    def __post_init__(self) -> None:
        # Let through by msgspec as it is: no cause, no location.
        raise msgspec.ValidationError(f"Expected `int`, got `{self.number}`")


def test_a_types_own_error_text_is_not_quoted(codec: Codec) -> None:
    # msgspec puts the message of a TypeError or ValueError raised by the type's own
    # code (a __post_init__, a pydantic validator reached through the dec_hook) in its
    # ValidationError: the type of that exception and msgspec's location are shown.
    card_models = checked_card_models()
    card = {"number": SECRET}
    own = "raised by the type's own code"
    cases: list[tuple[object, Any, str]] = [
        (card, CheckedCard, f"ValueError {own}"),
        ([card], list[CheckedCard], f"ValueError {own} - at `$[0]`"),
        ({"k": card}, dict[str, CheckedCard], f"ValueError {own} - at `$[...]`"),
        (card, CheckedStruct, f"TypeError {own}"),
        ([card], list[CheckedStruct], f"TypeError {own} - at `$[0]`"),
        (card, _SelfValidated, f"ValidationError {own}"),
        ([card], list[_SelfValidated], f"ValidationError {own}"),
        ([card], card_models, "TypeError - at `$[0]`"),
    ]
    for value, tp, expected in cases:
        data = codec.encode(value)
        with pytest.raises(DecodeError) as info:
            codec.decode(data, tp)
        assert str(info.value).endswith(f"): {expected}"), tp
        assert SECRET not in "".join(traceback.format_exception(info.value)), tp
        decode_many = getattr(codec, "decode_many", None)
        if decode_many is not None:
            with pytest.raises(DecodeError) as many:
                decode_many([codec.encode([]), data], tp)
            assert SECRET not in str(many.value), tp
    # A summary the dec_hook built is kept whole: pydantic's own message and its location.
    with pytest.raises(DecodeError) as info:
        codec.decode(codec.encode([{"number": 5}]), card_models)
    assert str(info.value).endswith(
        "): 1 validation error(s): number: Input should be a valid string - at `$[0]`"
    )


def _frames_hold(exc: BaseException, secret: bytes) -> bool:
    """Whether a local of a library frame in ``exc``'s traceback, or its chain's, holds ``secret``.

    This file's frames are left out: the test itself holds the secret it wrote.
    """
    current: BaseException | None = exc
    while current is not None:
        tb = current.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == __file__:
                tb = tb.tb_next
                continue
            for value in tb.tb_frame.f_locals.values():
                if isinstance(value, (bytes, bytearray, memoryview)) and secret in bytes(value):
                    return True
                if isinstance(value, str) and secret.decode() in value:
                    return True
            tb = tb.tb_next
        current = current.__cause__ or current.__context__
    return False


@pytest.mark.parametrize("inner", [JsonCodec(), MsgspecCodec("msgpack")], ids=["json", "msgpack"])
def test_a_failed_inner_decode_leaves_no_plaintext_in_traceback_frames(inner: Codec) -> None:
    # Error trackers record each frame's locals: the decrypted value must not be one.
    codec = EncryptedCodec(inner, [EncryptedCodec.generate_key()])
    data = codec.encode({"card": SECRET})
    with pytest.raises(DecodeError) as info:
        codec.decode(data, int)
    assert not _frames_hold(info.value, SECRET.encode())
    assert "expected int" in str(info.value)


def test_a_pydantic_model_with_an_unhashable_type_argument_reads_back(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")
    from collections.abc import Callable as CallableABC

    class WithCallable(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        a: int
        hook: CallableABC[[int], int] | None = pydantic.Field(default=None, exclude=True)

    assert roundtrip(codec, WithCallable(a=1), WithCallable) == WithCallable(a=1)


class _Name(str):
    """A str subclass, as a typed-id library makes them."""


class _Count(int):
    """An int subclass."""


class _Ratio(float):
    """A float subclass."""


def test_str_int_and_float_subclasses_are_stored_and_read_back_as_the_base_type(codec: Codec) -> None:
    value = {"name": _Name("ada"), "n": _Count(3), "r": _Ratio(0.5), "tags": [_Name("x")]}
    back = roundtrip(codec, value)
    assert back == {"name": "ada", "n": 3, "r": 0.5, "tags": ["x"]}
    assert [type(back[k]) for k in ("name", "n", "r")] == [str, int, float]
    assert roundtrip(codec, _Name("ada"), str) == "ada"
    assert roundtrip(codec, _Count(7), int) == 7


class _FloatEnum(enum.Enum):
    HALF = 0.5
    ONE = 1.5


class _TupleEnum(enum.Enum):
    ORIGIN = (0, 0)
    UNIT = (1, 1)


class _MixedEnum(enum.Enum):
    ONE = 1
    TWO = "two"


@pytest.mark.parametrize("member", [_FloatEnum.ONE, _TupleEnum.UNIT, _MixedEnum.ONE, _MixedEnum.TWO])
def test_enums_of_floats_tuples_or_mixed_values_read_back_as_the_enum(
    codec: Codec, member: enum.Enum
) -> None:
    assert roundtrip(codec, member, type(member)) is member


def test_a_stored_value_that_is_no_member_of_such_an_enum_is_a_decode_error(codec: Codec) -> None:
    data = codec.encode(2.5)
    with pytest.raises(DecodeError, match="_FloatEnum") as info:
        codec.decode(data, _FloatEnum)
    assert "2.5" not in str(info.value)


def test_a_required_field_left_out_of_the_dump_is_refused_at_write_time(codec: Codec) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Account(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        name: str
        token: str = pydantic.Field(exclude=True)

    class Holder(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        accounts: list[Account]

    for value in (Account(name="a", token=SECRET), Holder(accounts=[Account(name="a", token=SECRET)])):
        with pytest.raises(EncodeError, match=r"Account\.token") as info:
            codec.encode(value)
        assert SECRET not in str(info.value)
