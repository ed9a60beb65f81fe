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
from ftte.crypto.secagg_local import run_session
from ftte.crypto.stages import STAGE_LABELS
from ftte.edge.runtime import LocalUpdate
from ftte.pipeline.fleet import SimDevice
from ftte.pipeline.server_model import CohortResult, CohortSum
from ftte.protocol.cohort import codec_for, reference_of, session_params, weight_rule
from ftte.protocol.encoding import weigh_update
from ftte.deploy_messages import CohortStart
from ftte.round_messages import PlainUpdate

STAGE_TIMEOUT_S = 10.0


@dataclass
class CohortRun:
    """A cohort as the simulator ran it: the result the server core applies, and what it cost."""

    result: CohortResult
    bytes_up: dict[int, int] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.result.duration_s


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


def prepare_member(update: LocalUpdate, start: CohortStart) -> tuple[np.ndarray, float, float, int]:
    """What the device does once it learns the cohort: (w·Δ, w, σ², τ)."""
    w = weigh_update(update.delta, update.base_version, start.close_version, reference_of(start), weight_rule(start),
                     start.clip)
    return w.weighted, w.weight, w.variance, w.staleness


def run_cohort(start: CohortStart, members: Sequence[tuple[SimDevice, LocalUpdate]], identities: dict[int, Signer],
               rng: np.random.Generator, *, secure: bool, latency_s: float) -> CohortRun:
    devices = {d.device_id: d for d, _ in members}
    ids = tuple(sorted(devices))
    if ids != tuple(start.members):
        raise ValueError("the cohort start does not list the members being run")
    prepared = {d.device_id: prepare_member(u, start) for d, u in members}
    weights = {m: p[1] for m, p in prepared.items()}
    staleness = {m: p[3] for m, p in prepared.items()}
    if secure:
        return _secure(start, ids, devices, prepared, identities, rng, latency_s, weights, staleness)
    return _plain(start, ids, devices, prepared, rng, latency_s, weights, staleness)


def _result(start: CohortStart, drops: dict[int, str], staleness: dict[int, int], duration: float,
            total: CohortSum | None, aborted: str = "") -> CohortResult:
    return CohortResult(start.cohort_id, start.close_version, tuple(start.members), drops, staleness, duration, total,
                        aborted, start)


def _plain(start, ids, devices, prepared, rng, latency_s, weights, staleness) -> CohortRun:
    drops = draw_dropouts([devices[m] for m in ids], ["upload"], rng)
    included = tuple(m for m in ids if m not in drops)
    bytes_up, up = {}, {}
    total = None
    wsum = vsum = 0.0
    for m in ids:
        wd, w, var, tau = prepared[m]
        msg = PlainUpdate(m, start.close_version - tau, wd.astype(np.float32), float(w), float(var))
        data = wire.encode(msg)
        bytes_up[m] = len(data)
        if m in drops:
            continue
        up[m] = len(data)
        back = wire.decode(data, expect=PlainUpdate)
        total = back.vector.astype(np.float64) if total is None else total + back.vector
        wsum += back.weight
        vsum += back.variance
    duration = _stage_seconds(devices, up, {}, latency_s, bool(drops))
    if not included:
        return CohortRun(_result(start, drops, staleness, duration, None, "every member dropped"), bytes_up, weights)
    return CohortRun(_result(start, drops, staleness, duration, CohortSum(included, total, wsum, vsum)), bytes_up,
                     weights)


def _secure(start, ids, devices, prepared, identities, rng, latency_s, weights, staleness) -> CohortRun:
    codec = codec_for(start)
    params = session_params(start)
    inputs = {m: codec.encode(prepared[m][0], prepared[m][1], prepared[m][2], rng) for m in ids}
    drops = draw_dropouts([devices[m] for m in ids], STAGE_LABELS, rng)
    result, stats = run_session(params, {m: identities[m] for m in ids}, inputs, drops)
    duration = 0.0
    for stage in STAGE_LABELS:
        dropped_here = any(s == stage for s in drops.values())
        duration += _stage_seconds(devices, stats.stage_up.get(stage, {}), stats.stage_down.get(stage, {}),
                                   latency_s, dropped_here)
    bytes_up = dict(stats.bytes_up)
    if result is None:
        return CohortRun(_result(start, drops, staleness, duration, None, stats.aborted), bytes_up, weights)
    wsum_vec, wsum, vsum = codec.decode_sum(result.total, len(result.survivors))
    return CohortRun(_result(start, drops, staleness, duration, CohortSum(result.survivors, wsum_vec, wsum, vsum)),
                     bytes_up, weights)
