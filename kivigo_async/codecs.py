"""Codecs: how values become bytes in the store, and bytes become values again.

Every value written with :meth:`Client.set <kivigo_async.Client.set>` goes through
``codec.encode(value) -> bytes``; every value read goes through
``codec.decode(data, type) -> value``. ``type`` is what the caller asked for
(``client.get(key, User)``), or ``object`` when they gave none, meaning "untyped":
return whatever the format naturally produces (dicts, lists, str, int...).

Built-in codecs:

* :class:`JsonCodec` -- the default. orjson to encode, msgspec/pydantic for typed decode.
* :class:`MsgspecCodec` -- msgspec end to end, as JSON or MessagePack (binary-safe).
* :class:`CompressedCodec` -- zlib around another codec, for large values.
* :class:`EncryptedCodec` -- AES-256-GCM around another codec, with key rotation.

Wrappers compose; compress *before* encrypting (ciphertext does not compress):

    >>> codec = CompressedCodec(JsonCodec(), min_size=1024)
    >>> codec.decode(codec.encode({"n": 1}), object)
    {'n': 1}

Writing your own codec
----------------------
A codec is any object with these two methods (see :class:`Codec`); no base class needed.
Follow the same rules as the built-in codecs:

* raise :class:`~kivigo_async.errors.EncodeError` when a value cannot be encoded;
  name the offending *type*, never the value (it may be a secret);
* raise :class:`~kivigo_async.errors.DecodeError` when bytes cannot be decoded;
  say what was expected, never include the bytes;
* do not chain an exception whose text may quote the value (a validation error
  does): a log prints the chain with yours. Raise yours ``from None``;
  the client shows a CodecError's message as written (without its chain), and
  any other exception out of a codec by its type only;
* do not mention the key: codecs never see it, the client adds it to the message;
* keep per-call work small: codecs run on every get and set. Resolve per-type
  work once and cache it (as :class:`JsonCodec` does with its decoders).

A codec may also have ``decode_many(data: Sequence[bytes], type) -> list``, which
``Client.batch_get`` calls once per batch instead of ``decode`` once per value, and
``encode_many(values: Sequence) -> list[bytes]``, which ``Client.batch_set`` calls
the same way (:class:`JsonCodec` and :class:`MsgspecCodec` have both). When one
raises, the client goes through the values one by one, so the error names the key
that failed. Each returns one result per value, in order.

    >>> import pickle
    >>> from kivigo_async.errors import DecodeError, EncodeError
    >>> class PickleCodec:  # only for data you fully trust!
    ...     def encode(self, value):
    ...         try:
    ...             return pickle.dumps(value, protocol=5)
    ...         except Exception:
    ...             raise EncodeError(f"cannot pickle a value of type {type(value).__name__}") from None
    ...     def decode(self, data, type):
    ...         try:
    ...             value = pickle.loads(data)
    ...         except Exception:
    ...             raise DecodeError("expected a pickle") from None
    ...         if type is not object and not isinstance(value, type):
    ...             raise DecodeError(f"expected {type.__name__}, got {value.__class__.__name__}")
    ...         return value
    >>> isinstance(PickleCodec(), Codec)
    True
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import enum
import functools
import hashlib
import inspect
import os
import re
import types
import typing
import zlib
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from itertools import repeat
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    ClassVar,
    Final,
    Literal,
    Protocol,
    TypeVar,
    Union,
    get_args,
    get_origin,
    runtime_checkable,
)

import msgspec
import orjson

from .errors import CodecError, ConfigurationError, DecodeError, EncodeError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "Codec",
    "JsonCodec",
    "MsgspecCodec",
    "CompressedCodec",
    "EncryptedCodec",
]

T = TypeVar("T")

_Decoder = Callable[[bytes], Any]


@runtime_checkable
class Codec(Protocol):
    """Turns values into bytes and back. Any object with these two methods is a codec.

    ``decode(data, object)`` means "untyped": return what the format gives
    (dicts, lists, str, int, float, bool, None). Any other ``type`` asks for a
    value of that type, or a :class:`~kivigo_async.errors.DecodeError`.
    """

    def encode(self, value: Any) -> bytes:
        """Return ``value`` as bytes, or raise :class:`~kivigo_async.errors.EncodeError`."""
        ...

    def decode(self, data: bytes, type: type[T]) -> T:
        """Return ``data`` as a ``type``, or raise :class:`~kivigo_async.errors.DecodeError`."""
        ...


# -- shared helpers ----------------------------------------------------------


def _type_name(tp: Any) -> str:
    """A short, readable name for a type or type annotation (``int``, ``User``, ``list[int]``)."""
    args = get_args(tp)
    if not args:
        if tp is type(None):
            return "None"
        return tp.__qualname__ if isinstance(tp, type) else repr(tp).replace("typing.", "")
    origin = get_origin(tp)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is Union or origin is types.UnionType:
        return " | ".join(_type_name(a) for a in args)
    return f"{_type_name(origin)}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"


def _codec_failure(codec: object, exc: BaseException) -> str:
    """What an error message may say of ``exc``, raised by ``codec``.

    A :class:`~kivigo_async.errors.CodecError` says what its codec's author wrote for
    it, under the rule every codec follows (types, never values); anything else (a
    ValueError quoting the value it could not parse) is named by its type only.
    """
    if isinstance(exc, CodecError):
        return str(exc)
    return f"{type(codec).__name__} raised {type(exc).__name__}"


def _check_inner(inner: object, owner: str) -> None:
    if not (callable(getattr(inner, "encode", None)) and callable(getattr(inner, "decode", None))):
        raise ConfigurationError(
            f"{owner}: inner must be a codec (encode/decode), got {type(inner).__name__}"
        )


def _is_pydantic_model(tp: Any) -> bool:
    """True for pydantic v2 model classes, detected without importing pydantic."""
    return isinstance(tp, type) and callable(getattr(tp, "model_validate", None))


# msgspec quotes the offending value in a few messages ("Invalid enum value 'x'",
# "Invalid value 'x' - at `$.type`"); stored values may be secret, so drop it.
_MSGSPEC_VALUE_RE: Final = re.compile(r"^(Invalid (?:enum )?value) .*?(?= - at `\$[^`]*`$|$)", re.DOTALL)
# A Struct that forbids unknown fields names the stored key it did not expect.
_MSGSPEC_UNKNOWN_FIELD_RE: Final = re.compile(
    r"^(Object contains unknown field) `.*?`(?= - at `\$[^`]*`$|$)", re.DOTALL
)
# The location msgspec appends to a message ("- at `$.items[0]`"; dict keys are `[...]`).
_MSGSPEC_PATH_RE: Final = re.compile(r" - at (?:`key` in )?`\$[^`]*`")
#: pydantic error types whose message may quote the input: the tag read from it, a
#: character of it, or the text of an application's code (``ValueError(f"bad {v}")``).
_PYDANTIC_QUOTING: Final = frozenset(
    {
        "union_tag_invalid",
        "value_error",
        "assertion_error",
        "uuid_parsing",
        "bytes_invalid_encoding",  # a hex or base64 field: "Invalid character 'x' at position 0"
        "url_parsing",
        "url_syntax_violation",
        "get_attribute_error",
        "iteration_error",
    }
)


@functools.lru_cache(maxsize=1)
def _pydantic_builtin_errors() -> frozenset[str]:
    """pydantic's own error types (imported only once a pydantic error is at hand)."""
    from pydantic_core.core_schema import ErrorType

    return frozenset(get_args(ErrorType))


