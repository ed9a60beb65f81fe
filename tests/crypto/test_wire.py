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

V = wire.SCHEMA_VERSION


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


def test_a_first_release_message_is_refused_by_its_version_not_by_a_field_count():
    """Messages gained fields after the first release (CohortStart's contribution terms and
    colluder bound among them); a version-1 peer is told which versions differ."""
    old = msgpack.packb([1] + list(msgpack.unpackb(wire.encode(SurvivorList(b"s" * 32, (1,))))[1:]))
    with pytest.raises(wire.WireError, match=r"unsupported schema version 1 \(this side speaks 2\)"):
        wire.decode(old)


@pytest.mark.parametrize(
    "payload,match",
    [
        ([V, 6, b"s" * 32], "fields"),  # missing a field
        ([V, 6, b"s" * 31, [1]], "32 bytes"),  # short session id
        ([V, 6, b"s" * 32, [-1]], "unsigned"),  # negative id
        ([V, 6, b"s" * 32, [1.5]], "unsigned"),
        ([V, 6, b"s" * 32, "notalist"], "list"),
        ([V, 5, b"s" * 32, 1, [8, b"\x00" * 4], b"g" * 64, []], "ring bits"),
        ([V, 5, b"s" * 32, 1, [16, b"\x00" * 3], b"g" * 64, []], "bad length"),
        ([V, 5, b"s" * 32, 1, [16, "text"], b"g" * 64, []], "bad length"),
        ([V, 5, b"s" * 32, 1, [16], b"g" * 64, []], "ring_bits, data"),
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


# --- hostile bodies: the decoder bounds what it builds (issue 10, finding 8) -----------------

import tracemalloc  # noqa: E402

from ftte.bench import hostile_body  # noqa: E402
from ftte.deploy_messages import JoinRequest, Submit  # noqa: E402

HOSTILE_EXPECT = {"join_with_junk_pairs": JoinRequest, "ids_of_arrays": SurvivorList}


@pytest.mark.parametrize("case", ["nested_empty_arrays", "deep_nesting", "join_with_junk_pairs", "ids_of_arrays"])
def test_hostile_body_is_refused_building_less_than_the_body(case):
    """8 MiB of msgpack that ``unpackb`` would turn into ~500 MB of Python lists is refused while
    the decoder allocates no more than its read chunk twice over (tracemalloc sees msgpack's
    buffer), whatever the body's size."""
    body = hostile_body.BUILDERS[case](8 * 1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(wire.WireError):
            wire.decode(body, expect=HOSTILE_EXPECT.get(case))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * wire.READ_CHUNK + 512 * 1024 < len(body) // 2, (case, peak, len(body))


def test_submit_wrapping_junk_decodes_the_envelope_then_refuses_the_payload():
    body = hostile_body.submit_wrapping_junk(8 * 1024 * 1024)
    outer = wire.decode(body, expect=Submit)
    tracemalloc.start()
    try:
        with pytest.raises(wire.WireError, match="container|array"):
            wire.decode(outer.payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * wire.READ_CHUNK + 512 * 1024 < len(outer.payload) // 2


def test_list_lengths_are_checked_against_the_bytes_left():
    # an id list that claims 100 000 ids but carries 3: refused at the header, nothing read
    head = b"".join(msgpack.packb(v, use_bin_type=True) for v in (V, 6, b"s" * 32))
    body = b"\x94" + head + b"\xdc" + (60_000).to_bytes(2, "big") + b"\x01\x02\x03"
    with pytest.raises(wire.WireError, match="at most"):
        wire.decode(body)


def test_trailing_bytes_and_scalars_in_place_of_lists_are_refused():
    data = wire.encode(SurvivorList(b"s" * 32, (1, 2)))
    with pytest.raises(wire.WireError, match="after the message"):
        wire.decode(data + b"\x00")
    with pytest.raises(wire.WireError, match="container"):
        wire.decode(msgpack.packb([V, 6, [b"s" * 32], [1]], use_bin_type=True))
    with pytest.raises(wire.WireError, match="container"):
        wire.decode(msgpack.packb([V, 6, b"s" * 32, [[1]]], use_bin_type=True))
    with pytest.raises(wire.WireError, match="pairs"):
        wire.decode(msgpack.packb([V, 3, b"s" * 32, 1, b"h" * 32, [[2]], b"g" * 64, b"n" * 32], use_bin_type=True))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), max_size=300),
       st.lists(st.tuples(st.integers(0, 2**64 - 1), st.binary(min_size=33, max_size=33)), max_size=50))
def test_schema_walk_round_trips_what_encode_writes(ids, shares):
    survivors = SurvivorList(b"s" * 32, tuple(ids))
    assert wire.decode(wire.encode(survivors)) == survivors
    unmask = UnmaskShares(b"s" * 32, 7, tuple(shares), tuple(shares[:3]), b"g" * 64)
    assert wire.decode(wire.encode(unmask)) == unmask


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.integers(0, 10_000))
def test_mutated_messages_decode_or_raise_wire_error(noise, at):
    data = bytearray(wire.encode(UnmaskShares(b"s" * 32, 1, ((2, b"v" * 33),), ((3, b"w" * 33),), b"g" * 64)))
    at %= len(data)
    data[at:at + len(noise)] = noise
    try:
        wire.decode(bytes(data))
    except wire.WireError:
        pass
