"""Run one cohort (one buffer): weight and encode each member's update, aggregate, charge time.

With secure aggregation on, the members' encoded vectors go through the real protocol
(``ftte.crypto.secagg_local``: real keys, masks, Shamir shares, every message encoded),
and the server gets back only the ring sum. The server's side runs here; the members' side
runs where the device backend puts it (``member_runner``: in this process, or on the Ray
workers), through the one member definition, ``MemberHost.stage``. With it off, members
upload their weighted float32 update in a :class:`~ftte.round_messages.PlainUpdate` and the
server sums them. Either way the result is ``(Σ w·Δ, Σ w, Σ σ²)`` over the members that
made it to the end.

Virtual time: each protocol stage lasts as long as its slowest live member needs to
receive the server's message and send its own (bytes over bandwidth plus a latency each
way); a stage in which some member vanishes lasts at least :data:`STAGE_TIMEOUT_S`,
because the server cannot tell a dropout from a slow device before its timeout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ftte import wire
from ftte.crypto.primitives import Signer
from ftte.crypto.secagg_local import MemberRunner, run_session
from ftte.crypto.stages import STAGE_LABELS
from ftte.edge.runtime import LocalUpdate
from ftte.pipeline.fleet import SimDevice
from ftte.pipeline.server_model import CohortResult, CohortSum
from ftte.privacy.secure_random import SecureRandom
from ftte.protocol.cohort import codec_for, reference_of, session_params, weight_rule
from ftte.protocol.encoding import EXTRA_COORDINATES, weigh_update
from ftte.deploy_messages import CohortStart
from ftte.round_messages import PlainUpdate

STAGE_TIMEOUT_S = 10.0


@dataclass
class CohortRun:
    """A cohort as the simulator ran it: the result the server core applies, and what it cost."""

    result: CohortResult
    bytes_up: dict[int, int] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)
    user_params: object | None = None  # the user-level mechanism's parameters (UserDPParams), if any

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


def stage_seconds(devices: dict[int, SimDevice], up: dict[int, int], down: dict[int, int], latency: float,
                   someone_dropped: bool) -> float:
    """One protocol stage's virtual duration: its slowest member's transfer plus two latencies,
    or the stage timeout when a member dropped. Shared with :mod:`ftte.pipeline.cohort_time`,
    which must predict the same duration without running the session."""
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


@dataclass(frozen=True)
class UserLevel:
    """User-level DP for a cohort: noise added by the members inside the masked sum
    ("distributed") or by a trusted server to the plain sum ("server"), at multiplier ``z``.
    Where the draws come from is :func:`run_cohort`'s ``seed``, like every other simulated draw."""

    noise: str
    z: float


def simulated_identities(seed: int, devices: Sequence[int]) -> dict[int, Signer]:
    """The simulated devices' Ed25519 identities, derived from the run seed (a device keeps a key
    it generated, ``edge/identity.py``): the identity keys are in every session's context and so in
    the ring order's hash, which must repeat from run to run (:func:`member_randomness`)."""
    return {d: Signer(SecureRandom.from_seed(seed, "ftte.sim.identity", str(d)).random_bytes(32)) for d in devices}


def member_randomness(seed: int, cohort_id: str, members: Sequence[int]) -> dict[int, SecureRandom]:
    """Each simulated member's generator for one session: its X25519 keys, self-mask seed and
    ring nonce derive from the run seed, the cohort and the member (a device draws them from the
    OS, :class:`~ftte.crypto.secagg_client.SecAggClient`). The ring order hashes the keys and
    nonces, so with OS draws every run masked on another ring: the neighbour ids, shares and pair
    seeds a member sends, the modelled stage times and the aborts then differed between runs."""
    return {m: SecureRandom.from_seed(seed, "ftte.secagg.member", cohort_id, str(m)) for m in members}


def run_cohort(start: CohortStart, members: Sequence[tuple[SimDevice, LocalUpdate]], identities: dict[int, Signer],
               rng: np.random.Generator, *, secure: bool, latency_s: float,
               user: UserLevel | None = None, member_runner: Callable[[], MemberRunner] | None = None,
               seed: int | None = None) -> CohortRun:
    """``member_runner``: where the members' secure-aggregation work runs (a fresh runner per
    session; default this process). A member whose worker died mid-session is a dropout at
    that stage, recorded with the drawn ones. ``seed``: the run seed, from which the members'
    session randomness (:func:`member_randomness`) and the user-level rounding and noise derive;
    None: every one of them draws from the OS, as a deployed device (and server) does."""
    devices = {d.device_id: d for d, _ in members}
    ids = tuple(sorted(devices))
    if ids != tuple(start.members):
        raise ValueError("the cohort start does not list the members being run")
    prepared = {d.device_id: prepare_member(u, start) for d, u in members}
    weights = {m: p[1] for m, p in prepared.items()}
    staleness = {m: p[3] for m, p in prepared.items()}
    if user is not None and user.noise == "distributed":
        raw = {d.device_id: u.delta for d, u in members}
        return _user_secure(start, ids, devices, raw, identities, rng, latency_s, weights, staleness, user,
                            member_runner, seed)
    if secure:
        run = _secure(start, ids, devices, prepared, identities, rng, latency_s, weights, staleness, member_runner,
                      seed)
    else:
        run = _plain(start, ids, devices, prepared, rng, latency_s, weights, staleness)
    if user is not None and run.result.total is not None:  # the trusted server adds the noise to the sum
        run = _with_central_noise(run, start, user, seed)
    return run