def _declared_names(tp: Any) -> set[str]:
    """The names the code declares in ``tp`` and every type reachable from it:
    class names, field names and aliases. Text from the code, never from stored data."""
    names = {"[key]"}  # pydantic's mark of a dict key that failed
    seen: set[int] = set()
    todo = [tp]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        todo.extend(get_args(current))
        if not isinstance(current, type):
            continue
        names.add(current.__name__)  # pydantic names a union's member by it
        fields = getattr(current, "__pydantic_fields__", None)
        if not isinstance(fields, Mapping):
            fields = getattr(current, "model_fields", None)
        if isinstance(fields, Mapping):
            for name, info in fields.items():
                names.add(name)
                for alias in (getattr(info, "alias", None), getattr(info, "validation_alias", None)):
                    if isinstance(alias, str):
                        names.add(alias)
                todo.append(getattr(info, "annotation", None))
            continue
        try:
            hints = typing.get_type_hints(current)  # dataclasses, TypedDicts, Structs...
        except Exception:  # forward references that do not resolve: nothing known
            continue
        names.update(hints)
        todo.extend(hints.values())
    return names


class _Summary(ValueError):
    """Raised by the ``dec_hook`` with a summary built by :func:`_validation_summary`.

    msgspec wraps it in its ValidationError, as the cause: the one cause whose
    message is trusted.
    """


