"""Run one cohort (one buffer): weight and encode each member's update, aggregate, charge time.

With secure aggregation on, the members' encoded vectors go through the real protocol
(``ftte.crypto.secagg_local``: real keys, masks, Shamir shares, every message encoded),
and the server gets back only the ring sum. With it off, members upload their weighted
float32 update in a :class:`~ftte.round_messages.PlainUpdate` and the server sums them. Either
way the result is ``(Σ w·Δ, Σ w, Σ σ²)`` over the members that made it to the end.

Virtual time: each protocol stage lasts as long as its slowest live member needs to
receive the server's message and send its own (bytes over bandwidth plus a latency each
way); a stage in which some member vanishes lasts at least :data:`STAGE_TIMEOUT_S`,
because the server cannot tell a dropout from a slow device before its timeout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ftte import wire
from ftte.crypto.primitives import Signer
from ftte.crypto.secagg_local import STAGES, run_session
from ftte.crypto.secagg_session import SessionParams
from ftte.edge.encoding import UpdateCodec, weigh_update
from ftte.edge.runtime import LocalUpdate
from ftte.edge.weighting import WeightRule
from ftte.round_messages import PlainUpdate
from ftte.pipeline.fleet import SimDevice

STAGE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class CohortSpec:
    cohort_id: str
    plan_id: str
    model_hash: bytes
    close_version: int
    reference_variance: float | None
    rule: WeightRule
    clip: float
    secure: bool
    value_bits: int = 16
    threshold: int = 2
    graph: str = "full"
    neighbors: int = 0
    latency_s: float = 0.05


@dataclass
class CohortOutcome:
    cohort_id: str
    members: tuple[int, ...]
    included: tuple[int, ...]  # whose updates are in the sum
    dropped: dict[int, str]  # member -> stage at which it vanished
    weighted_sum: np.ndarray | None  # Σ w·Δ (None when aborted)
    weight_sum: float
    variance_sum: float
    duration_s: float
    weights: dict[int, float] = field(default_factory=dict)
    staleness: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    aborted: str = ""

    @property
    def ok(self) -> bool:
        return self.weighted_sum is not None


def draw_dropouts(devices: Sequence[SimDevice], stages: Sequence[str], rng: np.random.Generator) -> dict[int, str]:
    """The first stage (if any) at which each device vanishes."""
    out: dict[int, str] = {}
    for device in devices:
        for stage in stages:
            if device.drops_at(stage, rng):
                out[device.device_id] = stage
                break
    return out


def _stage_seconds(devices: dict[int, SimDevice], up: dict[int, int], down: dict[int, int], latency: float,
                   someone_dropped: bool) -> float:
    longest = 0.0
    for m in set(up) | set(down):
        p = devices[m].profile
        longest = max(longest, down.get(m, 0) / p.downlink_bps + up.get(m, 0) / p.uplink_bps + 2 * latency)
    return max(longest, STAGE_TIMEOUT_S) if someone_dropped else longest


def prepare_member(update: LocalUpdate, spec: CohortSpec) -> tuple[np.ndarray, float, float, int]:
    """What the device does once it learns the close version: (w·Δ, w, σ², τ)."""
    w = weigh_update(update.delta, update.base_version, spec.close_version, spec.reference_variance, spec.rule, spec.clip)
    return w.weighted, w.weight, w.variance, w.staleness


def run_cohort(spec: CohortSpec, members: Sequence[tuple[SimDevice, LocalUpdate]], identities: dict[int, Signer],
               rng: np.random.Generator) -> CohortOutcome:
    devices = {d.device_id: d for d, _ in members}
    ids = tuple(sorted(devices))
    prepared = {d.device_id: prepare_member(u, spec) for d, u in members}
    weights = {m: p[1] for m, p in prepared.items()}
    staleness = {m: p[3] for m, p in prepared.items()}
    dim = next(iter(prepared.values()))[0].shape[0]
    if spec.secure:
        return _secure(spec, ids, devices, prepared, identities, rng, dim, weights, staleness)
    return _plain(spec, ids, devices, prepared, rng, weights, staleness)


def _plain(spec, ids, devices, prepared, rng, weights, staleness) -> CohortOutcome:
    drops = draw_dropouts([devices[m] for m in ids], ["upload"], rng)
    included = tuple(m for m in ids if m not in drops)
    bytes_up, up = {}, {}
    total = None
    wsum = vsum = 0.0
    for m in ids:
        wd, w, var, tau = prepared[m]
        msg = PlainUpdate(m, spec.close_version - tau, wd.astype(np.float32), float(w), float(var))
        data = wire.encode(msg)
        bytes_up[m] = len(data)
        if m in drops:
            continue
        up[m] = len(data)
        back = wire.decode(data, expect=PlainUpdate)
        total = back.vector.astype(np.float64) if total is None else total + back.vector
        wsum += back.weight
        vsum += back.variance
    duration = _stage_seconds(devices, up, {}, spec.latency_s, bool(drops))
    if not included:
        return CohortOutcome(spec.cohort_id, ids, (), drops, None, 0.0, 0.0, duration, weights, staleness, bytes_up,
                             "every member dropped")
    return CohortOutcome(spec.cohort_id, ids, included, drops, total, wsum, vsum, duration, weights, staleness, bytes_up)


def _secure(spec, ids, devices, prepared, identities, rng, dim, weights, staleness) -> CohortOutcome:
    from ftte.crypto.quantize import choose_ring_bits

    codec = UpdateCodec(dim, spec.clip, spec.value_bits, choose_ring_bits(len(ids), spec.value_bits))
    params = SessionParams(
        cohort_id=spec.cohort_id,
        plan_id=spec.plan_id,
        model_hash=spec.model_hash,
        close_version=spec.close_version,
        members=ids,
        identity_keys=tuple(identities[m].public_key for m in ids),
        threshold=min(spec.threshold, len(ids)),
        dim=codec.length,
        ring_bits=codec.ring_bits,
        graph=spec.graph if spec.graph == "full" or spec.neighbors < len(ids) - 1 else "full",
        neighbors=spec.neighbors if spec.graph == "ring" and spec.neighbors < len(ids) - 1 else 0,
    )
    inputs = {m: codec.encode(prepared[m][0], prepared[m][1], prepared[m][2], rng) for m in ids}
    drops = draw_dropouts([devices[m] for m in ids], STAGES, rng)
    result, stats = run_session(params, {m: identities[m] for m in ids}, inputs, drops)
    duration = 0.0
    for stage in STAGES:
        dropped_here = any(s == stage for s in drops.values())
        duration += _stage_seconds(devices, stats.stage_up.get(stage, {}), stats.stage_down.get(stage, {}),
                                   spec.latency_s, dropped_here)
    bytes_up = dict(stats.bytes_up)
    if result is None:
        return CohortOutcome(spec.cohort_id, ids, (), drops, None, 0.0, 0.0, duration, weights, staleness, bytes_up,
                             stats.aborted)
    wsum_vec, wsum, vsum = codec.decode_sum(result.total, len(result.survivors))
    return CohortOutcome(spec.cohort_id, ids, result.survivors, drops, wsum_vec, wsum, vsum, duration, weights,
                         staleness, bytes_up)