def _result(start: CohortStart, drops: dict[int, str], staleness: dict[int, int], duration: float,
            total: CohortSum | None, aborted: str = "", *, user: bool = False) -> CohortResult:
    """``user``: the sum carries user-level noise, so the example-level limits of the start (which
    bound a noiseless sum) do not apply; the user-level path checked its own bound."""
    return CohortResult(start.cohort_id, start.close_version, tuple(start.members), drops, staleness, duration, total,
                        aborted, None if user else start)


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
    duration = stage_seconds(devices, up, {}, latency_s, bool(drops))
    if not included:
        return CohortRun(_result(start, drops, staleness, duration, None, "every member dropped"), bytes_up, weights)
    return CohortRun(_result(start, drops, staleness, duration, CohortSum(included, total, wsum, vsum)), bytes_up,
                     weights)


def _masked_session(params, ids, devices, identities, inputs, rng, latency_s, runner=None, seed=None):
    """Run the real secure-aggregation session with each member's drop stage drawn from its
    profile; returns (result or None, stats, drops, virtual seconds the five stages took).
    Members lost with their worker join the drops at the stage they were lost in."""
    drops = draw_dropouts([devices[m] for m in ids], STAGE_LABELS, rng)
    randomness = None if seed is None else member_randomness(seed, params.cohort_id, ids)
    result, stats = run_session(params, {m: identities[m] for m in ids}, inputs, drops, runner, randomness)
    drops = {**drops, **stats.lost}
    duration = 0.0
    for stage in STAGE_LABELS:
        dropped_here = any(s == stage for s in drops.values())
        duration += stage_seconds(devices, stats.stage_up.get(stage, {}), stats.stage_down.get(stage, {}),
                                   latency_s, dropped_here)
    return result, stats, drops, duration


def _secure(start, ids, devices, prepared, identities, rng, latency_s, weights, staleness, runner=None,
            seed=None) -> CohortRun:
    codec = codec_for(start)
    params = session_params(start)
    inputs = {m: codec.encode(prepared[m][0], prepared[m][1], prepared[m][2], rng) for m in ids}
    result, stats, drops, duration = _masked_session(params, ids, devices, identities, inputs, rng, latency_s, runner,
                                                     seed)
    bytes_up = dict(stats.bytes_up)
    if result is None:
        return CohortRun(_result(start, drops, staleness, duration, None, stats.aborted), bytes_up, weights)
    wsum_vec, wsum, vsum = codec.decode_sum(result.total, len(result.survivors))
    return CohortRun(_result(start, drops, staleness, duration, CohortSum(result.survivors, wsum_vec, wsum, vsum)),
                     bytes_up, weights)


def _user_rng(seed: int | None, *context: str) -> SecureRandom:
    """A simulated party's user-level generator: derived from the run seed, or from the OS."""
    return SecureRandom.from_os() if seed is None else SecureRandom.from_seed(seed, *context)


def _with_central_noise(run: CohortRun, start: CohortStart, user: UserLevel, seed: int | None) -> CohortRun:
    """The baseline: a trusted server adds Gaussian noise of std ``z C`` to the unmasked sum."""
    from ftte.privacy.distributed_dp import central_noise

    total = run.result.total
    assert total is not None
    noise = central_noise(_user_rng(seed, "central-noise", start.cohort_id),
                          total.weighted_sum.shape[0], start.clip, user.z)
    noisy = CohortSum(total.included, total.weighted_sum + noise, total.weight_sum, 0.0)
    return CohortRun(dataclasses.replace(run.result, total=noisy, start=None), run.bytes_up, run.weights)


def _user_secure(start, ids, devices, raw, identities, rng, latency_s, weights, staleness, user,
                 runner=None, seed=None) -> CohortRun:
    """User-level DP inside the masked sum: each member clips its whole update to ``C``, rotates,
    rounds and adds its share of discrete Gaussian noise (so any ``T - max_corrupt`` honest
    survivors carry the target), and masks the integers; the server unmasks the noisy sum and
    undoes scale and rotation. The weights (staleness only) are public, so ``Σw`` is computed
    from the survivors, not sent; a sum beyond what honest members' noisy inputs reach is refused.
    The parameters, the start and the decoding rule are the deployment's (protocol.cohort,
    protocol.user_encoding); only the cohort size they are planned for differs."""
    from ftte.protocol.cohort import contribution_binding, user_level_params, with_user_level
    from ftte.protocol.user_encoding import UserCodec, decode_user_sum, rotation_seed

    params = user_level_params(coordinates=start.dim - EXTRA_COORDINATES, clip=start.clip, noise_multiplier=user.z,
                               members=len(ids), calibrated_for=start.threshold - start.max_corrupt)
    session_start = with_user_level(start, params, user.z)
    codec = UserCodec(params, rotation_seed(start.cohort_id, contribution_binding(session_start)))
    inputs = {m: codec.encode(raw[m], weights[m], _user_rng(seed, "user-dp", str(m), start.cohort_id)).ring
              for m in ids}
    result, stats, drops, duration = _masked_session(session_params(session_start), ids, devices, identities,
                                                     inputs, rng, latency_s, runner, seed)
    bytes_up = dict(stats.bytes_up)
    if result is None:
        return CohortRun(_result(start, drops, staleness, duration, None, stats.aborted, user=True), bytes_up, weights,
                         params)
    total, wsum, refused = decode_user_sum(codec, result.total, weights, result.survivors)
    if refused:
        return CohortRun(_result(start, drops, staleness, duration, None, refused, user=True), bytes_up, weights,
                         params)
    return CohortRun(_result(start, drops, staleness, duration, CohortSum(result.survivors, total, wsum, 0.0),
                             user=True), bytes_up, weights, params)