def _raised_by_msgspec(exc: BaseException) -> bool:
    """Whether msgspec itself raised ``exc``, not Python code it called (a ``__post_init__``)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    # msgspec is compiled: what it raises ends its traceback in the frame here that called it.
    return tb.tb_frame.f_globals.get("__name__") == __name__


def _code_error_summary(exc: msgspec.DecodeError) -> str:
    """The summary of an error raised by a type's own code inside msgspec: its type, and
    where msgspec met it when the message says so."""
    cause = exc.__cause__
    if cause is None:  # a msgspec.ValidationError raised by that code, let through as is
        return f"{type(exc).__name__} raised by the type's own code"
    # msgspec's message is str(cause), then the location it appends.
    message = str(exc)
    try:
        text = str(cause)
    except Exception:
        text = None
    path = message[len(text) :] if text is not None and message.startswith(text) else ""
    if not _MSGSPEC_PATH_RE.fullmatch(path):
        path = ""
    return f"{type(cause).__name__} raised by the type's own code{path}"


def _validation_summary(exc: BaseException, tp: Any = object) -> str:
    """A message for a decode failure (``tp`` was asked for) that carries no stored data.

    msgspec and orjson messages only hold positions, paths and types (minus the
    quoted values removed above), but msgspec also turns a TypeError or ValueError
    raised by the type's own code (a ``__post_init__``, the ``dec_hook``) into its
    ValidationError with that code's message (``ValueError(f"bad card {n}")``): such
    an error is shown by type and location only, unless it is our ``dec_hook``'s
    :class:`_Summary`. pydantic's ``str(ValidationError)`` includes the
    input, so it is rebuilt from ``errors(include_input=False)``; the location keeps
    list indexes and the names ``tp`` declares, not the keys of a stored dict
    (``[...]``, as msgspec shows them). Messages of anything else are not trusted:
    only the exception type is shown.
    """
    if isinstance(exc, msgspec.DecodeError):
        if type(exc.__cause__) is _Summary:
            return str(exc)
        if exc.__cause__ is not None or not _raised_by_msgspec(exc):
            return _code_error_summary(exc)
    if isinstance(exc, (msgspec.DecodeError, orjson.JSONDecodeError)):
        return _MSGSPEC_UNKNOWN_FIELD_RE.sub(r"\1", _MSGSPEC_VALUE_RE.sub(r"\1", str(exc)))
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic.ValidationError
        try:
            details = errors(include_url=False, include_input=False, include_context=False)
            names = _declared_names(tp)
            parts = []
            for d in details:
                loc = ".".join(str(p) if type(p) is int or p in names else "[...]" for p in d.get("loc", ()))
                kind = d.get("type", "")
                # pydantic's own messages, but for those that quote; an application's
                # PydanticCustomError may quote anything: its type names it.
                trusted = kind in _pydantic_builtin_errors() and kind not in _PYDANTIC_QUOTING
                msg = d.get("msg", "") if trusted else kind
                parts.append(f"{loc or '<root>'}: {msg}")
            return f"{len(parts)} validation error(s): " + "; ".join(parts)
        except Exception:
            pass
    return type(exc).__name__


def _decode_error(exc: BaseException, tp: Any, fmt: str) -> DecodeError:
    if tp is object or tp is Any:
        return DecodeError(f"expected a {fmt} document: {_validation_summary(exc)}")
    return DecodeError(f"expected {_type_name(tp)} ({fmt}): {_validation_summary(exc, tp)}")


def _is_pydantic_secret(tp: Any) -> bool:
    tp = get_origin(tp) or tp  # Secret[int] is a generic alias of the Secret class
    return isinstance(tp, type) and any(
        c.__module__ == "pydantic.types"
        and c.__name__ in ("_SecretBase", "Secret", "SecretStr", "SecretBytes")
        for c in tp.__mro__
    )


def _has_serializer(metadata: Sequence[object]) -> bool:
    return any(type(m).__name__ in ("PlainSerializer", "WrapSerializer") for m in metadata)


def _masked_field(cls: Any, seen: set[type]) -> str | None:
    """The first field of pydantic model (or pydantic dataclass) ``cls`` that its JSON dump
    would mask, or ``None``."""
    decorators = getattr(cls, "__pydantic_decorators__", None)
    if decorators is not None and decorators.model_serializers:
        return None  # the model serialises itself: its author decides
    serialized: set[str] = set()
    if decorators is not None:
        for decorator in decorators.field_serializers.values():
            serialized.update(decorator.info.fields)
    fields = getattr(cls, "__pydantic_fields__", None)
    if not isinstance(fields, Mapping):
        fields = getattr(cls, "model_fields", {})
    for name, info in fields.items():
        if getattr(info, "exclude", None) is True:
            continue  # never written, so never masked
        if name in serialized or "*" in serialized or _has_serializer(info.metadata):
            continue
        if _masks(info.annotation, seen):
            return str(name)
    return None


def _first_sight(tp: Any, seen: set[type]) -> bool:
    """Whether ``tp`` is met for the first time (then remembered): recursive types end."""
    if tp in seen:
        return False
    seen.add(tp)
    return True


def _masks(tp: Any, seen: set[type]) -> bool:
    if _is_pydantic_secret(tp):
        return True
    if get_origin(tp) is Annotated and _has_serializer(tp.__metadata__):
        return False
    if _is_pydantic_model(tp) or isinstance(getattr(tp, "__pydantic_fields__", None), Mapping):
        # A model, or a pydantic dataclass: fields with their serializers alike.
        return _first_sight(tp, seen) and _masked_field(tp, seen) is not None
    value = getattr(tp, "__value__", None)
    if value is not None and type(tp).__name__ == "TypeAliasType":  # `type Token = SecretStr`
        return _first_sight(tp, seen) and _masks(value, seen)
    if isinstance(tp, type) and (
        (issubclass(tp, dict) and hasattr(tp, "__total__"))  # a TypedDict
        or dataclasses.is_dataclass(tp)
        or (issubclass(tp, tuple) and hasattr(tp, "_fields"))  # a NamedTuple
    ):
        # pydantic dumps these field by field, masking secrets as in a model.
        if not _first_sight(tp, seen):
            return False
        try:
            # With extras: Annotated[SecretStr, PlainSerializer(...)] reveals itself.
            hints = typing.get_type_hints(tp, include_extras=True)
        except Exception:  # forward references that do not resolve: nothing known
            return False
        return any(_masks(hint, seen) for hint in hints.values())
    return any(_masks(arg, seen) for arg in get_args(tp))


def _models_in(tp: Any) -> list[type]:
    """The pydantic models an annotation names, at any depth of its arguments."""
    if _is_pydantic_model(tp):
        return [tp]
    return [model for arg in get_args(tp) for model in _models_in(arg)]


def _dropped_field(cls: Any, seen: set[type]) -> str | None:
    """``Model.field`` for the first required field that the JSON dump of model ``cls`` (or
    of a model in its fields) leaves out (``Field(exclude=True)``), or ``None``.

    Such a value is written without the field, and no read of the model can succeed.
    """
    decorators = getattr(cls, "__pydantic_decorators__", None)
    if decorators is not None and decorators.model_serializers:
        return None  # the model serialises itself: its author decides
    fields = getattr(cls, "model_fields", None)
    for name, info in fields.items() if isinstance(fields, Mapping) else ():
        if getattr(info, "exclude", None) is True:
            if callable(getattr(info, "is_required", None)) and info.is_required():
                return f"{_type_name(cls)}.{name}"
            continue
        for model in _models_in(info.annotation):
            if _first_sight(model, seen) and (dropped := _dropped_field(model, seen)) is not None:
                return dropped
    return None


def _dump_refusal(cls: Any) -> str | None:
    """Why a model of class ``cls`` must not be written (``None``: it may be)."""
    masked = _masked_field(cls, {cls})
    if masked is not None:
        # Stored as pydantic's mask, the secret would be lost without an error.
        return (
            f"`{_type_name(cls)}.{masked}` holds a pydantic secret, which model_dump(mode='json') "
            "writes as '**********': give the field a field_serializer that returns the secret "
            "value (and consider EncryptedCodec)"
        )
    dropped = _dropped_field(cls, {cls})
    if dropped is not None:
        return (
            f"`{dropped}` is required but excluded from the dump (Field(exclude=True)): the value "
            "would be stored without it, and could never be read back as the model; give the "
            "field a default, or do not exclude it"
        )
    return None


# pydantic model class -> why its values are refused (None: they are not). Checked
# once per class.
_DUMP_REFUSALS: dict[type, str | None] = {}


def _pydantic_dump(obj: Any) -> Any:
    cls = type(obj)
    try:
        refusal = _DUMP_REFUSALS[cls]
    except KeyError:
        refusal = _DUMP_REFUSALS[cls] = _dump_refusal(cls)
    if refusal is not None:
        raise TypeError(refusal)
    if _reads_by_name(cls):
        # Written and read by field name: an alias for one direction only
        # (serialization_alias, validation_alias) would otherwise drop the field's
        # value on the way back. A value pydantic cannot serialise as its type (set
        # on an instance without validation) fails here rather than being stored
        # for every read to fail on, and its warning (which quotes it) is not logged.
        # round_trip: what validation reads back (a Json[...] field as its string,
        # no computed fields, which a model that forbids extras would refuse).
        return obj.model_dump(mode="json", by_alias=False, warnings="error", round_trip=True)
    # Older pydantic reads aliases only: written by alias.
    return obj.model_dump(mode="json", by_alias=True, round_trip=True)


_BY_NAME: dict[type, bool] = {}


def _reads_by_name(cls: type) -> bool:
    """Whether model ``cls`` validates by field name on request (``by_name``: pydantic 2.11+)."""
    known = _BY_NAME.get(cls)
    if known is None:
        try:
            signature = inspect.signature(cls.model_validate_json)  # type: ignore[attr-defined]
            known = "by_name" in signature.parameters
        except (TypeError, ValueError):  # no signature to read
            known = False
        _BY_NAME[cls] = known
    return known


def _alias_collides(tp: Any, seen: set[int]) -> bool:
    """Whether an alias in model ``tp`` (or a model inside it) is another field's name."""
    if id(tp) in seen:  # by id: a type argument may be unhashable (Callable's [int])
        return False
    seen.add(id(tp))
    fields = getattr(tp, "model_fields", None) if _is_pydantic_model(tp) else None
    if isinstance(fields, Mapping):
        for name, info in fields.items():
            for alias in (getattr(info, "alias", None), getattr(info, "validation_alias", None)):
                if isinstance(alias, str) and alias != name and alias in fields:
                    return True
        todo = [info.annotation for info in fields.values()]
    else:
        todo = list(get_args(tp))
    return any(_alias_collides(inner, seen) for inner in todo)


def _pydantic_reader(tp: Any) -> Callable[[bytes], Any]:
    """``tp.model_validate_json``, reading field names as :func:`_pydantic_dump` writes them."""
    if _reads_by_name(tp):
        if _alias_collides(tp, set()):
            # A key that is one field's name and another's alias would be read as
            # either: read by name only, as written.
            return functools.partial(tp.model_validate_json, by_alias=False, by_name=True)
        # Names as written now, aliases as written before (by_alias): both read back.
        return functools.partial(tp.model_validate_json, by_alias=True, by_name=True)
    read: Callable[[bytes], Any] = tp.model_validate_json
    return read


