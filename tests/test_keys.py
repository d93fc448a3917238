"""Key templates (kivigo_async.keys): parsing, building, functions, registries, bad input."""

from __future__ import annotations

import enum
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec
import pytest
from conftest import chain_text

from kivigo_async import InvalidArgumentError, InvalidKeyError, KeyRegistry, KeyTemplate, KeyVars
from kivigo_async.keys import default_registry


@dataclass
class User:
    id: int
    name: str


class Profile(msgspec.Struct):
    id: int
    name: str


class Color(enum.Enum):
    RED = "red"


class Order:
    """Supplies its fields through key_vars(), which wins over its attributes."""

    id = "attribute"

    def key_vars(self) -> Mapping[str, object]:
        return {"id": "from-key-vars", "region": "eu"}


# -- parsing ----------------------------------------------------------------


def test_fields_and_template_text() -> None:
    tpl = KeyTemplate("user:{id}:{name|lower}:{id|intadd(1)}")
    assert tpl.fields == ("id", "name")
    assert tpl.template == "user:{id}:{name|lower}:{id|intadd(1)}"
    assert repr(tpl) == "KeyTemplate('user:{id}:{name|lower}:{id|intadd(1)}')"


def test_template_without_fields_builds_itself() -> None:
    tpl = KeyTemplate("config:global")
    assert tpl.fields == ()
    assert tpl.build() == "config:global"


def test_spaces_inside_tokens_are_ignored() -> None:
    tpl = KeyTemplate("k:{ name | trim | default( 'x' ) }")
    assert tpl.build(name="  a ") == "k:a"
    assert tpl.build(name="   ") == "k:x"


def test_escaped_braces_make_hash_tags() -> None:
    tpl = KeyTemplate("{{{user_id}}}:cart")
    assert tpl.fields == ("user_id",)
    assert tpl.build(user_id=42) == "{42}:cart"
    assert KeyTemplate("{{literal}}").build() == "{literal}"


