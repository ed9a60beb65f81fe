"""The wire codec: dataclass messages <-> msgpack bytes with a versioned schema.

A message is encoded as the msgpack array ``[SCHEMA_VERSION, tag, field_1, ..., field_n]``
in declaration order (no field names on the wire: they cost bytes on every upload).
Decoding treats its input as hostile: the byte length, msgpack container sizes, the
version, the tag, the field count and every field's type, size and range are checked
before any array is built, and ring vectors are wrapped zero-copy with ``np.frombuffer``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TypeVar

import msgpack
import numpy as np

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a 16M-coordinate uint32 vector plus overhead
MAX_LIST_ITEMS = 100_000
MAX_COORDINATES = 16 * 1024 * 1024
U64_MAX = 2**64 - 1

RING_DTYPES = {16: np.dtype("<u2"), 32: np.dtype("<u4")}


class WireError(ValueError):
    """An encoded message is malformed, oversized, of an unknown kind or version."""


# --- field kinds ------------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """How one field is checked on decode and turned into wire values on encode."""

    name: str
    check: Callable[[Any, str], Any]
    to_wire: Callable[[Any], Any] = lambda v: v


def _u64(value: Any, where: str) -> int:
    if type(value) is not int or not 0 <= value <= U64_MAX:
        raise WireError(f"{where}: expected an unsigned 64-bit integer")
    return value


def _fixed_bytes(n: int) -> Kind:
    def check(value: Any, where: str) -> bytes:
        if type(value) is not bytes or len(value) != n:
            raise WireError(f"{where}: expected {n} bytes")
        return value

    return Kind(f"bytes[{n}]", check)


def _var_bytes(max_len: int) -> Kind:
    def check(value: Any, where: str) -> bytes:
        if type(value) is not bytes or len(value) > max_len:
            raise WireError(f"{where}: expected at most {max_len} bytes")
        return value

    return Kind(f"bytes[<={max_len}]", check)


def _text(max_len: int) -> Kind:
    def check(value: Any, where: str) -> str:
        if type(value) is not str or len(value) > max_len:
            raise WireError(f"{where}: expected a string of at most {max_len} characters")
        return value

    return Kind("str", check)


def _id_list(value: Any, where: str) -> tuple[int, ...]:
    if type(value) is not list or len(value) > MAX_LIST_ITEMS:
        raise WireError(f"{where}: expected a list of member ids")
    return tuple(_u64(v, where) for v in value)


def _pair_list(payload: Kind) -> Kind:
    def check(value: Any, where: str) -> tuple[tuple[int, Any], ...]:
        if type(value) is not list or len(value) > MAX_LIST_ITEMS:
            raise WireError(f"{where}: expected a list of [id, value] pairs")
        out = []
        for item in value:
            if type(item) is not list or len(item) != 2:
                raise WireError(f"{where}: expected [id, value] pairs")
            out.append((_u64(item[0], where), payload.check(item[1], where)))
        return tuple(out)

    return Kind(f"pairs[{payload.name}]", check, lambda v: [[k, payload.to_wire(x)] for k, x in v])


def _ring_vector(value: Any, where: str) -> np.ndarray:
    if type(value) is not list or len(value) != 2:
        raise WireError(f"{where}: expected [ring_bits, data]")
    bits, data = value
    if type(bits) is not int or bits not in RING_DTYPES:
        raise WireError(f"{where}: ring bits must be one of {sorted(RING_DTYPES)}")
    dtype = RING_DTYPES[bits]
    if type(data) is not bytes or len(data) % dtype.itemsize or len(data) // dtype.itemsize > MAX_COORDINATES:
        raise WireError(f"{where}: vector data has a bad length for a {bits}-bit ring")
    return np.frombuffer(data, dtype=dtype)


def _ring_vector_to_wire(vec: np.ndarray) -> list:
    for bits, dtype in RING_DTYPES.items():
        if vec.dtype == dtype or vec.dtype == dtype.newbyteorder("="):
            return [bits, np.ascontiguousarray(vec, dtype=dtype).tobytes()]
    raise WireError(f"ring vectors must be uint16 or uint32, got {vec.dtype}")


def _f32_vector(value: Any, where: str) -> np.ndarray:
    if type(value) is not bytes or len(value) % 4 or len(value) // 4 > MAX_COORDINATES:
        raise WireError(f"{where}: expected float32 data of at most {MAX_COORDINATES} values")
    vec = np.frombuffer(value, dtype="<f4")
    if not np.isfinite(vec).all():
        raise WireError(f"{where}: NaN or infinite values")
    return vec


def _f32_to_wire(vec: np.ndarray) -> bytes:
    return np.ascontiguousarray(vec, dtype="<f4").tobytes()


def _f64(value: Any, where: str) -> float:
    if type(value) is not float or not np.isfinite(value):
        raise WireError(f"{where}: expected a finite float")
    return value


U64 = Kind("u64", _u64)
F64 = Kind("f64", _f64, float)
F32_VECTOR = Kind("f32_vector", _f32_vector, _f32_to_wire)
IDS = Kind("ids", _id_list, list)
KEY32 = _fixed_bytes(32)
SIG64 = _fixed_bytes(64)
RING_VECTOR = Kind("ring_vector", _ring_vector, _ring_vector_to_wire)


def fixed_bytes(n: int) -> Kind:
    return _fixed_bytes(n)


def var_bytes(max_len: int) -> Kind:
    return _var_bytes(max_len)


def text(max_len: int = 256) -> Kind:
    return _text(max_len)


def pairs(payload: Kind) -> Kind:
    return _pair_list(payload)


def field(kind: Kind, **kwargs: Any) -> Any:
    """A dataclass field that carries its wire kind."""
    return dataclasses.field(metadata={"kind": kind}, **kwargs)


# --- registry ---------------------------------------------------------------------------

M = TypeVar("M", bound="Message")
_REGISTRY: dict[int, type["Message"]] = {}


class Message:
    """Base of every wire message; subclasses are frozen dataclasses with a unique ``TAG``."""

    TAG: ClassVar[int]


def message(tag: int) -> Callable[[type[M]], type[M]]:
    """Register a frozen dataclass as a wire message under ``tag``."""

    def wrap(cls: type[M]) -> type[M]:
        if tag in _REGISTRY:
            raise RuntimeError(f"wire tag {tag} used twice ({_REGISTRY[tag].__name__}, {cls.__name__})")
        cls = dataclass(frozen=True)(cls)
        for f in dataclasses.fields(cls):
            if "kind" not in f.metadata:
                raise RuntimeError(f"{cls.__name__}.{f.name} has no wire kind")
        cls.TAG = tag
        _REGISTRY[tag] = cls
        return cls

    return wrap


def encode(msg: Message) -> bytes:
    values: list[Any] = [SCHEMA_VERSION, msg.TAG]
    for f in dataclasses.fields(msg):
        values.append(f.metadata["kind"].to_wire(getattr(msg, f.name)))
    return msgpack.packb(values, use_bin_type=True)


def decode(data: bytes, expect: type[M] | None = None, max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Decode untrusted bytes into a message, checking everything before building arrays."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("message must be bytes")
    size = data.nbytes if isinstance(data, memoryview) else len(data)  # len() of a typed view counts items
    if size > max_bytes:
        raise WireError(f"message of {size} bytes exceeds the limit of {max_bytes}")
    try:
        values = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=64 * 1024,
            max_array_len=MAX_LIST_ITEMS,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError, BufferError) as exc:
        raise WireError(f"not a valid msgpack message: {exc}") from None
    if type(values) is not list or len(values) < 2:
        raise WireError("message must be a msgpack array [version, tag, fields...]")
    version, tag = values[0], values[1]
    if version != SCHEMA_VERSION or type(version) is not int:
        raise WireError(f"unsupported schema version {version!r} (this side speaks {SCHEMA_VERSION})")
    cls = _REGISTRY.get(tag) if type(tag) is int else None
    if cls is None:
        raise WireError(f"unknown message tag {tag!r}")
    if expect is not None and cls is not expect:
        raise WireError(f"expected {expect.__name__}, got {cls.__name__}")
    fields = dataclasses.fields(cls)
    if len(values) != 2 + len(fields):
        raise WireError(f"{cls.__name__}: expected {len(fields)} fields, got {len(values) - 2}")
    kwargs = {f.name: f.metadata["kind"].check(v, f"{cls.__name__}.{f.name}") for f, v in zip(fields, values[2:])}
    return cls(**kwargs)  # type: ignore[return-value]