#: pydantic model class -> its reader from plain values, built once (the dec_hook
#: runs once per nested model); one table per way of writing them as JSON.
_PLAIN_READERS: dict[type, Callable[[Any], Any]] = {}
_EXACT_READERS: dict[type, Callable[[Any], Any]] = {}


@functools.lru_cache(maxsize=1)
def _exact_json_encoder() -> Callable[[Any], bytes]:
    """A JSON writer of plain values that writes NaN and infinity as ``NaN``/``Infinity``,
    which ``model_validate_json`` reads back (msgspec's writes ``null``)."""
    try:
        from pydantic_core import SchemaSerializer, core_schema
    except ImportError:  # a duck-typed model without pydantic: JSON's null it is
        return msgspec.json.encode
    # Built once: pydantic_core.to_json(..., inf_nan_mode=) infers a serializer per call.
    config = core_schema.CoreConfig(ser_json_inf_nan="constants")
    encode: Callable[[Any], bytes] = SchemaSerializer(core_schema.any_schema(), config).to_json
    return encode


def _pydantic_from_plain(tp: Any, exact_floats: bool = False) -> Callable[[Any], Any]:
    """A reader of ``tp`` from plain values (msgpack, or nested in a msgspec type).

    They are what the JSON dump was, so they are validated by JSON's rules: a strict
    model takes an ISO string for a datetime there, not in Python mode. Values read
    from MessagePack (``exact_floats``) may hold NaN or infinity, which the model
    was given: they go through a writer that keeps them, about a microsecond
    slower than msgspec's; values read from JSON cannot hold them.
    """
    readers = _EXACT_READERS if exact_floats else _PLAIN_READERS
    reader = readers.get(tp)
    if reader is None:
        read = _pydantic_reader(tp)
        encode = _exact_json_encoder() if exact_floats else msgspec.json.encode
        reader = readers[tp] = lambda obj: read(encode(obj))
    return reader


def _unsupported_by_msgspec(obj: Any) -> Any:
    raise TypeError(f"unsupported type `{_type_name(type(obj))}`")


def _resolve_msgspec_hook(cls: type) -> Callable[[Any], Any]:
    if callable(getattr(cls, "model_dump", None)):
        return _pydantic_dump
    # Subclasses of str, int and float (typed ids, say), which orjson writes as their base
    # type: written the same way here, so the two codecs store the same values. The
    # base type's own method, not str()/int(), which a subclass may override.
    if issubclass(cls, str):
        return str.__str__
    if issubclass(cls, int):
        return int.__index__
    if issubclass(cls, float):
        return float.__float__
    return _unsupported_by_msgspec


# One converter per type, resolved on first sight; msgspec calls the hook only for
# the types it does not handle natively.
_MSGSPEC_HOOKS: dict[type, Callable[[Any], Any]] = {}


def _msgspec_enc_hook(obj: Any) -> Any:
    """msgspec ``enc_hook``: pydantic models (duck-typed), str, int and float subclasses
    (as the base type); everything else is unsupported."""
    cls = type(obj)
    convert = _MSGSPEC_HOOKS.get(cls)
    if convert is None:
        convert = _MSGSPEC_HOOKS[cls] = _resolve_msgspec_hook(cls)
    return convert(obj)


def _nested_model_hook(exact_floats: bool) -> Callable[[Any, Any], Any]:
    """A msgspec ``dec_hook`` that lets pydantic models appear inside msgspec types (``list[User]``)."""

    def dec_hook(tp: Any, obj: Any) -> Any:
        if not _is_pydantic_model(tp):
            raise NotImplementedError
        try:
            return _pydantic_from_plain(tp, exact_floats)(obj)
        except Exception as exc:
            # msgspec puts the message of a TypeError or ValueError from here in its
            # own (pydantic lets a validator's TypeError through, its text and all):
            # only a summary is raised, as the one exception type whose message is trusted.
            summary = _validation_summary(exc, tp)
        raise _Summary(summary) from None

    return dec_hook


_msgspec_dec_hook: Final = _nested_model_hook(exact_floats=False)
#: For MessagePack decoders, whose floats may be NaN or infinity.
_msgpack_dec_hook: Final = _nested_model_hook(exact_floats=True)


def _hashable(value: Any) -> Any:
    """``value`` (as a format reads it back untyped) as a key: arrays as tuples."""
    if isinstance(value, list):
        return tuple(map(_hashable, value))
    if isinstance(value, dict):
        return frozenset((_hashable(k), _hashable(v)) for k, v in value.items())
    return value


def _enum_decoder(tp: type[enum.Enum], untyped: _Decoder, encode: Callable[[Any], bytes]) -> _Decoder:
    """A decoder of an enum whose values msgspec cannot read (floats, tuples, mixed types).

    Each member is looked up by its value as written and read back untyped (a tuple
    comes back as a list), so every member that could be written reads back.
    """
    members = {_hashable(untyped(encode(member))): member for member in tp.__members__.values()}
    name = _type_name(tp)

    def decode(data: bytes) -> Any:
        value = _hashable(untyped(data))  # malformed data: msgspec's own error
        try:
            return members[value]
        except (KeyError, TypeError):
            pass
        # With a _Summary as its cause, the one message shown as written; no value in it.
        raise msgspec.ValidationError(f"Invalid enum value: not a value of {name}") from _Summary()

    return decode


def _typed_decoder(
    new_decoder: Callable[..., Any],
    tp: Any,
    dec_hook: Callable[[Any, Any], Any],
    encode: Callable[[Any], bytes],
) -> _Decoder:
    """A msgspec decoder for ``tp``; a type msgspec cannot build one for is a DecodeError.

    ``encode`` is the codec's writer: an enum msgspec cannot read is read by the
    values it writes.
    """
    try:
        decode: _Decoder = new_decoder(tp, dec_hook=dec_hook).decode
    except (TypeError, ValueError) as exc:
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            # msgspec reads only enums of all-str or all-int values; the others are
            # written all the same (by value), and must read back as written.
            with contextlib.suppress(Exception):  # a value that cannot be written
                return _enum_decoder(tp, new_decoder().decode, encode)
        raise DecodeError(f"cannot decode into {_type_name(tp)}: not a supported type") from exc
    except NameError as exc:  # a forward reference in the type that does not resolve
        raise DecodeError(f"cannot decode into {_type_name(tp)}: {exc}") from exc
    return decode


# -- JsonCodec ---------------------------------------------------------------


class _Unsupported(TypeError):
    """Raised by the orjson ``default`` hook; its message ends up in the EncodeError."""


