"""Device profiles: what the planner and the simulator know about one edge device.

A profile is plain data (no torch) so that it can travel in configs, ledgers and
messages; JSON and dict round-trips are exact.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class DeviceProfile:
    """Capabilities of one device (or of a device class).

    ``compute_speed`` is relative work per virtual second (1.0 = reference device), so a
    training step that costs ``w`` work units takes ``w / compute_speed`` seconds.
    Bandwidths are bytes per second; ``availability`` is the fraction of time the device
    is online and idle enough to train.
    """

    name: str
    memory_bytes: int
    compute_speed: float = 1.0
    uplink_bps: float = 1_000_000.0
    downlink_bps: float = 5_000_000.0
    availability: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("DeviceProfile.name must be non-empty")
        if int(self.memory_bytes) <= 0:
            raise ValueError(f"DeviceProfile {self.name!r}: memory_bytes must be > 0, got {self.memory_bytes}")
        for key in ("compute_speed", "uplink_bps", "downlink_bps"):
            if not float(getattr(self, key)) > 0:
                raise ValueError(f"DeviceProfile {self.name!r}: {key} must be > 0, got {getattr(self, key)}")
        if not 0.0 < float(self.availability) <= 1.0:
            raise ValueError(f"DeviceProfile {self.name!r}: availability must be in (0, 1], got {self.availability}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DeviceProfile":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown DeviceProfile fields: {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DeviceProfile":
        return cls.from_dict(json.loads(text))
