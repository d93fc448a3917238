"""What turning the session value into bytes and back costs, per codec (pure CPU, no I/O).

"Typed" decodes into the ``Session`` msgspec Struct: msgspec decoders do it in one
pass; stdlib json and orjson need a second step (``msgspec.convert``) to validate
the plain dict into the type, which is what an application using them would pay.
kivigo-async's own codecs are measured through their public ``encode``/``decode``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson
from workload import SESSION, Session

from kivigo_async import JsonCodec, MsgspecCodec


@dataclass(frozen=True)
class Codec:
    name: str
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]
    decode_typed: Callable[[bytes], Any]


def _codecs() -> list[Codec]:
    mj_enc, mj_dec, mj_typed = msgspec.json.Encoder(), msgspec.json.Decoder(), msgspec.json.Decoder(Session)
    mp_enc, mp_dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
    mp_typed = msgspec.msgpack.Decoder(Session)
    kj, km = JsonCodec(), MsgspecCodec("msgpack")
    return [
        Codec(
            "stdlib json",
            lambda v: json.dumps(v, separators=(",", ":")).encode(),
            json.loads,
            lambda b: msgspec.convert(json.loads(b), Session),
        ),
        Codec("orjson", orjson.dumps, orjson.loads, lambda b: msgspec.convert(orjson.loads(b), Session)),
        Codec("msgspec json", mj_enc.encode, mj_dec.decode, mj_typed.decode),
        Codec("msgspec msgpack", mp_enc.encode, mp_dec.decode, mp_typed.decode),
        Codec(
            "kivigo JsonCodec",
            kj.encode,
            lambda b: kj.decode(b, object),
            lambda b: kj.decode(b, Session),
        ),
        Codec(
            'kivigo MsgspecCodec("msgpack")',
            km.encode,
            lambda b: km.decode(b, object),
            lambda b: km.decode(b, Session),
        ),
    ]


CODECS = _codecs()
BASELINE = "stdlib json"


def _per_call_us(fn: Callable[[Any], Any], arg: Any, loops: int) -> float:
    t0 = time.perf_counter()
    for _ in range(loops):
        fn(arg)
    return (time.perf_counter() - t0) / loops * 1e6


def check() -> None:
    """Every codec round-trips the value (untyped and typed) before it is timed."""
    typed = msgspec.convert(SESSION, Session)
    for codec in CODECS:
        data = codec.encode(SESSION)
        if codec.decode(data) != SESSION or codec.decode_typed(data) != typed:
            raise RuntimeError(f"codec {codec.name} does not round-trip the session value")


def measure(codec: Codec, loops: int) -> dict[str, float]:
    """Microseconds per call for encode, untyped decode and typed decode."""
    data = codec.encode(SESSION)
    return {
        "size_bytes": float(len(data)),
        "encode_us": _per_call_us(codec.encode, SESSION, loops),
        "decode_us": _per_call_us(codec.decode, data, loops),
        "decode_typed_us": _per_call_us(codec.decode_typed, data, loops),
    }