_STRUCT_JSON_ENCODER: Final = msgspec.json.Encoder(enc_hook=_msgspec_enc_hook)


def _struct_to_json(obj: Any) -> orjson.Fragment:
    # Serialised by msgspec (its JSON rules, fastest path) and spliced in verbatim.
    return orjson.Fragment(_STRUCT_JSON_ENCODER.encode(obj))


def _reject_bytes(obj: Any) -> Any:
    raise _Unsupported(
        f"`{type(obj).__name__}` is not supported: JSON has no binary type; store raw bytes with "
        "Client.set_raw(), or use MsgspecCodec('msgpack')"
    )


def _resolve_json_default(cls: type) -> Callable[[Any], Any]:
    if issubclass(cls, msgspec.Struct):
        return _struct_to_json
    if callable(getattr(cls, "model_dump", None)):
        return _pydantic_dump
    if dataclasses.is_dataclass(cls):
        # Not orjson's own: it leaves out fields whose names start with "_", which a
        # typed read then misses (or refuses, for a field without a default).
        return _struct_to_json
    if issubclass(cls, Decimal):
        return str
    if issubclass(cls, float):  # orjson writes str and int subclasses, not float ones
        return float.__float__
    if issubclass(cls, (set, frozenset, tuple)):  # tuple: NamedTuple and other subclasses
        return list
    if issubclass(cls, (bytes, bytearray, memoryview)):
        return _reject_bytes
    name = _type_name(cls)

    def unsupported(obj: Any) -> Any:
        raise _Unsupported(f"unsupported type `{name}`")

    return unsupported


# One converter per type, resolved on first sight; orjson only calls the hook for
# types it does not handle natively, so this is off the common path anyway.
_JSON_DEFAULTS: dict[type, Callable[[Any], Any]] = {}


def _json_default(obj: Any) -> Any:
    cls = type(obj)
    convert = _JSON_DEFAULTS.get(cls)
    if convert is None:
        convert = _JSON_DEFAULTS[cls] = _resolve_json_default(cls)
    return convert(obj)


_JSON_OPTIONS: Final = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS
#: JsonCodec's writer, without a subclass's changes to encode (a prefix, say).
_orjson_encode: Final = functools.partial(orjson.dumps, default=_json_default, option=_JSON_OPTIONS)


