"""Key templates: build keys like ``user:42:ada`` from ``user:{id}:{name|lower}``.

A port of KiviGo's ``pkg/key``. A :class:`KeyTemplate` is parsed and checked
once, when it is created: an invalid character, an unclosed brace, an unknown
function or a wrong number of arguments raises
:class:`~kivigo_async.errors.InvalidArgumentError` naming the position. Building
a key then only looks fields up and runs the functions.

Token syntax: ``{field}`` or ``{field|fn|fn('a', 'b')|fn(3)}``; functions run
left to right on the field's text. Arguments are quoted strings (``'..'`` or
``".."``) or integers. ``{{`` and ``}}`` stand for literal braces, for Redis
Cluster hash tags: ``{{{user_id}}}:cart`` builds ``{42}:cart``.

Built-in functions:

| Function | Result |
|---|---|
| ``upper``, ``lower`` | change case |
| ``trim``, ``trim('-')`` | strip whitespace (or the given characters) at both ends |
| ``default('x')`` | ``'x'`` when the field is missing, ``None`` or empty |
| ``slugify``, ``slugify('_')`` | ASCII, lowercase, other runs of characters as ``-`` (or the separator) |
| ``if('a')``, ``if('a', 'b')`` | ``'a'`` when the field is true, else ``'b'`` (or empty) |
| ``intadd(n)`` | the field as an integer, plus ``n`` |

A field is false when it is missing, empty, ``0`` or ``false``.

Example:
    >>> from kivigo_async.keys import KeyTemplate
    >>> tpl = KeyTemplate("user:{id}:{name|lower|default('anon')}")
    >>> tpl.fields
    ('id', 'name')
    >>> tpl.build({"id": 42, "name": "Ada"})
    'user:42:ada'
    >>> tpl.build(id=7)
    'user:7:anon'
"""

from __future__ import annotations

import enum
import inspect
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, Union, runtime_checkable

import msgspec

from .errors import InvalidArgumentError, InvalidKeyError, KivigoError

__all__ = ["KeyFunc", "KeyRegistry", "KeyTemplate", "KeyVars", "default_registry"]

#: A template function: receives the field's text and the token's arguments
#: (as strings), returns the new text (``None``: the field counts as missing).
KeyFunc = Callable[..., Union[str, None]]  # noqa: UP007 (a runtime alias)

# KiviGo's allowed characters: ^[a-zA-Z0-9/_|:\-{}(),"' +]+$
_ALLOWED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/_|:-{}(),\"' +")
_ALLOWED_TEXT = "letters, digits, space and / _ | : - { } ( ) , \" ' +"
_FIELD = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_FUNC = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT = re.compile(r"[-+]?[0-9]+")
_FALSE = frozenset({"", "0", "false"})


@runtime_checkable
class KeyVars(Protocol):
    """An object that supplies its own template fields (checked before attributes).

    Example:
        ```python
        class Order:
            def key_vars(self) -> dict[str, object]:
                return {"id": self.order_id, "region": self.shop.region}
        ```
    """

    def key_vars(self) -> Mapping[str, object]:
        """Return the fields by name."""
        ...


# -- built-in functions ---------------------------------------------------


def _upper(value: str) -> str:
    return value.upper()


def _lower(value: str) -> str:
    return value.lower()


def _trim(value: str, chars: str | None = None) -> str:
    return value.strip(chars)


def _default(value: str | None, fallback: str) -> str:
    return fallback if value is None or value == "" else value


def _slugify(value: str, separator: str = "-") -> str:
    ascii_text = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", lambda _: separator, ascii_text.lower())
    return slug.strip(separator) if separator else slug


def _if(value: str | None, then: str, otherwise: str = "") -> str:
    return otherwise if value is None or value.strip().lower() in _FALSE else then


def _intadd(value: str, amount: str) -> str:
    # The template's own integer rule (as Go's strconv.Atoi): no "1_000", no non-ASCII digits.
    text = value.strip()
    if _INT.fullmatch(text) is None:
        raise ValueError("intadd needs an integer")  # the value may be a secret: not quoted
    return str(int(text) + int(amount))


@dataclass(frozen=True)
class _Func:
    fn: KeyFunc
    # Functions that see missing fields (as None); the others are skipped for them.
    takes_missing: bool = False
    int_args: bool = False
    # Ours: their messages never quote the value, so errors may show them.
    builtin: bool = False


