"""The wire codec: dataclass messages <-> msgpack bytes with a versioned schema.

A message is encoded as the msgpack array ``[SCHEMA_VERSION, tag, field_1, ..., field_n]``
in declaration order (no field names on the wire: they cost bytes on every upload).
Decoding treats its input as hostile: the byte length, msgpack container sizes, the
version, the tag, the field count and every field's type, size and range are checked
before any array is built, and ring vectors are wrapped zero-copy with ``np.frombuffer``.

Decoding is a walk driven by the expected schema, not ``msgpack.unpackb`` followed by a
check: ``unpackb`` builds the whole object tree first, and one byte of msgpack (an empty
array) becomes a 56-byte Python list, so a 64 MiB body of nested empty arrays used to grow
to gigabytes before any field was looked at. Here the decoder reads one container header
or one scalar at a time, peeks at each value's first byte to refuse a container where the
schema wants a scalar, and checks every list's length against what its field allows (and
against the bytes left) before reading its items. What it builds is therefore bounded by
the schema, and a hostile body is refused after building at most a few objects.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TypeVar

import msgpack
import numpy as np

# 1: the first release. 2: nine messages gained fields since (CohortStart's colluder bound,
# TaskInfo's contribution terms and privacy policy, JoinRequest's signed spend, the ring
# nonces and commitments of the secure-aggregation messages). A peer on another version is
# refused by its version, before any field is read.
SCHEMA_VERSION = 2
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a 16M-coordinate uint32 vector plus overhead
MAX_LIST_ITEMS = 100_000
MAX_COORDINATES = 16 * 1024 * 1024
MAX_FIELDS = 64  # no message has more; the top-level array may not be longer than 2 + this
U64_MAX = 2**64 - 1

RING_DTYPES = {16: np.dtype("<u2"), 32: np.dtype("<u4")}


READ_CHUNK = 1024 * 1024  # bytes the unpacker pulls from the body at a time
MAX_STR_BYTES = 64 * 1024 * 4  # the longest text field (64 Ki characters) in UTF-8


class WireError(ValueError):
    """An encoded message is malformed, oversized, of an unknown kind or version."""


# --- a bounded, schema-driven reader ------------------------------------------------------

def _is_container_or_ext(first: int) -> bool:
    """Does a msgpack value starting with byte ``first`` open an array, a map or an extension?"""
    return (0x80 <= first <= 0x9F  # fixmap, fixarray
            or first in (0xDC, 0xDD, 0xDE, 0xDF)  # array16/32, map16/32
            or first in (0xC7, 0xC8, 0xC9)  # ext8/16/32
            or 0xD4 <= first <= 0xD8)  # fixext


def _is_array(first: int) -> bool:
    return 0x90 <= first <= 0x9F or first in (0xDC, 0xDD)


class Reader:
    """Reads one msgpack value at a time from untrusted bytes, building nothing it was not asked for.

    ``msgpack.Unpacker`` does the byte-level work in C; this class only looks at the next
    value's first byte (``tell()`` is the offset into the buffer) so that a scalar read can
    never expand into a tree, and so that a list's length is known before its items are read.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        # Read through a file-like view in chunks (BytesIO shares the bytes, no copy): the
        # unpacker's own buffer then grows only as far as the values actually read, so a body
        # refused early costs one chunk, not a second copy of the body.
        self._u = msgpack.Unpacker(
            io.BytesIO(data),
            read_size=READ_CHUNK,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_buffer_size=self.size + READ_CHUNK,
            max_bin_len=self.size,
            max_str_len=MAX_STR_BYTES,
            max_array_len=MAX_LIST_ITEMS,
            max_map_len=0,
            max_ext_len=0,
        )

    @property
    def position(self) -> int:
        return self._u.tell()

    @property
    def remaining(self) -> int:
        return self.size - self._u.tell()

    def _peek(self, where: str) -> int:
        pos = self._u.tell()
        if pos >= self.size:
            raise WireError(f"{where}: the message ends early")
        return self.data[pos]

    def array(self, where: str, max_items: int, what: str = "a list") -> int:
        """The length of the array that comes next (its items are then read one by one)."""
        if not _is_array(self._peek(where)):
            raise WireError(f"{where}: expected {what}")
        n = self._u.read_array_header()
        # every item takes at least one byte: a count above the bytes left is a lie
        if n > max_items or n > self.remaining:
            raise WireError(f"{where}: expected {what} of at most {max_items} items, got {n}")
        return n

    def scalar(self, where: str) -> Any:
        """The next value, which must not be a container (nil, bool, int, float, str or bin)."""
        if _is_container_or_ext(self._peek(where)):
            raise WireError(f"{where}: expected a single value, got a container")
        return self._u.unpack()