class _DecoderCache:
    """``decode`` and ``decode_many`` over one decoder per requested type, built once; ``encode_many``.

    Subclasses provide ``_resolve(type)`` (build the decoder), ``_decoders`` (the
    cache), ``_label`` (the format's name, for error messages), and ``encode``
    beside ``_encode_all`` (the same encoding for a whole batch, looping in C).
    """

    __slots__ = ()
    _decoders: dict[Any, _Decoder]
    _label: str
    #: The encode that _encode_all stands for: the one defined beside it.
    _plain_encode: ClassVar[Callable[..., bytes]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_encode_all" in cls.__dict__:
            cls._plain_encode = cls.__dict__["encode"]

    def encode(self, value: Any) -> bytes:
        raise NotImplementedError

    def _encode_all(self, values: Sequence[Any]) -> list[bytes]:
        raise NotImplementedError

    def encode_many(self, values: Sequence[Any]) -> list[bytes]:
        """Encode every item of ``values``, in order: one call for a whole batch.

        Raises:
            EncodeError: an item cannot be encoded (the first one, as ``encode`` says it).
        """
        cls = builtins.type(self)
        if cls.encode is cls._plain_encode:
            try:
                return self._encode_all(values)
            except Exception:
                pass  # again one by one: encode() raises the error, naming the type that failed
        # Also the way for a subclass that changed encode (to add a version prefix, say).
        return [self.encode(value) for value in values]

    def _resolve(self, tp: Any) -> _Decoder:
        raise NotImplementedError

    def _decoder(self, tp: Any) -> _Decoder:
        try:
            return self._decoders[tp]
        except (KeyError, TypeError):  # TypeError: an unhashable annotation, decoded uncached
            return self._resolve(tp)

    def decode(self, data: bytes, type: type[T]) -> T:
        """Return ``data`` decoded as ``type`` (``object``: untyped).

        Raises:
            DecodeError: ``data`` is malformed, or does not match ``type``.
        """
        # Inlined _decoder(): this runs on every get, where a call more is measurable.
        try:
            decoder = self._decoders[type]
        except (KeyError, TypeError):  # TypeError: an unhashable annotation, decoded uncached
            decoder = self._resolve(type)
        try:
            result: T = decoder(data)
        except Exception as exc:
            error = _decode_error(exc, type, self._label)
        else:
            return result
        # Raised here, outside the handler: the decoder's exception, whose text may
        # quote the stored value, is neither the cause nor the context a log prints.
        raise error

    def decode_many(self, data: Sequence[bytes], type: type[T]) -> list[T]:
        """Decode every item of ``data`` as ``type``, in order: one call for a whole batch.

        Raises:
            DecodeError: an item is malformed or does not match ``type`` (the message
                does not say which: the client decodes one by one to name the key).
        """
        if builtins.type(self).decode is not _DecoderCache.decode:
            # A subclass changed decode (to upgrade old data, say): batches must go through it.
            return [self.decode(item, type) for item in data]
        decoder = self._decoder(type)
        try:
            # map() keeps the per-item loop in C; that is the point of this method.
            return list(map(decoder, data))
        except Exception as exc:
            error = _decode_error(exc, type, self._label)
        raise error  # outside the handler, as in decode()


class JsonCodec(_DecoderCache):
    """The default codec: JSON via `orjson`_ to encode, `msgspec`_ (or pydantic) to decode typed.

    Encodes natively: ``str``, ``int`` (64-bit), ``float``, ``bool``, ``None``, ``dict``,
    ``list``, ``tuple``, ``datetime``/``date``/``time``, ``UUID``, ``Enum`` and
    ``TypedDict`` s; plus dataclasses and msgspec ``Struct`` s (through msgspec), pydantic
    models (``model_dump(mode="json")``, by field name), ``Decimal`` (as a string),
    ``set``/``frozenset`` (as a list) and ``NamedTuple`` s.

    ``decode(data, object)`` returns plain JSON values. Any other type is validated:
    pydantic model classes through ``model_validate_json``, everything else through a
    ``msgspec.json.Decoder`` built once per type (Structs, dataclasses, TypedDicts,
    ``datetime``, ``UUID``, ``Decimal``, ``list[int]``, ``User | None``...).

    Choices worth knowing:

    * **bytes** are rejected with an :class:`~kivigo_async.errors.EncodeError`: JSON has no
      binary type, and a base64 string would come back as ``str`` from an untyped read.
      Use ``Client.set_raw``/``get_raw``, or ``MsgspecCodec("msgpack")``. (Inside a msgspec
      ``Struct``, msgspec's own rule applies: bytes become base64.)
    * **NaN and ±infinity** are written as ``null`` (the orjson and msgspec behaviour;
      JSON cannot represent them). Rejecting them would mean walking every value in
      Python on every write. A typed read of a ``float`` field then fails loudly with a
      :class:`~kivigo_async.errors.DecodeError`; ``MsgspecCodec("msgpack")`` keeps them exactly.
    * **Non-string dict keys** (int, float, UUID, datetime, Enum) are written as
      strings: an untyped read returns ``{"1": ...}``, a typed read (``dict[int, str]``)
      returns ``{1: ...}``. ``bool`` and ``None`` keys become ``"true"``, ``"false"``
      and ``"null"``, which no typed read turns back. Two keys that are written as the
      same string (``1`` and ``"1"``) are both written, and a read keeps the last one only.
    * **Subclasses of str, int and float** are written as their base type, and read
      back as it (so by :class:`MsgspecCodec` too).
    * **Enums** are written by value. One whose values are not all ``str`` or all
      ``int`` (floats, tuples, mixed) reads back when the enum itself is asked for,
      not nested in another type (``list[E]``, a Struct field), which is refused.
    * **Dataclasses** are written by msgspec, as Structs are: every field, including
      those whose names start with ``_`` (orjson's own writer leaves them out).
    * **ints beyond 64 bits** are rejected (use ``MsgspecCodec("json")``), except inside
      a dataclass or a Struct, which msgspec writes by its own rules.
    * **UTC offsets with seconds**: an aware ``datetime`` whose offset is not a whole
      number of minutes (a zone's old local mean time, such as ``Europe/Amsterdam``
      before 1938, or a ``timezone`` built with seconds) is written with the offset
      rounded to the minute, as orjson does: it reads back up to 30 seconds off,
      without an error. Checking every datetime would slow every write; convert such
      values to UTC first, or use ``MsgspecCodec("msgpack")``, which keeps the instant.

    Example:
        >>> import msgspec
        >>> class User(msgspec.Struct):
        ...     name: str
        ...     age: int
        >>> codec = JsonCodec()
        >>> data = codec.encode(User("ada", 36))
        >>> data
        b'{"name":"ada","age":36}'
        >>> codec.decode(data, User)
        User(name='ada', age=36)
        >>> codec.decode(data, object)
        {'name': 'ada', 'age': 36}

    .. _orjson: https://github.com/ijl/orjson
    .. _msgspec: https://jcristharif.com/msgspec/
    """

    __slots__ = ("_decoders",)
    _label = "JSON"

    def __init__(self) -> None:
        self._decoders: dict[Any, _Decoder] = {}

    def __repr__(self) -> str:
        return "JsonCodec()"

    def encode(self, value: Any) -> bytes:
        """Return ``value`` as JSON bytes.

        Raises:
            EncodeError: the value (or something inside it) is not JSON-serialisable.
        """
        try:
            return orjson.dumps(value, default=_json_default, option=_JSON_OPTIONS)
        except Exception as exc:
            cause = exc.__cause__
            if isinstance(cause, TypeError):  # from our hooks or msgspec: names the type
                detail = str(cause)
            elif cause is not None:  # e.g. model_dump() failed: trust only the exception type
                detail = f"{exc} ({type(cause).__name__})"
            else:  # orjson's own messages name a type or a limit, never the value
                detail = str(exc)
            error = EncodeError(f"cannot encode a value of type {_type_name(type(value))} as JSON: {detail}")
        # Raised outside the handler and without a cause: the chain (a pydantic
        # serialization error, say) may quote the value, and a log prints it.
        raise error from None

    def _encode_all(self, values: Sequence[Any]) -> list[bytes]:
        # Positional default and option: a partial with keywords would build a dict per item.
        return list(map(orjson.dumps, values, repeat(_json_default), repeat(_JSON_OPTIONS)))

    def _resolve(self, tp: Any) -> _Decoder:
        decoder: _Decoder
        if tp is object or tp is Any:
            # msgspec's untyped decoder is faster than orjson.loads here and keeps
            # integers wider than 64 bits exact instead of turning them into floats.
            decoder = msgspec.json.Decoder().decode
        elif _is_pydantic_model(tp) and callable(getattr(tp, "model_validate_json", None)):
            decoder = _pydantic_reader(tp)
        else:
            decoder = _typed_decoder(msgspec.json.Decoder, tp, _msgspec_dec_hook, _orjson_encode)
        with contextlib.suppress(TypeError):  # unhashable annotation: not cached
            self._decoders[tp] = decoder
        return decoder


# -- MsgspecCodec ------------------------------------------------------------


class MsgspecCodec(_DecoderCache):
    """A codec built on `msgspec`_ alone, as JSON or MessagePack.

    ``"json"`` follows msgspec's JSON rules: ``bytes`` become base64 strings (a typed
    read as ``bytes`` decodes them back), ints of any size, NaN/infinity as ``null``,
    and an aware ``datetime`` whose UTC offset has seconds is written with the offset
    rounded to the minute, so it reads back up to 30 seconds off (as with
    :class:`JsonCodec`: store such values in UTC, or as MessagePack).
    ``"msgpack"`` is compact and binary-safe: ``bytes``, NaN and infinity round-trip
    exactly, and aware datetimes are stored as timestamps (read back in UTC).
    Subclasses of ``str``, ``int`` and ``float`` are written and read back as their
    base type, as by :class:`JsonCodec`.

    Typed decoding accepts every type msgspec does (Structs, dataclasses, TypedDicts,
    ``datetime``, ``UUID``, ``Decimal``, ``list[int]``...), with a decoder built once
    per type. pydantic models are written with ``model_dump(mode="json")`` (by field
    name) and read with ``model_validate_json``, by JSON's rules in both formats.

    Args:
        format: ``"json"`` (default) or ``"msgpack"``.

    Example:
        >>> codec = MsgspecCodec("msgpack")
        >>> codec.decode(codec.encode({"blob": b"\\x00\\xff"}), object)
        {'blob': b'\\x00\\xff'}
        >>> codec.decode(codec.encode([1, 2]), list[int])
        [1, 2]

    .. _msgspec: https://jcristharif.com/msgspec/
    """

    __slots__ = ("_dec_hook", "_decoders", "_encode", "_format", "_label", "_new_decoder")

    def __init__(self, format: Literal["json", "msgpack"] = "json") -> None:
        self._new_decoder: Callable[..., msgspec.json.Decoder[Any] | msgspec.msgpack.Decoder[Any]]
        if format == "json":
            self._encode = msgspec.json.Encoder(enc_hook=_msgspec_enc_hook).encode
            self._new_decoder = msgspec.json.Decoder
            self._dec_hook: Callable[[Any, Any], Any] = _msgspec_dec_hook
            self._label = "JSON"
        elif format == "msgpack":
            self._encode = msgspec.msgpack.Encoder(enc_hook=_msgspec_enc_hook).encode
            self._new_decoder = msgspec.msgpack.Decoder
            self._dec_hook = _msgpack_dec_hook
            self._label = "MessagePack"
        else:
            raise ConfigurationError(f"MsgspecCodec: format must be 'json' or 'msgpack', got {format!r}")
        self._format: Literal["json", "msgpack"] = format
        self._decoders: dict[Any, _Decoder] = {}

    def __repr__(self) -> str:
        return f"MsgspecCodec(format={self._format!r})"

    @property
    def format(self) -> Literal["json", "msgpack"]:
        """The wire format, ``"json"`` or ``"msgpack"``."""
        return self._format

    def encode(self, value: Any) -> bytes:
        """Return ``value`` encoded with msgspec.

        Raises:
            EncodeError: the value (or something inside it) is not supported.
        """
        try:
            return self._encode(value)
        except Exception as exc:
            detail = str(exc) if isinstance(exc, (TypeError, OverflowError, msgspec.EncodeError)) else ""
            error = EncodeError(
                f"cannot encode a value of type {_type_name(type(value))} as {self._label}: "
                f"{detail or type(exc).__name__}"
            )
        raise error from None  # outside the handler, as in JsonCodec.encode

    def _encode_all(self, values: Sequence[Any]) -> list[bytes]:
        return list(map(self._encode, values))

    def _resolve(self, tp: Any) -> _Decoder:
        decoder: _Decoder
        if tp is object or tp is Any:
            decoder = self._new_decoder().decode
        elif _is_pydantic_model(tp):
            if self._format == "json":
                decoder = _pydantic_reader(tp)
            else:
                untyped = self._new_decoder().decode
                validate = _pydantic_from_plain(tp, exact_floats=True)

                def decoder(data: bytes) -> Any:
                    return validate(untyped(data))
        else:
            decoder = _typed_decoder(self._new_decoder, tp, self._dec_hook, self._encode)
        with contextlib.suppress(TypeError):  # unhashable annotation: not cached
            self._decoders[tp] = decoder
        return decoder


# -- CompressedCodec ---------------------------------------------------------

_RAW: Final = b"\x00"
_ZLIB: Final = b"\x01"


class CompressedCodec:
    """Compresses the output of another codec when it is large enough to pay off.

    Each stored value starts with one header byte: ``0x00`` for a value stored as is,
    ``0x01`` for zlib. Values shorter than ``min_size`` bytes, or that do not shrink,
    are stored as is, so small values cost one byte and no CPU. New algorithms can be
    added as new header bytes without breaking stored data.

    Args:
        inner: the codec whose output is compressed (e.g. :class:`JsonCodec`).
        algorithm: ``"zlib"`` (the only one for now).
        level: zlib level, ``0`` (none) to ``9`` (smallest), or ``-1`` for zlib's default.
        min_size: encoded size, in bytes, from which compression is attempted.
        max_size: the largest value, in bytes once decompressed, that a read
            accepts (64 MiB by default). A stored value that inflates past it
            raises :class:`~kivigo_async.errors.DecodeError` after at most that
            much memory: a few kilobytes written by anyone with access to the
            store could otherwise inflate to gigabytes in every reader. Larger
            values are written uncompressed, so they still read back.

    Example:
        >>> codec = CompressedCodec(JsonCodec(), min_size=100)
        >>> codec.encode("short")
        b'\\x00"short"'
        >>> big = codec.encode("a" * 10_000)
        >>> big[:1], len(big) < 100
        (b'\\x01', True)
        >>> codec.decode(big, str) == "a" * 10_000
        True
    """

    __slots__ = ("_algorithm", "_inner", "_level", "_max_size", "_min_size")

    def __init__(
        self,
        inner: Codec,
        algorithm: Literal["zlib"] = "zlib",
        *,
        level: int = 6,
        min_size: int = 512,
        max_size: int = 64 * 1024 * 1024,
    ) -> None:
        _check_inner(inner, "CompressedCodec")
        if algorithm != "zlib":
            raise ConfigurationError(f"CompressedCodec: algorithm must be 'zlib', got {algorithm!r}")
        if isinstance(level, bool) or not isinstance(level, int) or not -1 <= level <= 9:
            raise ConfigurationError(f"CompressedCodec: level must be an int from -1 to 9, got {level!r}")
        if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
            raise ConfigurationError(f"CompressedCodec: min_size must be an int >= 0, got {min_size!r}")
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ConfigurationError(f"CompressedCodec: max_size must be an int >= 1, got {max_size!r}")
        self._max_size = max_size
        self._inner = inner
        self._algorithm = algorithm
        self._level = level
        self._min_size = min_size

    def __repr__(self) -> str:
        return (
            f"CompressedCodec(inner={self._inner!r}, algorithm={self._algorithm!r}, "
            f"level={self._level}, min_size={self._min_size}, max_size={self._max_size})"
        )

    @property
    def inner(self) -> Codec:
        """The wrapped codec."""
        return self._inner

    def encode(self, value: Any) -> bytes:
        """Encode ``value`` with the inner codec, then compress it if it is worth it."""
        payload = self._inner.encode(value)
        if self._min_size <= len(payload) <= self._max_size:
            compressed = zlib.compress(payload, self._level)
            if len(compressed) < len(payload):
                return _ZLIB + compressed
        return _RAW + payload

    def decode(self, data: bytes, type: type[T]) -> T:
        """Decompress ``data`` if needed, then decode it with the inner codec.

        Raises:
            DecodeError: unknown header byte, or corrupt compressed data.
        """
        if not data:
            raise DecodeError("expected a compressed value, got an empty one")
        header = data[0]
        if header == 0:
            payload = data[1:]
        elif header == 1:
            payload = self._inflate(memoryview(data)[1:])
        else:
            raise DecodeError(
                "expected a compressed value, but its header byte is unknown "
                "(was it written without CompressedCodec, or by a newer version?)"
            )
        return self._inner.decode(payload, type)

    def _inflate(self, compressed: memoryview) -> bytes:
        inflater = zlib.decompressobj()
        try:
            # Stops after max_size + 1 bytes: what is left of a bomb is never inflated.
            payload = inflater.decompress(compressed, self._max_size + 1)
        except zlib.error as exc:
            raise DecodeError("expected zlib-compressed data, but it is corrupt") from exc
        if len(payload) > self._max_size:
            raise DecodeError(
                f"the value inflates past max_size ({self._max_size} bytes): refused unread; "
                "raise CompressedCodec(max_size=...) if such values are expected"
            )
        if not inflater.eof:
            raise DecodeError("expected zlib-compressed data, but it is truncated")
        return payload


# -- EncryptedCodec ----------------------------------------------------------

_ENC_VERSION: Final = 1
_KEY_ID_SIZE: Final = 8
_NONCE_SIZE: Final = 12
_TAG_SIZE: Final = 16
_HEADER_SIZE: Final = 1 + _KEY_ID_SIZE
_MIN_SIZE: Final = _HEADER_SIZE + _NONCE_SIZE + _TAG_SIZE
_KEY_SIZE: Final = 32


class EncryptedCodec:
    """Encrypts and authenticates the output of another codec with AES-256-GCM.

    New values are encrypted with the **first** key; values are decrypted with
    whichever listed key they were written with. To rotate, put the new key first
    and keep the old ones until every value has been rewritten or has expired.

    Layout of a stored value (all lengths in bytes)::

        version (1, = 0x01) | key id (8) | nonce (12) | ciphertext | tag (16)

    The key id is the first 8 bytes of SHA-256(key): it identifies a key without
    revealing it. The version and key id are authenticated too (as associated data).
    Nonces are random; with 96-bit random nonces, rotate a key well before 2**32
    writes. A value is not bound to its Redis key: someone who can write to the
    store can copy a valid ciphertext from one key to another.

    Args:
        inner: the codec whose output is encrypted. To compress too, wrap a
            :class:`CompressedCodec` (compressing ciphertext is useless).
        keys: one or more 32-byte keys, newest first. Make one with :meth:`generate_key`.

    Raises:
        ConfigurationError: no key, a key that is not 32 bytes or is one byte repeated
            (a placeholder such as 32 zero bytes), a duplicate key, or
            the ``cryptography`` package is missing (``pip install 'kivigo-async[encryption]'``).

    Example:
        >>> old, new = EncryptedCodec.generate_key(), EncryptedCodec.generate_key()
        >>> data = EncryptedCodec(JsonCodec(), [old]).encode({"card": "4111..."})
        >>> codec = EncryptedCodec(JsonCodec(), [new, old])
        >>> codec.decode(data, object)
        {'card': '4111...'}
        >>> codec
        EncryptedCodec(inner=JsonCodec(), keys=<2 keys>)
    """

    __slots__ = ("_aeads", "_encryptor", "_header", "_inner", "_invalid_tag")

    def __init__(self, inner: Codec, keys: Sequence[bytes]) -> None:
        try:
            from cryptography.exceptions import InvalidTag
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError as exc:
            raise ConfigurationError(
                "EncryptedCodec needs the 'cryptography' package: pip install 'kivigo-async[encryption]'"
            ) from exc
        _check_inner(inner, "EncryptedCodec")
        if isinstance(keys, (bytes, bytearray, memoryview, str)) or not isinstance(keys, Sequence):
            raise ConfigurationError("EncryptedCodec: keys must be a list of keys, e.g. keys=[key]")
        if not keys:
            raise ConfigurationError("EncryptedCodec: at least one key is required")
        aeads: dict[bytes, AESGCM] = {}
        headers: list[bytes] = []
        for i, key in enumerate(keys):
            if not isinstance(key, (bytes, bytearray, memoryview)):
                raise ConfigurationError(
                    f"EncryptedCodec: key #{i} must be bytes, got {type(key).__name__} "
                    "(decode hex/base64 keys to raw bytes first)"
                )
            raw = bytes(key)
            if len(raw) != _KEY_SIZE:
                raise ConfigurationError(
                    f"EncryptedCodec: key #{i} must be {_KEY_SIZE} bytes (AES-256), got {len(raw)} bytes"
                )
            if len(set(raw)) == 1:
                # 32 equal bytes (zeros, say) is a placeholder left in a config file, not a key.
                raise ConfigurationError(
                    f"EncryptedCodec: key #{i} is one byte repeated, not a key: make one with generate_key()"
                )
            key_id = hashlib.sha256(raw).digest()[:_KEY_ID_SIZE]
            if key_id in aeads:
                raise ConfigurationError(f"EncryptedCodec: key #{i} is listed twice")
            aeads[key_id] = AESGCM(raw)
            headers.append(bytes((_ENC_VERSION,)) + key_id)
        self._inner = inner
        self._aeads = aeads
        self._header = headers[0]
        self._encryptor = aeads[headers[0][1:]]
        self._invalid_tag: type[Exception] = InvalidTag

    def __repr__(self) -> str:
        n = len(self._aeads)
        return f"EncryptedCodec(inner={self._inner!r}, keys=<{n} key{'' if n == 1 else 's'}>)"

    @property
    def inner(self) -> Codec:
        """The wrapped codec."""
        return self._inner

    @staticmethod
    def generate_key() -> bytes:
        """Return a new random 32-byte key (``os.urandom``). Store it somewhere safe."""
        return os.urandom(_KEY_SIZE)

    def encode(self, value: Any) -> bytes:
        """Encode ``value`` with the inner codec, then encrypt it with the first key."""
        plaintext = self._inner.encode(value)
        nonce = os.urandom(_NONCE_SIZE)
        header = self._header
        return header + nonce + self._encryptor.encrypt(nonce, plaintext, header)

    def decode(self, data: bytes, type: type[T]) -> T:
        """Authenticate and decrypt ``data``, then decode it with the inner codec.

        Raises:
            DecodeError: the value could not be authenticated (tampered with, truncated,
                unknown format, or written with a key that is not configured).
        """
        if len(data) < _MIN_SIZE:
            raise DecodeError("value could not be authenticated: too short to be an encrypted value")
        if data[0] != _ENC_VERSION:
            raise DecodeError("value could not be authenticated: unsupported format version")
        view = memoryview(data)
        aead = self._aeads.get(bytes(view[1:_HEADER_SIZE]))
        if aead is None:
            raise DecodeError(
                "value could not be authenticated: it was encrypted with a key that is not configured"
            )
        try:
            plaintext = aead.decrypt(
                view[_HEADER_SIZE : _HEADER_SIZE + _NONCE_SIZE],
                view[_HEADER_SIZE + _NONCE_SIZE :],
                view[:_HEADER_SIZE],
            )
        except self._invalid_tag as exc:
            raise DecodeError("value could not be authenticated: it was tampered with or corrupted") from exc
        try:
            return self._inner.decode(plaintext, type)
        except DecodeError as exc:
            error = DecodeError(str(exc))  # its message holds no stored data
        except Exception as exc:
            error = DecodeError(f"the inner codec failed: {builtins.type(exc).__name__}")
        # Raised from here, with no chain and the plaintext gone: an error tracker that
        # records the locals of each frame in a traceback would record it otherwise.
        del plaintext
        raise error