@pytest.mark.parametrize(
    ("template", "position", "fragment"),
    [
        ("user.{id}", 4, "invalid character '.'"),
        ("user:{id}@x", 9, "invalid character '@'"),
        ("user:{ïd}", 6, "invalid character 'ï'"),
        ("user:{id", 5, "unclosed '{'"),
        ("user:{id|lower", 5, "unclosed '{'"),
        ("user:{", 5, "unclosed '{'"),
        ("user:}", 5, "unmatched '}'"),
        ("user:{}", 6, "expected a field name"),
        ("user:{1id}", 6, "expected a field name"),
        ("user:{id:x}", 8, "expected '|' or '}'"),
        ("user:{id|}", 9, "expected a function name"),
        ("user:{id|nope}", 9, "unknown function 'nope'"),
        ("user:{id|lower('x')}", 9, "wrong arguments for function 'lower'"),
        ("user:{id|default}", 9, "wrong arguments for function 'default'"),
        ("user:{id|intadd('a')}", 16, "needs an integer argument"),
        ("user:{id|intadd(x)}", 16, "expected a quoted string or an integer"),
        ("user:{id|default('x}", 17, "unclosed quote"),
        ("user:{id|default('x' 'y')}", 21, "expected ',' or ')'"),
        ("user:{{id}", 9, "unmatched '}'"),
    ],
)
def test_invalid_templates_name_the_position(template: str, position: int, fragment: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        KeyTemplate(template)
    message = str(info.value)
    assert fragment in message
    assert f"at position {position} " in message
    assert repr(template) in message


@pytest.mark.parametrize("template", ["", None, 42, b"user:{id}"])
def test_template_must_be_a_non_empty_str(template: object) -> None:
    with pytest.raises(InvalidArgumentError):
        KeyTemplate(template)  # type: ignore[arg-type]


def test_registry_argument_is_checked() -> None:
    with pytest.raises(InvalidArgumentError, match="KeyRegistry"):
        KeyTemplate("a", registry={})  # type: ignore[arg-type]


# -- data sources ---------------------------------------------------------------


def test_build_from_mapping_dataclass_struct_and_keywords() -> None:
    tpl = KeyTemplate("user:{id}:{name|lower}")
    assert tpl.build({"id": 1, "name": "Ada"}) == "user:1:ada"
    assert tpl.build(User(2, "Bob")) == "user:2:bob"
    assert tpl.build(Profile(id=3, name="Cy")) == "user:3:cy"
    assert tpl.build(id=4, name="Di") == "user:4:di"
    # Keywords take precedence over the data.
    assert tpl.build(User(5, "Eve"), name="Override") == "user:5:override"


def test_key_vars_win_over_attributes() -> None:
    order = Order()
    assert isinstance(order, KeyVars)
    assert KeyTemplate("order:{region}:{id}").build(order) == "order:eu:from-key-vars"


def test_key_vars_must_return_a_mapping() -> None:
    class Bad:
        def key_vars(self) -> Mapping[str, object]:
            return [("id", 1)]  # type: ignore[return-value]

    with pytest.raises(InvalidArgumentError, match="must return a mapping"):
        KeyTemplate("{id}").build(Bad())


@pytest.mark.parametrize("data", [42, "id", b"id", 1.5])
def test_scalar_data_is_rejected(data: object) -> None:
    with pytest.raises(InvalidArgumentError, match="needs a mapping"):
        KeyTemplate("{id}").build(data)


def test_value_conversion() -> None:
    tpl = KeyTemplate("{v}")
    assert tpl.build(v=True) == "true"
    assert tpl.build(v=False) == "false"
    assert tpl.build(v=Color.RED) == "red"
    assert tpl.build(v=-3) == "-3"
    assert tpl.build(v=1.5) == "1.5"
    with pytest.raises(InvalidKeyError, match="bytes"):
        tpl.build(v=b"raw")


def test_missing_fields_are_all_named() -> None:
    tpl = KeyTemplate("user:{id}:{name}:{id}")
    with pytest.raises(InvalidKeyError) as info:
        tpl.build({})
    assert "missing field(s) 'id', 'name'" in str(info.value)
    with pytest.raises(InvalidKeyError, match="'name'"):
        tpl.build(id=1, name=None)  # None counts as missing
    with pytest.raises(InvalidKeyError, match="'name'"):
        tpl.build(User(1, "x"), name=None)
    with pytest.raises(InvalidKeyError, match="'email'"):
        KeyTemplate("{email}").build(User(1, "x"))


def test_missing_field_skips_other_functions_until_default() -> None:
    tpl = KeyTemplate("{name|lower|default('Anon')|upper}")
    assert tpl.build() == "ANON"
    assert tpl.build(name="Ada") == "ADA"


def test_method_attribute_is_rejected() -> None:
    class WithMethod:
        def name(self) -> str:
            return "x"

    with pytest.raises(InvalidKeyError, match="callable"):
        KeyTemplate("{name}").build(WithMethod())


def test_empty_key_is_rejected() -> None:
    with pytest.raises(InvalidKeyError, match="field 'name' is empty"):
        KeyTemplate("u:{name}").build(name="")
    lax = KeyTemplate("u:{name}", strict=False)
    assert lax.build(name="") == "u:"
    with pytest.raises(InvalidKeyError, match="empty key"):
        KeyTemplate("{name}", strict=False).build(name="")


@pytest.mark.parametrize(
    ("template", "fields"),
    [
        ("user:{id|lower}", {"id": ""}),  # given empty: a function keeping it so does not help
        ("user:{id|trim}", {"id": "   "}),
        ("city:{name|slugify}:stats", {"name": "東京"}),  # no ASCII letters: would equal every such city
        ("city:{name|slugify}:stats", {"name": "🎉"}),
        ("k:{v|if('a')|upper}:{w|lower}", {"v": "1", "w": ""}),
    ],
)
def test_an_empty_text_a_function_left_is_refused(template: str, fields: dict[str, object]) -> None:
    with pytest.raises(InvalidKeyError, match="is empty"):
        KeyTemplate(template).build(fields)
    KeyTemplate(template, strict=False).build(fields)  # built as it comes when not strict


@pytest.mark.parametrize(
    ("template", "fields", "expected"),
    [
        ("user:{id}:{admin|if('admin')}", {"id": 7, "admin": False}, "user:7:"),
        ("user:{id}:{admin|if('admin')|upper}", {"id": 7, "admin": "0"}, "user:7:"),
        ("user:{id}:{admin|if('admin')}", {"id": 7, "admin": ""}, "user:7:"),  # empty is false
        ("user:{id}:{tag|default('')}", {"id": 7}, "user:7:"),
    ],
)
def test_an_empty_text_if_or_default_chose_is_kept(
    template: str, fields: dict[str, object], expected: str
) -> None:
    assert KeyTemplate(template).build(fields) == expected


def test_values_without_the_text_between_fields_are_accepted() -> None:
    assert KeyTemplate("session:{user}:{sid}").build(user="alice", sid="x") == "session:alice:x"
    assert KeyTemplate("{a}v{b}").build(a="1", b="2") == "1v2"
    # With another character between them, letters and digits stay allowed.
    assert KeyTemplate("{user}-v{version}").build(user="dave", version="v2") == "dave-vv2"


def test_an_int_too_long_for_text_is_an_invalid_key() -> None:
    with pytest.raises(InvalidKeyError, match="field 'id'"):
        KeyTemplate("user:{id}").build(id=10**5000)


@pytest.mark.parametrize(
    ("template", "refused", "colliding"),
    [
        ("session:{user}:{sid}", ":", [("alice:1", "x"), ("alice", "1:x")]),
        # Text of letters and digits only: all of it is refused.
        ("{a}v{b}", "v", [("1v2", "3"), ("1", "2v3")]),
    ],
)
def test_values_that_would_make_keys_collide_are_refused(
    template: str, refused: str, colliding: list[tuple[str, str]]
) -> None:
    tpl = KeyTemplate(template)
    fields = [dict(zip(tpl.fields, pair, strict=True)) for pair in colliding]
    for values in fields:
        with pytest.raises(InvalidKeyError, match=rf"'{refused}'.*ambiguous"):
            tpl.build(values)
    lax = KeyTemplate(template, strict=False)
    assert lax.build(fields[0]) == lax.build(fields[1])  # what strict prevents


@pytest.mark.parametrize(
    ("template", "value", "bad"),
    [
        ("{{{uid}}}:cart", "a}b", "}"),  # would move the hash tag to "a"
        ("user:{id}", "a{b", "{"),
        ("user:{id}", "line\nbreak", "\n"),
        ("user:{id}", "nul\x00", "\x00"),
    ],
)
def test_braces_and_control_characters_are_refused(template: str, value: str, bad: str) -> None:
    with pytest.raises(InvalidKeyError, match=re.escape(repr(bad))):
        KeyTemplate(template).build(id=value, uid=value)
    assert bad in KeyTemplate(template, strict=False).build(id=value, uid=value)


def test_separators_outside_two_fields_are_allowed() -> None:
    # Only text between two fields can be confused with a value's own characters.
    assert KeyTemplate("order-{id}").build(id="1b2c-3d4e") == "order-1b2c-3d4e"
    assert KeyTemplate("user:{id}:profile").build(id="a:b") == "user:a:b:profile"
    # A function may rightly produce "" (an optional suffix).
    assert KeyTemplate("user:{id}{admin|if(':admin')}").build(id=7, admin=False) == "user:7"


def test_strict_must_be_a_bool() -> None:
    with pytest.raises(InvalidArgumentError, match="strict"):
        KeyTemplate("user:{id}", strict="yes")  # type: ignore[arg-type]


# -- built-in functions -----------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "value", "expected"),
    [
        ("{v|upper}", "Ada", "ADA"),
        ("{v|lower}", "ADA", "ada"),
        ("{v|trim}", "  a b  ", "a b"),
        ("{v|trim('-')}", "--a-b--", "a-b"),
        ("{v|default('x')}", "", "x"),
        ("{v|default('x')}", "y", "y"),
        ('{v|default("x y")}', None, "x y"),
        ("{v|slugify}", "  Héllo, Wörld!  ", "hello-world"),
        ("{v|slugify('_')}", "Crème Brûlée 2", "creme_brulee_2"),
        ("{v|slugify('')}", "A b", "ab"),
        ("{v|if('vip')}", "true", "vip"),
        ("{v|if('vip', 'std')}", "false", "std"),
        ("{v|if('vip', 'std')}", "0", "std"),
        ("{v|if('vip', 'std')}", "", "std"),
        ("{v|if('vip', 'std')}", None, "std"),
        ("{v|if('vip', 'std')}", "yes", "vip"),
        ("{v|intadd(1)}", "41", "42"),
        ("{v|intadd(-2)}", "5", "3"),
        ("{v|intadd('+10')}", " 5 ", "15"),
    ],
)
def test_builtin_functions(template: str, value: object, expected: str) -> None:
    assert KeyTemplate("k:" + template).build(v=value) == "k:" + expected


