"""Options and URLs: malformed addresses and options are refused, credentials never quoted."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trustme
from conftest import chain_text

from kivigo_async.backends.redis import RedisClusterOptions, RedisOptions, RedisSentinelOptions
from kivigo_async.errors import ConfigurationError

SECRET = "Tiger42"

#: Each way of giving one address: the standalone addr, a cluster seed, a sentinel.
ADDRESS_FIELDS: list[Callable[[str], object]] = [
    lambda addr: RedisOptions(addr=addr),
    lambda addr: RedisClusterOptions(addrs=["n0:7000", addr]),
    lambda addr: RedisSentinelOptions(sentinels=["s0:26379", addr]),
]
ADDRESS_IDS = ["addr", "cluster-addrs", "sentinels"]


@pytest.mark.parametrize("make", ADDRESS_FIELDS, ids=ADDRESS_IDS)
@pytest.mark.parametrize(
    "addr",
    [
        f"redis://:{SECRET}@cache.internal:6379",
        f"redis://:{SECRET}@cache.internal",
        f"app:{SECRET}@cache:6379",
        f"{SECRET}@cache",
        f"cache/{SECRET}:6379",
    ],
    ids=["url", "url-without-port", "userinfo", "userinfo-without-port", "slash"],
)
def test_an_address_holding_a_url_or_credentials_is_refused_unquoted(
    make: Callable[[str], object], addr: str
) -> None:
    with pytest.raises(ConfigurationError, match="looks like a URL") as info:
        make(addr)
    assert SECRET not in chain_text(info.value)
    assert "from_url()" in str(info.value)


@pytest.mark.parametrize("make", ADDRESS_FIELDS, ids=ADDRESS_IDS)
@pytest.mark.parametrize(
    "addr",
    [
        "cache internal:6379",
        "cache:1_0",
        "cache:+10",
        "cache: 10",
        "cache:\uff11\uff10",
        "cache:0",
        "cache:65536",
        "cache",
        "[::1:6379",
        "::1]:6379",
        ":6379",
    ],
)
def test_an_address_needs_a_host_and_an_ascii_port(make: Callable[[str], object], addr: str) -> None:
    with pytest.raises(ConfigurationError):
        make(addr)


@pytest.mark.parametrize(
    ("addr", "host", "port"),
    [("cache:6379", "cache", 6379), ("[::1]:7000", "::1", 7000), ("10.0.0.1:1", "10.0.0.1", 1)],
)
def test_a_good_address_is_split(addr: str, host: str, port: int) -> None:
    options = RedisOptions(addr=addr)
    assert (options.host, options.port) == (host, port)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://:pw@n1:7000?min_idle_conns=5", "min_idle_conns is not a cluster option"),
        ("redis://:pw@n1:7000?addr=n2:7000&min_idle_conns=0", "min_idle_conns is not a cluster option"),
        ("redis://:pw@n1:7000?db=3", r"remove \?db= from the URL"),
        ("redis://:pw@n1:7000?db=0", r"remove \?db= from the URL"),
        ("redis://:pw@n1:7000/3", "remove the /db part"),
    ],
)
def test_a_cluster_url_refuses_what_a_cluster_cannot_honour(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RedisClusterOptions.from_url(url)


@pytest.mark.parametrize(
    ("url", "sentinels"),
    [
        ("redis+sentinel://:pw@s1,s2/cache", ("s1:26379", "s2:26379")),
        ("redis+sentinel://:pw@s1:5000,s2/cache", ("s1:5000", "s2:26379")),
        ("redis+sentinel://:pw@[::1]:5000,[::2]/cache", ("[::1]:5000", "[::2]:26379")),
        ("redis+sentinel://:pw@s1, s2 /cache", ("s1:26379", "s2:26379")),
    ],
)
def test_a_sentinel_url_gets_the_default_port_only_where_none_is_given(
    url: str, sentinels: tuple[str, ...]
) -> None:
    assert RedisSentinelOptions.from_url(url).sentinels == sentinels


@pytest.mark.parametrize(
    "hosts",
    [
        "s1,s2:abc",
        "s1,s2:1_2",
        "s1,s2:",
        "s1,s2:+5",
        "s1,s2:\uff11\uff12",
        "s1:0",
        "s1:65536",
        "s1:26379:1",
        "[::1]x,s2",
    ],
)
def test_a_sentinel_url_with_a_bad_port_is_refused(hosts: str) -> None:
    with pytest.raises(ConfigurationError, match="sentinel"):
        RedisSentinelOptions.from_url(f"redis+sentinel://:{SECRET}@{hosts}/cache")


@pytest.mark.parametrize(
    ("url", "parse"),
    [
        (f"unix:///tmp/s.sock?password=pw&{SECRET}&db=3", RedisOptions.from_url),
        (f"unix:///tmp/s.sock?username=app&password=pw&{SECRET}", RedisOptions.from_url),
        (f"redis+sentinel://s1/cache?sentinel_password=pw&{SECRET}", RedisSentinelOptions.from_url),
    ],
    ids=["unix-password", "unix-username", "sentinel-password"],
)
def test_an_unescaped_ampersand_in_a_password_is_not_quoted(url: str, parse: Callable[[str], Any]) -> None:
    with pytest.raises(ConfigurationError, match="percent-encode '&'") as info:
        parse(url)
    assert SECRET not in chain_text(info.value)


def test_an_unknown_option_before_any_credential_is_named() -> None:
    with pytest.raises(ConfigurationError, match="unknown option 'pool'"):
        RedisOptions.from_url("unix:///tmp/s.sock?pool=3&password=pw")


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (RedisOptions, {"dial_timeout": True}, "dial_timeout"),
        (RedisOptions, {"read_timeout": True}, "read_timeout"),
        (RedisOptions, {"username": 5, "password": "pw"}, "username must be a str"),
        (RedisOptions, {"password": b"pw"}, "password must be a str"),
        (RedisSentinelOptions, {"sentinel_username": 5}, "sentinel_username must be a str"),
        (RedisSentinelOptions, {"sentinel_password": b"pw"}, "sentinel_password must be a str"),
        (RedisSentinelOptions, {"sentinel_tls": "yes"}, "sentinel_tls must be"),
    ],
    ids=[
        "dial_timeout",
        "read_timeout",
        "username",
        "password",
        "sentinel_username",
        "sentinel_password",
        "sentinel_tls",
    ],
)
def test_options_of_the_wrong_type_are_refused_by_name(
    cls: Callable[..., object], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message) as info:
        cls(**kwargs)
    assert "pw" not in str(info.value)


#: "Tiger42" followed by a byte that is not UTF-8 (0xFF), percent-encoded.
NOT_UTF8 = f"{SECRET}%FF"


@pytest.mark.parametrize(
    ("url", "parse", "what"),
    [
        (f"redis://:{NOT_UTF8}@cache:6379", RedisOptions.from_url, "the password"),
        (f"redis://{NOT_UTF8}:pw@cache:6379", RedisOptions.from_url, "the username"),
        (f"rediss://:{NOT_UTF8}@cache:6379", RedisOptions.from_url, "the password"),
        (f"unix:///tmp/s.sock?password={NOT_UTF8}", RedisOptions.from_url, "an option"),
        (f"unix:///tmp/{NOT_UTF8}.sock", RedisOptions.from_url, "the socket path"),
        (f"redis://:{NOT_UTF8}@n1:7000?addr=n2:7000", RedisClusterOptions.from_url, "the password"),
        (f"redis+sentinel://:{NOT_UTF8}@s1/cache", RedisSentinelOptions.from_url, "the password"),
        (
            f"redis+sentinel://s1/cache?sentinel_password={NOT_UTF8}",
            RedisSentinelOptions.from_url,
            "an option",
        ),
        (f"redis+sentinel://s1/{NOT_UTF8}", RedisSentinelOptions.from_url, "the service name"),
    ],
    ids=[
        "password",
        "username",
        "tls-password",
        "unix-password",
        "unix-path",
        "cluster",
        "sentinel-data-password",
        "sentinel-password",
        "service-name",
    ],
)
def test_a_url_part_that_is_not_utf8_is_refused_unquoted(
    url: str, parse: Callable[[str], Any], what: str
) -> None:
    # Read with U+FFFD for the byte, the password would fail every login unexplained.
    with pytest.raises(ConfigurationError, match=f"{what} is not UTF-8") as info:
        parse(url)
    assert SECRET not in chain_text(info.value)


def test_a_percent_encoded_utf8_password_is_decoded() -> None:
    assert RedisOptions.from_url("redis://:p%C3%A9%40ss@cache:6379").password == "pé@ss"


@pytest.mark.parametrize(
    "make",
    [
        lambda: RedisOptions(addr="cache:6379", db=2**31),
        lambda: RedisOptions.from_url("redis://cache:6379/2147483648"),
        lambda: RedisOptions.from_url("redis://cache:6379?db=99999999999"),
        lambda: RedisSentinelOptions.from_url("redis+sentinel://s1/cache/2147483648"),
    ],
    ids=["addr", "url-path", "url-query", "sentinel"],
)
def test_a_db_past_the_servers_range_is_refused(make: Callable[[], object]) -> None:
    with pytest.raises(ConfigurationError, match="db must be at most 2147483647"):
        make()
    assert RedisOptions(addr="cache:6379", db=2**31 - 1).db == 2**31 - 1


@pytest.mark.parametrize(
    "url",
    [
        "unix://tmp/redis.sock",  # one slash short: "tmp" would be read as a host, dropped
        "unix://cache:6379/run/redis.sock",
        "unix://:6379/run/redis.sock",
        f"unix://:{SECRET}@cache/run/redis.sock",
    ],
    ids=["relative-path", "host-and-port", "port", "host-after-password"],
)
def test_a_unix_url_with_a_host_or_port_is_refused(url: str) -> None:
    # Dropped silently, "unix://tmp/redis.sock" would connect to /redis.sock.
    with pytest.raises(ConfigurationError, match="unix:// URL takes no host or port") as info:
        RedisOptions.from_url(url)
    assert SECRET not in chain_text(info.value)


def test_a_unix_url_with_credentials_and_an_empty_host_is_read() -> None:
    options = RedisOptions.from_url("unix://app:s%40cret@/run/redis.sock?db=2")
    assert (options.addr, options.username, options.password, options.db) == (
        "/run/redis.sock",
        "app",
        "s@cret",
        2,
    )


@pytest.mark.parametrize(
    "query",
    [
        "db=1_0",
        "db=%2B5",
        "db=%205",
        "db=\u0663",
        "pool_size=1_0",
        "max_retries=%EF%BC%91",  # a fullwidth one
        "read_timeout=1_0",
        "dial_timeout=%201",
        "pool_timeout=\u0663",
        "read_timeout=nan",
    ],
)
def test_numeric_url_options_take_plain_ascii_numbers_only(query: str) -> None:
    # int() and float() also take "1_0", "+5", " 5" and non-ASCII digits: a typo
    # would quietly become another database or another timeout.
    with pytest.raises(ConfigurationError, match="must be"):
        RedisOptions.from_url(f"redis://cache:6379?{query}")


@pytest.mark.parametrize(
    ("query", "field", "value"),
    [
        ("db=12", "db", 12),
        ("pool_size=7", "pool_size", 7),
        ("read_timeout=0.25", "read_timeout", 0.25),
        ("dial_timeout=2", "dial_timeout", 2.0),
        ("pool_timeout=.5", "pool_timeout", 0.5),
        ("read_timeout=1e1", "read_timeout", 10.0),
    ],
)
def test_numeric_url_options_are_read(query: str, field: str, value: float) -> None:
    assert getattr(RedisOptions.from_url(f"redis://cache:6379?{query}"), field) == value


@pytest.mark.parametrize("query", ["db=-1", "read_timeout=-1", "dial_timeout=0"])
def test_negative_or_zero_url_options_are_refused_by_the_options(query: str) -> None:
    with pytest.raises(ConfigurationError, match=r"non-negative|positive"):
        RedisOptions.from_url(f"redis://cache:6379?{query}")


def test_a_ca_file_with_verification_turned_off_is_refused(tmp_path: Path) -> None:
    # The CA would be loaded and never used: the URL cannot mean what it says.
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    url = f"rediss://cache:6380?ssl_cert_reqs=none&ssl_ca_certs={quote(str(ca_file))}"
    with pytest.raises(ConfigurationError, match=r"ssl_ca_certs has no effect with ssl_cert_reqs=none"):
        RedisOptions.from_url(url)
    assert RedisOptions.from_url(url.replace("none", "required")).tls