# --- field kinds ------------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """How one field is checked on decode and turned into wire values on encode."""

    name: str
    check: Callable[[Any, str], Any]
    to_wire: Callable[[Any], Any] = lambda v: v
    # Reads and checks one value from a :class:`Reader`; None: a scalar, read then checked.
    read: Callable[["Reader", str], Any] | None = None

    def decode_from(self, reader: "Reader", where: str) -> Any:
        if self.read is not None:
            return self.read(reader, where)
        return self.check(reader.scalar(where), where)


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


def _read_id_list(reader: Reader, where: str) -> tuple[int, ...]:
    n = reader.array(where, MAX_LIST_ITEMS, "a list of member ids")
    return tuple(_u64(reader.scalar(where), where) for _ in range(n))


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

    def read(reader: Reader, where: str) -> tuple[tuple[int, Any], ...]:
        n = reader.array(where, MAX_LIST_ITEMS, "a list of [id, value] pairs")
        out = []
        for _ in range(n):
            if reader.array(where, 2, "[id, value] pairs") != 2:
                raise WireError(f"{where}: expected [id, value] pairs")
            key = _u64(reader.scalar(where), where)
            out.append((key, payload.decode_from(reader, where)))
        return tuple(out)

    return Kind(f"pairs[{payload.name}]", check, lambda v: [[k, payload.to_wire(x)] for k, x in v], read)


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


def _read_ring_vector(reader: Reader, where: str) -> np.ndarray:
    if reader.array(where, 2, "[ring_bits, data]") != 2:
        raise WireError(f"{where}: expected [ring_bits, data]")
    return _ring_vector([reader.scalar(where), reader.scalar(where)], where)


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
IDS = Kind("ids", _id_list, list, _read_id_list)
KEY32 = _fixed_bytes(32)
SIG64 = _fixed_bytes(64)
RING_VECTOR = Kind("ring_vector", _ring_vector, _ring_vector_to_wire, _read_ring_vector)


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
        if len(dataclasses.fields(cls)) > MAX_FIELDS:
            raise RuntimeError(f"{cls.__name__} has more than {MAX_FIELDS} fields")
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
    """Decode untrusted bytes into a message, checking everything before building arrays.

    The walk follows the schema of the tag it finds: at most ``2 + fields`` values at the
    top level, and inside a field only what that field's kind allows. Peak memory is the
    body, one copy of it inside the unpacker, and the checked values themselves.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("message must be bytes")
    size = data.nbytes if isinstance(data, memoryview) else len(data)  # len() of a typed view counts items
    if size > max_bytes:
        raise WireError(f"message of {size} bytes exceeds the limit of {max_bytes}")
    if not isinstance(data, bytes):
        data = memoryview(data).cast("B").tobytes() if isinstance(data, memoryview) else bytes(data)
    try:
        return _decode(Reader(data), expect)
    except WireError:
        raise
    except (ValueError, msgpack.UnpackException, TypeError, BufferError) as exc:
        raise WireError(f"not a valid msgpack message: {type(exc).__name__}: {exc}") from None


def _decode(reader: Reader, expect: type[M] | None) -> M:
    shape = "message must be a msgpack array [version, tag, fields...]"
    if reader.size == 0 or not _is_array(reader.data[0]):
        raise WireError(shape)
    count = reader.array("message", MAX_FIELDS + 2, "a msgpack array [version, tag, fields...]")
    if count < 2:
        raise WireError(shape)
    version = reader.scalar("version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise WireError(f"unsupported schema version {version!r} (this side speaks {SCHEMA_VERSION})")
    tag = reader.scalar("tag")
    cls = _REGISTRY.get(tag) if type(tag) is int else None
    if cls is None:
        raise WireError(f"unknown message tag {tag!r}")
    if expect is not None and cls is not expect:
        raise WireError(f"expected {expect.__name__}, got {cls.__name__}")
    fields = dataclasses.fields(cls)
    if count != 2 + len(fields):
        raise WireError(f"{cls.__name__}: expected {len(fields)} fields, got {count - 2}")
    kwargs = {f.name: f.metadata["kind"].decode_from(reader, f"{cls.__name__}.{f.name}") for f in fields}
    if reader.remaining:
        raise WireError(f"{cls.__name__}: {reader.remaining} bytes after the message")
    return cls(**kwargs)  # type: ignore[return-value]