def test_if_on_a_bool_field() -> None:
    tpl = KeyTemplate("plan:{premium|if('vip','std')}")
    assert tpl.build(premium=True) == "plan:vip"
    assert tpl.build(premium=False) == "plan:std"


def test_intadd_on_non_integer_raises_at_build() -> None:
    with pytest.raises(InvalidKeyError, match=r"intadd\(\) failed on field 'page'"):
        KeyTemplate("p:{page|intadd(1)}").build(page="two")


# -- custom functions and registries ------------------------------------------------


def test_custom_functions_with_arguments() -> None:
    keys = KeyRegistry()
    keys.register_func("initial", lambda value: value[:1])
    keys.register_func("wrap", lambda value, left, right: f"{left}{value}{right}")
    tpl = KeyTemplate("u:{name|initial|upper}:{name|wrap('(', ')')}", registry=keys)
    assert tpl.build(name="ada") == "u:A:(ada)"
    # Arity is checked at construction.
    with pytest.raises(InvalidArgumentError, match="wrong arguments for function 'wrap'"):
        KeyTemplate("{name|wrap('(')}", registry=keys)
    # A registry's functions are not visible elsewhere.
    with pytest.raises(InvalidArgumentError, match="unknown function 'initial'"):
        KeyTemplate("{name|initial}", registry=KeyRegistry())


