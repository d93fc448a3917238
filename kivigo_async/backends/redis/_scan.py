"""SCAN helpers shared by the Redis backends."""

from __future__ import annotations

__all__ = ["SCAN_COUNT", "decode_key", "match_pattern"]

# Keys asked for per SCAN call: large enough that 10,000 keys take a handful of
# round trips, small enough that one call never blocks the server noticeably.
SCAN_COUNT = 1000

_GLOB_SPECIALS = str.maketrans({c: "\\" + c for c in "*?[]\\^"})


def match_pattern(prefix: str) -> str:
    """The SCAN MATCH pattern for keys starting with the literal ``prefix``."""
    return prefix.translate(_GLOB_SPECIALS) + "*"


def decode_key(raw: bytes | str) -> str:
    """Decode a key from the server; bytes that are not UTF-8 survive a round trip."""
    if isinstance(raw, str):
        return raw
    return raw.decode("utf-8", "surrogateescape")