_BUILTINS: dict[str, _Func] = {
    "upper": _Func(_upper, builtin=True),
    "lower": _Func(_lower, builtin=True),
    "trim": _Func(_trim, builtin=True),
    "default": _Func(_default, takes_missing=True, builtin=True),
    "slugify": _Func(_slugify, builtin=True),
    "if": _Func(_if, takes_missing=True, builtin=True),
    "intadd": _Func(_intadd, int_args=True, builtin=True),
}


def _from_template(func: _Func, text: str | None) -> bool:
    """Whether ``func`` answers ``text`` with one of the template's own arguments."""
    return func.fn is _if or (func.fn is _default and not text)


# -- parsing ----------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    name: str
    func: _Func
    args: tuple[str, ...]


@dataclass(frozen=True)
class _Field:
    name: str
    steps: tuple[_Step, ...]


_Part = Union[str, _Field]  # noqa: UP007


class _Parser:
    def __init__(self, template: str, funcs: Callable[[str], _Func | None]) -> None:
        self.t = template
        self.i = 0
        self.funcs = funcs

    def fail(self, message: str, pos: int) -> InvalidArgumentError:
        return InvalidArgumentError(f"{message} at position {pos} in key template {self.t!r}")

    def peek(self) -> str:
        return self.t[self.i] if self.i < len(self.t) else ""

    def ws(self) -> None:
        while self.peek() == " ":
            self.i += 1

    def parse(self) -> list[_Part]:
        t = self.t
        for pos, char in enumerate(t):
            if char not in _ALLOWED:
                raise self.fail(f"invalid character {char!r} (allowed: {_ALLOWED_TEXT})", pos)
        parts: list[_Part] = []
        literal: list[str] = []
        while self.i < len(t):
            char = t[self.i]
            if char in "{}" and t.startswith(char * 2, self.i):
                literal.append(char)
                self.i += 2
            elif char == "{":
                if literal:
                    parts.append("".join(literal))
                    literal = []
                parts.append(self.token())
            elif char == "}":
                raise self.fail("unmatched '}' (write '}}' for a literal brace)", self.i)
            else:
                literal.append(char)
                self.i += 1
        if literal:
            parts.append("".join(literal))
        return parts

    def token(self) -> _Field:
        start = self.i
        self.i += 1
        self.ws()
        if self.peek() == "":
            raise self.fail("unclosed '{'", start)
        name = self.name(_FIELD, "a field name (a letter, then letters, digits, _ or -)")
        steps: list[_Step] = []
        self.ws()
        while self.peek() == "|":
            self.i += 1
            self.ws()
            steps.append(self.step())
            self.ws()
        char = self.peek()
        if char == "":
            raise self.fail("unclosed '{'", start)
        if char != "}":
            raise self.fail(f"expected '|' or '}}', found {char!r}", self.i)
        self.i += 1
        return _Field(name, tuple(steps))

    def name(self, pattern: re.Pattern[str], what: str) -> str:
        match = pattern.match(self.t, self.i)
        if match is None:
            found = self.peek()
            raise self.fail(f"expected {what}, found {found!r}" if found else f"expected {what}", self.i)
        self.i = match.end()
        return match.group()

    def step(self) -> _Step:
        pos = self.i
        name = self.name(_FUNC, "a function name")
        func = self.funcs(name)
        if func is None:
            known = ", ".join(sorted(_BUILTINS))
            raise self.fail(f"unknown function {name!r} (built in: {known}; or register_func())", pos)
        args: list[str] = []
        self.ws()
        if self.peek() == "(":
            self.i += 1
            self.ws()
            if self.peek() != ")":
                while True:
                    args.append(self.arg(name, func))
                    self.ws()
                    char = self.peek()
                    if char == ",":
                        self.i += 1
                        self.ws()
                    elif char == ")":
                        break
                    else:
                        raise self.fail(f"expected ',' or ')' in the arguments of {name!r}", self.i)
            self.i += 1
        try:
            inspect.signature(func.fn).bind("", *args)
        except TypeError as exc:
            raise self.fail(f"wrong arguments for function {name!r}: {exc}", pos) from None
        except ValueError:  # no signature to check (some builtins): trust the caller
            pass
        return _Step(name, func, tuple(args))

    def arg(self, fname: str, func: _Func) -> str:
        pos = self.i
        char = self.peek()
        if char in ("'", '"'):
            end = self.t.find(char, pos + 1)
            if end == -1:
                raise self.fail(f"unclosed quote in the arguments of {fname!r}", pos)
            self.i = end + 1
            value = self.t[pos + 1 : end]
        else:
            match = _INT.match(self.t, pos)
            if match is None:
                raise self.fail(f"expected a quoted string or an integer as argument of {fname!r}", pos)
            self.i = match.end()
            value = match.group()
        if func.int_args and _INT.fullmatch(value.strip()) is None:
            raise self.fail(f"function {fname!r} needs an integer argument, got {value!r}", pos)
        return value