def test_custom_function_returning_none_means_missing() -> None:
    keys = KeyRegistry()
    keys.register_func("blank_to_none", lambda value: value or None)
    tpl = KeyTemplate("{name|blank_to_none|default('anon')}", registry=keys)
    assert tpl.build(name="") == "anon"
    with pytest.raises(InvalidKeyError, match="missing"):
        KeyTemplate("{name|blank_to_none}", registry=keys).build(name="")


def test_custom_function_errors_become_invalid_key_errors() -> None:
    keys = KeyRegistry()

    def boom(value: str) -> str:
        raise RuntimeError("nope")

    keys.register_func("boom", boom)
    with pytest.raises(InvalidKeyError, match=r"boom\(\) failed on field 'v': it raised RuntimeError"):
        KeyTemplate("{v|boom}", registry=keys).build(v="x")


def test_register_func_validation() -> None:
    keys = KeyRegistry()
    with pytest.raises(InvalidArgumentError, match="built-in"):
        keys.register_func("upper", str.lower)
    with pytest.raises(InvalidArgumentError, match="identifier"):
        keys.register_func("not-valid", str.lower)
    with pytest.raises(InvalidArgumentError, match="callable"):
        keys.register_func("x", "lower")  # type: ignore[arg-type]
    keys.register_func("x", str.lower)
    with pytest.raises(InvalidArgumentError, match="already registered"):
        keys.register_func("x", str.upper)
    keys.register_func("x", str.upper, replace=True)
    assert KeyTemplate("{v|x}", registry=keys).build(v="a") == "A"


def test_templates_bind_functions_at_construction() -> None:
    keys = KeyRegistry()
    keys.register_func("tag", lambda value: value + "-1")
    tpl = KeyTemplate("{v|tag}", registry=keys)
    keys.register_func("tag", lambda value: value + "-2", replace=True)
    assert tpl.build(v="a") == "a-1"
    assert KeyTemplate("{v|tag}", registry=keys).build(v="a") == "a-2"


def test_registry_register_get_delete_build() -> None:
    keys = KeyRegistry()
    tpl = keys.register("user", "user:{id}")
    assert isinstance(tpl, KeyTemplate)
    assert keys.get("user") is tpl
    assert keys.must_get("user") is tpl
    assert "user" in keys
    assert list(keys) == ["user"]
    assert keys.build("user", {"id": 1}) == "user:1"
    assert keys.build("user", id=2) == "user:2"
    prebuilt = KeyTemplate("acct:{id}")
    assert keys.register("acct", prebuilt) is prebuilt
    with pytest.raises(InvalidArgumentError, match="already registered"):
        keys.register("user", "other:{id}")
    keys.register("user", "other:{id}", replace=True)
    assert keys.build("user", id=3) == "other:3"
    assert keys.delete("user") is True
    assert keys.delete("user") is False
    assert keys.get("user") is None
    with pytest.raises(InvalidArgumentError, match="no key template named 'user'"):
        keys.must_get("user")
    with pytest.raises(InvalidArgumentError, match="no key template named 'user'"):
        keys.build("user", id=1)
    assert "acct" in repr(keys)


@pytest.mark.parametrize("name", ["", None, 3])
def test_registry_names_are_checked(name: object) -> None:
    with pytest.raises(InvalidArgumentError, match="name"):
        KeyRegistry().register(name, "a")  # type: ignore[arg-type]


