"""Fleet: proportions honoured exactly, shorthand expansion, overrides, determinism."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftte.edge.profile import DeviceProfile
from ftte.pipeline.config import STRAGGLER_CLASS, Config, ConfigError, DeviceClass, FleetConfig, StageDropout
from ftte.pipeline.fleet import STAGES, SimDevice, build_fleet, class_counts, weakest_memory_bytes


def test_shorthand_500_devices_90_percent_stragglers():
    fleet = build_fleet(FleetConfig(devices=500, stragglers=0.9), None, seed=0)
    assert [d.device_id for d in fleet] == list(range(500))
    counts = Counter(d.class_name for d in fleet)
    assert counts == {"straggler": 450, "fast": 50}
    slow = next(d for d in fleet if d.class_name == "straggler")
    fast = next(d for d in fleet if d.class_name == "fast")
    assert isinstance(slow.profile, DeviceProfile)
    assert slow.profile.compute_speed < fast.profile.compute_speed
    assert slow.profile.memory_bytes < fast.profile.memory_bytes
    assert slow.profile.uplink_bps < fast.profile.uplink_bps
    assert slow.profile.downlink_bps < fast.profile.downlink_bps
    assert set(slow.dropout) == set(STAGES)
    assert slow.dropout["train"] == STRAGGLER_CLASS.dropout.train
    assert weakest_memory_bytes(fleet) == FleetConfig().straggler_memory_bytes  # the key, 8 MiB by default
    small = build_fleet(FleetConfig(devices=20, stragglers=0.9, straggler_memory_bytes=2 << 20), None, seed=0)
    assert weakest_memory_bytes(small) == 2 << 20
    # stragglers are shuffled through the id range, not bunched at one end
    ids = [d.device_id for d in fleet if d.class_name == "fast"]
    assert min(ids) < 250 < max(ids)


def test_no_stragglers_gives_one_class():
    fleet = build_fleet(FleetConfig(devices=10, stragglers=0.0), None, seed=0)
    assert {d.class_name for d in fleet} == {"fast"}


def test_explicit_classes_override_shorthand():
    classes = (
        DeviceClass(name="phone", fraction=0.25, memory_bytes=1 << 26, dropout=StageDropout(upload=0.2)),
        DeviceClass(name="watch", fraction=0.5, compute_speed=0.05, memory_bytes=1 << 20),
        DeviceClass(name="sensor", fraction=0.25, compute_speed=0.01, memory_bytes=1 << 18),
    )
    fleet = build_fleet(FleetConfig(devices=100, stragglers=0.9, classes=classes), None, seed=3)
    assert Counter(d.class_name for d in fleet) == {"phone": 25, "watch": 50, "sensor": 25}
    phone = next(d for d in fleet if d.class_name == "phone")
    assert phone.dropout_at("upload") == 0.2 and phone.dropout_at("train") == 0.0
    with pytest.raises(KeyError, match="unknown stage"):
        phone.dropout_at("download")


@settings(max_examples=80, deadline=None)
@given(
    weights=st.lists(st.integers(1, 50), min_size=1, max_size=6),
    n=st.integers(1, 1000),
)
def test_class_counts_honour_fractions(weights, n):
    fractions = [w / sum(weights) for w in weights]
    counts = class_counts(fractions, n)
    assert sum(counts) == n
    for c, f in zip(counts, fractions):
        assert abs(c - f * n) < 1.0


def test_fractions_must_sum_to_one():
    with pytest.raises(ConfigError, match="fractions must sum to 1"):
        FleetConfig(classes=(DeviceClass(name="a", fraction=0.5), DeviceClass(name="b", fraction=0.4)))
    with pytest.raises(ConfigError, match="unique"):
        FleetConfig(classes=(DeviceClass(name="a", fraction=0.5), DeviceClass(name="a", fraction=0.5)))


def test_deterministic_under_seed():
    cfg = Config().fleet
    a = [d.class_name for d in build_fleet(cfg, 200, seed=5)]
    b = [d.class_name for d in build_fleet(cfg, 200, seed=5)]
    c = [d.class_name for d in build_fleet(cfg, 200, seed=6)]
    assert a == b and a != c


def test_sim_device_validates_dropout_and_draws():
    dev = SimDevice(0, DeviceProfile(name="x", memory_bytes=1), "x", {"train": 0.5})
    assert dev.dropout == {s: (0.5 if s == "train" else 0.0) for s in STAGES}
    rng = np.random.default_rng(0)
    drops = sum(dev.drops_at("train", rng) for _ in range(2000))
    assert 850 < drops < 1150
    assert not any(dev.drops_at("upload", rng) for _ in range(100))
    with pytest.raises(ValueError, match="unknown dropout stage"):
        SimDevice(0, DeviceProfile(name="x", memory_bytes=1), "x", {"download": 0.1})
    with pytest.raises(ValueError, match="must be in"):
        SimDevice(0, DeviceProfile(name="x", memory_bytes=1), "x", {"train": 1.0})
