"""The wire codec treats its input as hostile."""

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ftte import wire
from ftte.secagg_messages import (
    AdvertiseKeys,
    MaskedInput,
    ShareKeys,
    SurvivorList,
    UnmaskShares,
)


def sample_messages():
    return [
        AdvertiseKeys(b"c" * 32, 7, b"a" * 32, b"b" * 32, b"s" * 64),
        ShareKeys(b"s" * 32, 3, b"h" * 32, ((1, b"x" * 94), (2, b"y" * 94)), b"g" * 64),
        MaskedInput(b"s" * 32, 2, np.arange(10, dtype=np.uint16), b"g" * 64),
        MaskedInput(b"s" * 32, 2, np.arange(10, dtype=np.uint32), b"g" * 64),
        SurvivorList(b"s" * 32, (1, 2, 5)),
        UnmaskShares(b"s" * 32, 1, ((2, b"v" * 33),), (), b"g" * 64),
    ]


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    back = wire.decode(wire.encode(msg))
    assert type(back) is type(msg)
    for name in msg.__dataclass_fields__:
        a, b = getattr(msg, name), getattr(back, name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        else:
            assert a == b


def test_masked_vector_costs_its_ring_width_on_the_wire():
    vec = np.zeros(100_000, dtype=np.uint16)
    size = len(wire.encode(MaskedInput(b"s" * 32, 1, vec, b"g" * 64)))
    assert 200_000 <= size <= 200_000 + 120


def test_expect_mismatch_and_unknown_tag():
    data = wire.encode(SurvivorList(b"s" * 32, (1,)))
    with pytest.raises(wire.WireError, match="expected AdvertiseKeys"):
        wire.decode(data, expect=AdvertiseKeys)
    with pytest.raises(wire.WireError, match="unknown message tag"):
        wire.decode(msgpack.packb([wire.SCHEMA_VERSION, 999, b"x"]))
    with pytest.raises(wire.WireError, match="schema version"):
        wire.decode(msgpack.packb([99, 6, b"s" * 32, [1]]))


@pytest.mark.parametrize(
    "payload,match",
    [
        ([1, 6, b"s" * 32], "fields"),  # missing a field
        ([1, 6, b"s" * 31, [1]], "32 bytes"),  # short session id
        ([1, 6, b"s" * 32, [-1]], "unsigned"),  # negative id
        ([1, 6, b"s" * 32, [1.5]], "unsigned"),
        ([1, 6, b"s" * 32, "notalist"], "list"),
        ([1, 5, b"s" * 32, 1, [8, b"\x00" * 4], b"g" * 64, []], "ring bits"),
        ([1, 5, b"s" * 32, 1, [16, b"\x00" * 3], b"g" * 64, []], "bad length"),
        ([1, 5, b"s" * 32, 1, [16, "text"], b"g" * 64, []], "bad length"),
        ([1, 5, b"s" * 32, 1, [16], b"g" * 64, []], "ring_bits, data"),
        ({"t": 6}, "msgpack"),
        ("hello", "array"),
    ],
)
def test_malformed_fields_are_rejected(payload, match):
    with pytest.raises(wire.WireError, match=match):
        wire.decode(msgpack.packb(payload, use_bin_type=True))


def test_oversized_and_deeply_nested_input_rejected_before_parsing():
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.decode(b"\x00" * 2000, max_bytes=1000)
    deep = b"\x91" * 100_000 + b"\x00"  # 100k nested one-element arrays
    with pytest.raises(wire.WireError):
        wire.decode(deep)
    with pytest.raises(wire.WireError):
        wire.decode(b"\xc4\xff")  # truncated bin
    with pytest.raises(wire.WireError):
        wire.decode("not bytes")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_decoder(data):
    try:
        wire.decode(data)
    except wire.WireError:
        pass