def test_registry_rejects_invalid_templates() -> None:
    keys = KeyRegistry()
    with pytest.raises(InvalidArgumentError, match="position 1"):
        keys.register("bad", "a.b")
    with pytest.raises(InvalidArgumentError, match="str or KeyTemplate"):
        keys.register("bad", 42)  # type: ignore[arg-type]
    assert "bad" not in keys


def test_default_registry_is_shared_and_used_by_default() -> None:
    registry = default_registry()
    assert registry is default_registry()
    name = "kivigo_test_initial"
    registry.register_func(name, lambda value: value[:1])
    try:
        assert KeyTemplate("{v|" + name + "}").build(v="abc") == "a"
    finally:
        assert registry.delete_func(name) is True
    assert registry.delete_func(name) is False
    with pytest.raises(InvalidArgumentError, match="unknown function"):
        KeyTemplate("{v|" + name + "}")


@pytest.mark.parametrize("name", [["x"], None, 3, ""])
def test_registry_lookups_refuse_names_that_are_not_str(name: object) -> None:
    registry = KeyRegistry()
    for call in (registry.get, registry.must_get, registry.build, registry.delete):
        with pytest.raises(InvalidArgumentError, match="name"):
            call(name)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["1_000", "\u0663", "1.5", ""])
def test_intadd_takes_only_plain_integers(value: str) -> None:
    with pytest.raises(InvalidKeyError, match="intadd"):
        KeyTemplate("page:{n|intadd(1)}").build(n=value)


def test_a_class_instead_of_an_instance_is_refused() -> None:
    class WithVars:
        def key_vars(self) -> dict[str, object]:
            return {"id": 1}

    with pytest.raises(InvalidArgumentError, match="pass an instance"):
        KeyTemplate("user:{id}").build(WithVars)


# -- regressions ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "fields", "expected"),
    [
        ("user:{id}:{name}{admin|if(':admin')}", {"id": 1, "name": "ada", "admin": True}, "user:1:ada:admin"),
        ("app:{tenant}:{beta|if('beta:')}{name}", {"tenant": "t", "beta": 1, "name": "n"}, "app:t:beta:n"),
        ("s:{user|default('anon:x')}:{sid}", {"sid": "1"}, "s:anon:x:1"),
        ("s:{user|trim|default('anon:x')}:{sid}", {"user": " ", "sid": "1"}, "s:anon:x:1"),
    ],
)
def test_text_that_if_or_default_wrote_may_hold_a_separator(
    template: str, fields: dict[str, object], expected: str
) -> None:
    # The text comes from the template, like its literal text, not from a value.
    assert KeyTemplate(template).build(fields) == expected


def test_a_value_that_default_passes_through_is_still_checked() -> None:
    with pytest.raises(InvalidKeyError, match="ambiguous"):
        KeyTemplate("s:{user|default('anon:x')}:{sid}").build(user="a:b", sid="1")
    # Changed by a later function, it is no longer the template's text as written.
    with pytest.raises(InvalidKeyError, match="ambiguous"):
        KeyTemplate("s:{user|if('a')|wrap}:{sid}", registry=_wrapping()).build(user=True, sid="1")


def _wrapping() -> KeyRegistry:
    keys = KeyRegistry()
    keys.register_func("wrap", lambda text: f":{text}:")
    return keys


def test_if_and_default_texts_with_separators_in_two_fields_are_checked() -> None:
    # Both could build "x:y:z": b="z" with a missing, and a="x" with b missing.
    tpl = KeyTemplate("{a|default('x:y')}:{b|default('y:z')}")
    for fields in ({"b": "z"}, {"a": "x"}):
        with pytest.raises(InvalidKeyError, match="ambiguous"):
            tpl.build(fields)
    assert tpl.build(a="x", b="z") == "x:z"


class _Plain:
    """No __str__ or __repr__ of its own: str() gives its memory address."""


def _function() -> None: ...


@pytest.mark.parametrize(
    "value",
    [_Plain(), _function, _Plain, lambda: 1, object()],
    ids=["instance", "function", "class", "lambda", "object"],
)
def test_values_without_text_of_their_own_are_refused(value: object) -> None:
    # str() of these holds a memory address: every process would build another key.
    with pytest.raises(InvalidKeyError, match="field 'shop'"):
        KeyTemplate("order:{shop}:{id}").build(shop=value, id=1)
    with pytest.raises(InvalidKeyError, match="field 'shop'"):
        KeyTemplate("order:{shop}:{id}", strict=False).build({"shop": value, "id": 1})