# -- values -----------------------------------------------------------------


def _text(value: object) -> str | None:
    """A field value as key text; ``None`` means missing.

    Raises TypeError or ValueError, whose messages name types, never the value.
    """
    if value is None or type(value) is str:
        return value
    if value is msgspec.UNSET:  # a Struct field left unset: no value, not the text "UNSET"
        return None
    if isinstance(value, bool):
        return "true" if value else "false"  # as KiviGo (Go's %v) writes them
    if isinstance(value, enum.Enum):  # before str: str() of a (str, Enum) member is "Cls.NAME"
        return _text(value.value)
    if isinstance(value, str):
        # A plain copy: functions then see the text, not a subclass's own __str__ or __format__.
        return str.__str__(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError("bytes are not key text; decode them first")
    if type(value) is int:
        return str(value)  # may raise ValueError for an int too long for text: it names no digit
    _check_has_text(value)
    try:
        return str(value)
    except Exception as exc:  # the object's own code: its message may quote anything
        raise TypeError(f"str() of a {type(value).__name__} raised {type(exc).__name__}") from None


def _check_has_text(value: object) -> None:
    """Refuse values whose str() is not their text: a memory address, a mask."""
    kind = type(value).__name__
    if inspect.isawaitable(value):
        if inspect.iscoroutine(value):
            value.close()  # never awaited: closing spares the "never awaited" warning
        raise TypeError(f"a {kind} is not key text (template functions must not be async)")
    if callable(value):
        raise TypeError(f"a {kind} is callable, not a value (call it first?)")
    if callable(getattr(value, "get_secret_value", None)):
        # pydantic's SecretStr and the like: the same "**********" for every secret.
        raise TypeError(f"a {kind} masks its text (pass its get_secret_value(), or a hash of it)")
    if type(value).__str__ is object.__str__ and type(value).__repr__ is object.__repr__:
        raise TypeError(f"a {kind} has no text of its own: str() would give its memory address")


_SCALARS = (str, bytes, bytearray, memoryview, int, float, complex)


class _Lookup:
    """Field access on a mapping, a :class:`KeyVars` object or attributes."""

    def __init__(self, data: object, overrides: Mapping[str, object]) -> None:
        self.overrides = overrides
        self.mapping: Mapping[str, object] | None = None
        self.obj: object = None
        if data is None:
            self.mapping = {}
        elif isinstance(data, type):
            raise InvalidArgumentError(
                f"build() needs data, not the class {data.__name__} (pass an instance)"
            )
        elif isinstance(data, KeyVars):
            got = data.key_vars()
            if not isinstance(got, Mapping):
                raise InvalidArgumentError(
                    f"{type(data).__name__}.key_vars() must return a mapping, not {type(got).__name__}"
                )
            self.mapping = got
        elif isinstance(data, Mapping):
            self.mapping = data
        elif isinstance(data, _SCALARS):
            raise InvalidArgumentError(
                "build() needs a mapping, an object with the fields as attributes, or an object "
                f"with key_vars(); got {type(data).__name__}"
            )
        else:
            self.obj = data

    def get(self, name: str) -> object:
        if name in self.overrides:
            return self.overrides[name]
        if self.mapping is not None:
            return self.mapping.get(name)
        value = getattr(self.obj, name, None)
        if callable(value):
            raise InvalidKeyError(f"field {name!r} of {type(self.obj).__name__} is callable, not a value")
        return value


# -- templates --------------------------------------------------------------


class KeyTemplate:
    """A parsed key template; :meth:`build` turns data into a key.

    Args:
        template: the pattern, e.g. ``"user:{id}:{name|lower}"``.
        registry: where custom functions are looked up (default:
            :func:`default_registry`). They are bound now: registering a
            function later does not change this template.
        strict: refuse field values that would make keys ambiguous (the
            default): an empty value (unless ``if`` or ``default`` chose it), a
            control character (C0, DEL or C1) or a lone surrogate, a brace (it
            would move a Redis Cluster hash tag), or a non-alphanumeric character of the literal text between
            two fields (with ``session:{user}:{sid}``, ``user="a:1", sid="x"``
            and ``user="a", sid="1:x"`` would build the same key); when that
            text is all letters and digits (``{a}v{b}``), any of them. The check
            applies to the text a field ends up as, after its functions. Two
            fields with no text between them (``{a}{b}``) cannot be checked:
            ``ab`` + ``c`` and ``a`` + ``bc`` give the same key, so put a
            separator between fields that hold user data. The text of an
            ``if`` or ``default`` argument is the template's own and is not
            checked, unless two fields have arguments holding refused characters.
            ``strict=False`` builds keys from values as they are, as KiviGo does.

    Raises:
        InvalidArgumentError: the template is empty, has a character outside
            KiviGo's set, a brace that does not close, an unknown function or
            wrong arguments; the message names the position (0-based).

    Example:
        >>> tpl = KeyTemplate("order:{region|upper}:{id}")
        >>> tpl.build({"region": "eu", "id": 7})
        'order:EU:7'
    """

    __slots__ = ("_fields", "_forbidden", "_parts", "_template", "_trust_args")

    def __init__(self, template: str, *, registry: KeyRegistry | None = None, strict: bool = True) -> None:
        if not isinstance(template, str):
            raise InvalidArgumentError(f"a key template must be str, not {type(template).__name__}")
        if not template:
            raise InvalidArgumentError("a key template must not be empty")
        if registry is not None and not isinstance(registry, KeyRegistry):
            raise InvalidArgumentError(f"registry must be a KeyRegistry, not {type(registry).__name__}")
        funcs = (registry if registry is not None else default_registry())._func
        self._template = template
        self._parts: tuple[_Part, ...] = tuple(_Parser(template, funcs).parse())
        self._fields: tuple[str, ...] = tuple(
            dict.fromkeys(p.name for p in self._parts if isinstance(p, _Field))
        )
        if not isinstance(strict, bool):
            raise InvalidArgumentError(f"strict must be True or False, not {strict!r}")
        self._forbidden: re.Pattern[str] | None = _forbidden_in_values(self._parts) if strict else None
        self._trust_args = self._forbidden is None or _args_trusted(self._parts, self._forbidden)

    def __repr__(self) -> str:
        return f"KeyTemplate({self._template!r})"

    @property
    def template(self) -> str:
        """The template text, as given."""
        return self._template

    @property
    def fields(self) -> tuple[str, ...]:
        """The field names the template uses, in order of first use."""
        return self._fields

    def build(self, data: Mapping[str, object] | object = None, /, **fields: object) -> str:
        """Return the key for ``data`` (and/or keyword ``fields``, which take precedence).

        ``data`` is a mapping, an object with a ``key_vars()`` method
        (:class:`KeyVars`), or any object whose attributes are the fields
        (dataclass, ``msgspec.Struct``, pydantic model...). Values become text
        with ``str()``; booleans as ``true``/``false``, enums by their value,
        ``str`` subclasses as plain ``str``. ``None`` and ``msgspec.UNSET``
        count as missing.

        Raises:
            InvalidKeyError: a field is missing, ``None`` or unset (and no
                ``default`` covers it); a value is bytes, callable, awaitable
                or has no text of its own (no ``__str__`` or ``__repr__``); a
                function fails on a value; a strict check fails; or the key
                comes out empty. The message never quotes a field's value.

        Example:
            >>> KeyTemplate("user:{id}").build({"id": 42}), KeyTemplate("user:{id}").build(id=42)
            ('user:42', 'user:42')
        """
        lookup = _Lookup(data, fields)
        out: list[str] = []
        missing: list[str] = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
                continue
            text, chosen, constant = self._apply(part, lookup.get(part.name))
            if text is None:
                if part.name not in missing:
                    missing.append(part.name)
                continue
            # Text the template itself wrote (an ``if`` or ``default`` argument) is
            # no more ambiguous than its literal text, separators and all.
            if self._forbidden is not None and not (constant and self._trust_args):
                self._check_value(part, text, chosen)
            out.append(text)
        if missing:
            names = ", ".join(map(repr, missing))
            raise InvalidKeyError(f"key template {self._template!r}: missing field(s) {names}")
        key = "".join(out)
        if not key:
            raise InvalidKeyError(f"key template {self._template!r} built an empty key")
        return key

    def _check_value(self, part: _Field, text: str, chosen: bool) -> None:
        assert self._forbidden is not None
        # Only ``if`` and ``default`` choose an empty text on purpose (``if('x')`` on a
        # false field); "" given, or left by another function (``slugify`` of "東京"),
        # would make every such value build the same key.
        if not text and not chosen:
            raise InvalidKeyError(f"key template {self._template!r}: field {part.name!r} is empty")
        bad = self._forbidden.search(text)
        if bad is not None:
            raise InvalidKeyError(
                f"key template {self._template!r}: field {part.name!r} holds {bad.group()!r}, which "
                "would make keys ambiguous (pass strict=False to build keys from such values anyway)"
            )

    def _apply(self, part: _Field, value: object) -> tuple[str | None, bool, bool]:
        """The field's text after its functions, whether ``if``/``default`` chose it,
        and whether it is an argument of the ``if``/``default`` that chose it, unchanged."""
        try:
            text = _text(value)
        except (TypeError, ValueError) as exc:  # ValueError: an int too long for str()
            raise InvalidKeyError(f"key template {self._template!r}: field {part.name!r}: {exc}") from None
        chosen = constant = False
        for step in part.steps:
            takes_missing = step.func.takes_missing
            if text is None and not takes_missing:
                continue
            from_template = _from_template(step.func, text)
            result = self._run(part, step, text)
            if takes_missing or result != text:
                chosen = takes_missing
            if from_template or result != text:
                constant = from_template
            text = result
        return text, chosen, constant

    def _run(self, part: _Field, step: _Step, text: str | None) -> str | None:
        """One function on the field's text; its failure as :class:`InvalidKeyError`."""
        try:
            result = step.func.fn(text, *step.args)
        except Exception as exc:
            detail = _failure(step.func, exc)
        else:
            try:
                return _text(result)
            except (TypeError, ValueError) as exc:
                detail = f"its result: {exc}"
        # Raised outside the handler and without a cause: the chain may quote the value.
        raise InvalidKeyError(
            f"key template {self._template!r}: {step.name}() failed on field {part.name!r}: {detail}"
        ) from None


def _failure(func: _Func, exc: Exception) -> str:
    """What an error may say of ``exc``, raised by ``func``."""
    if func.builtin or isinstance(exc, KivigoError):
        return str(exc)  # ours, or what the function's author wrote for a key error
    # Anything else may quote the value (int("s3cret") does): its type only.
    return f"it raised {type(exc).__name__}"


def _args_trusted(parts: tuple[_Part, ...], forbidden: re.Pattern[str]) -> bool:
    """Whether the ``if``/``default`` arguments of ``parts`` can be used as they are.

    One field's arguments holding refused characters keep keys apart, as its literal
    text does; two such fields may not: with ``{a|default('x:y')}:{b|default('y:z')}``,
    ``b="z"`` alone and ``a="x"`` alone both build ``x:y:z``.
    """
    holders = 0
    for part in parts:
        if isinstance(part, _Field) and any(
            step.func.fn in (_if, _default) and any(forbidden.search(arg) for arg in step.args)
            for step in part.steps
        ):
            holders += 1
    return holders <= 1


def _forbidden_in_values(parts: tuple[_Part, ...]) -> re.Pattern[str]:
    """What a strict template refuses in a field's text (see ``strict``)."""
    separators: set[str] = set("{}")
    for before, between, after in zip(parts, parts[1:], parts[2:], strict=False):
        if isinstance(before, _Field) and isinstance(between, str) and isinstance(after, _Field):
            # One refused character is enough to tell where a field ends; text of
            # letters and digits only (``{a}v{b}``) has none unless all of it is refused.
            marks = {c for c in between if not c.isalnum()}
            separators.update(marks or between)
    # Control characters (C0, DEL, C1 such as NEL) break log lines; a lone surrogate
    # cannot be stored as UTF-8, or escapes a byte that another text also stands for.
    return re.compile("[" + re.escape("".join(sorted(separators))) + "\\x00-\\x1f\\x7f-\\x9f\\ud800-\\udfff]")


class KeyRegistry:
    """Named key templates and custom template functions.

    Example:
        >>> keys = KeyRegistry()
        >>> keys.register_func("initial", lambda value: value[:1])
        >>> _ = keys.register("user", "user:{name|initial|upper}:{id}")
        >>> keys.build("user", {"name": "ada", "id": 1})
        'user:A:1'
    """

    def __init__(self) -> None:
        self._templates: dict[str, KeyTemplate] = {}
        self._funcs: dict[str, _Func] = {}

    def __repr__(self) -> str:
        return f"KeyRegistry(templates={sorted(self._templates)!r}, funcs={sorted(self._funcs)!r})"

    def __contains__(self, name: object) -> bool:
        return name in self._templates

    def __len__(self) -> int:
        return len(self._templates)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._templates))

    def register(self, name: str, template: str | KeyTemplate, *, replace: bool = False) -> KeyTemplate:
        """Store ``template`` under ``name`` and return it (parsed, with this registry's functions).

        Raises :class:`~kivigo_async.errors.InvalidArgumentError` when the name
        is taken (unless ``replace``) or the template is invalid.

        Example:
            ```python
            session_key = keys.register("session", "session:{sid}")
            ```
        """
        _check_name(name, "template")
        if not replace and name in self._templates:
            raise InvalidArgumentError(f"a key template named {name!r} is already registered")
        if isinstance(template, str):
            template = KeyTemplate(template, registry=self)
        elif not isinstance(template, KeyTemplate):
            raise InvalidArgumentError(f"template must be str or KeyTemplate, not {type(template).__name__}")
        self._templates[name] = template
        return template

    def get(self, name: str) -> KeyTemplate | None:
        """Return the template registered as ``name``, or ``None``."""
        _check_name(name, "template")
        return self._templates.get(name)

    def must_get(self, name: str) -> KeyTemplate:
        """Return the template registered as ``name``; raise when there is none.

        Raises:
            InvalidArgumentError: no template has that name.
        """
        _check_name(name, "template")
        template = self._templates.get(name)
        if template is None:
            raise InvalidArgumentError(f"no key template named {name!r} is registered")
        return template

    def delete(self, name: str) -> bool:
        """Forget the template ``name``; return whether it was registered."""
        _check_name(name, "template")
        return self._templates.pop(name, None) is not None

    def build(self, name: str, data: Mapping[str, object] | object = None, /, **fields: object) -> str:
        """Build a key with the template registered as ``name``; see :meth:`KeyTemplate.build`.

        Example:
            ```python
            key = keys.build("session", sid="abc123")
            ```
        """
        return self.must_get(name).build(data, **fields)

    def register_func(self, name: str, fn: KeyFunc, *, replace: bool = False) -> None:
        """Make ``fn`` usable as ``{field|name}`` in templates created after this call.

        ``fn(text, *args)`` receives the field's text and the token's
        arguments as strings and returns text. It is skipped for a missing
        field. Built-in names cannot be replaced, and ``fn`` must not be
        ``async``. When ``fn`` raises, the build's error names the exception's
        type only (its message may quote the value), unless it is a
        :class:`~kivigo_async.errors.KivigoError` such as
        :class:`~kivigo_async.errors.InvalidKeyError`, shown as written.

        Example:
            ```python
            keys.register_func("initial", lambda value: value[:1])
            ```
        """
        if not isinstance(name, str) or _FUNC.fullmatch(name) is None:
            raise InvalidArgumentError(f"a function name must be an identifier, got {name!r}")
        if name in _BUILTINS:
            raise InvalidArgumentError(f"{name!r} is a built-in template function and cannot be replaced")
        if not callable(fn):
            raise InvalidArgumentError(f"fn must be callable, not {type(fn).__name__}")
        if inspect.iscoroutinefunction(fn):
            # Keys are built synchronously: its coroutine would become the key's text.
            raise InvalidArgumentError(f"template function {name!r} must be synchronous, not async")
        if not replace and name in self._funcs:
            raise InvalidArgumentError(f"a template function named {name!r} is already registered")
        self._funcs[name] = _Func(fn)

    def delete_func(self, name: str) -> bool:
        """Forget the custom function ``name``; return whether it existed.

        Templates built while it was registered keep using it.
        """
        return self._funcs.pop(name, None) is not None

    def _func(self, name: str) -> _Func | None:
        return _BUILTINS.get(name) or self._funcs.get(name)


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"a {what} name must be a non-empty str, got {name!r}")


_DEFAULT = KeyRegistry()


def default_registry() -> KeyRegistry:
    """The process-wide registry (KiviGo's ``GlobalRegistry``); templates use its functions by default.

    Example:
        ```python
        from kivigo_async.keys import KeyTemplate, default_registry

        default_registry().register_func("initial", lambda value: value[:1])
        KeyTemplate("user:{name|initial}").build(name="ada")   # 'user:a'
        ```
    """
    return _DEFAULT