def test_async_functions_cannot_be_template_functions() -> None:
    async def upper(value: str) -> str:
        return value.upper()

    keys = KeyRegistry()
    with pytest.raises(InvalidArgumentError, match="async"):
        keys.register_func("up", upper)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="unknown function 'up'"):
        KeyTemplate("{v|up}", registry=keys)  # nothing was registered


def test_a_function_returning_an_awaitable_is_refused_and_the_coroutine_closed() -> None:
    async def upper(value: str) -> str:
        return value.upper()

    made: list[object] = []

    def sneaky(value: str) -> object:
        made.append(upper(value))
        return made[-1]

    keys = KeyRegistry()
    keys.register_func("up", sneaky)  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError, match=r"up\(\) failed on field 'v'.*coroutine"):
        KeyTemplate("k:{v|up}", registry=keys).build(v="a")
    assert inspect.getcoroutinestate(made[0]) == inspect.CORO_CLOSED  # type: ignore[arg-type]


def test_function_errors_never_quote_the_value() -> None:
    secret = "s3cr3t-" + "token"
    keys = KeyRegistry()
    keys.register_func("num", lambda value: str(int(value)))
    for template in ("p:{tok|intadd(1)}", "p:{tok|num}"):
        with pytest.raises(InvalidKeyError, match="'tok'") as info:
            KeyTemplate(template, registry=keys).build(tok=secret)
        assert secret not in chain_text(info.value)


def test_a_function_may_raise_its_own_invalid_key_error() -> None:
    def check(value: str) -> str:
        raise InvalidKeyError("must be a known region")

    keys = KeyRegistry()
    keys.register_func("check", check)
    with pytest.raises(InvalidKeyError, match="check\\(\\) failed on field 'r': must be a known region"):
        KeyTemplate("{r|check}", registry=keys).build(r="x")


@pytest.mark.parametrize(
    "value",
    [
        "a\x85b",  # NEL, a C1 control character: a line break to many log readers
        "a\x9fb",
        "a\ud800b",  # a lone surrogate: not storable as UTF-8
        "\udcc3\udca9",  # escapes the bytes of "é": would build the same stored key as "é"
    ],
    ids=["nel", "c1", "surrogate", "escaped-bytes"],
)
def test_c1_controls_and_surrogates_are_refused(value: str) -> None:
    with pytest.raises(InvalidKeyError, match="ambiguous"):
        KeyTemplate("user:{id}").build(id=value)


class _Shade(str, enum.Enum):
    RED = "red"


class _Tagged(str):
    def __str__(self) -> str:
        return "<tagged>"


@pytest.mark.parametrize("value", [_Shade.RED, _Tagged("red")], ids=["str-enum", "str-subclass"])
def test_custom_functions_get_str_subclasses_as_plain_text(value: str) -> None:
    seen: list[object] = []

    def wrap(text: str) -> str:
        seen.append(type(text))
        return f"[{text}]"

    keys = KeyRegistry()
    keys.register_func("wrap", wrap)
    assert KeyTemplate("c:{c|wrap}", registry=keys).build(c=value) == "c:[red]"
    assert seen == [str]
    assert KeyTemplate("c:{c}").build(c=value) == "c:red"


class _Patch(msgspec.Struct):
    id: int
    name: str | msgspec.UnsetType = msgspec.UNSET


def test_an_unset_struct_field_is_missing_not_the_text_unset() -> None:
    tpl = KeyTemplate("user:{id}:{name}")
    with pytest.raises(InvalidKeyError, match="missing field\\(s\\) 'name'"):
        tpl.build(_Patch(id=1))
    assert KeyTemplate("user:{id}:{name|default('anon')}").build(_Patch(id=1)) == "user:1:anon"
    assert tpl.build(_Patch(id=1, name="ada")) == "user:1:ada"


def test_a_masked_secret_is_refused_not_built_as_asterisks() -> None:
    pydantic = pytest.importorskip("pydantic")

    class ApiKey(pydantic.BaseModel):  # type: ignore[misc,name-defined]
        token: pydantic.SecretStr  # type: ignore[name-defined]

    # str() gives "**********" for every token: they would all share one key.
    secret = "s3cr3t-" + "token"
    tpl = KeyTemplate("apikey:{token}", strict=False)
    with pytest.raises(InvalidKeyError, match=r"field 'token'.*get_secret_value") as info:
        tpl.build(ApiKey(token=secret))
    assert secret not in chain_text(info.value)
    assert tpl.build(token=ApiKey(token=secret).token.get_secret_value()) == f"apikey:{secret}"
