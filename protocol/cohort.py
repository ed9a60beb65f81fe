"""A cohort, planned once by the server and checked by the device: the one home of every cohort rule.

The server (the simulator's driver and the HTTP coordinator alike) calls
:func:`plan_cohort` to turn a :class:`CohortPolicy` and the closing members into a
:class:`~ftte.deploy_messages.CohortStart`; both sides derive the secure-aggregation
:class:`~ftte.crypto.secagg_session.SessionParams` from that start with
:func:`session_params`, and a device checks it with :func:`check_cohort` before it masks
anything. The model hash a pull is checked against lives here too.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
from ftte.crypto.primitives import sha256
from ftte.crypto.quantize import choose_ring_bits, levels
from ftte.crypto.secagg_session import SessionParams, ring_applies
from ftte.protocol.encoding import EXTRA_COORDINATES, UpdateCodec
from ftte.protocol.weighting import WeightRule

from ftte.deploy_messages import CohortStart, TaskInfo


class CohortRefused(ValueError):
    """A cohort's parameters do not fit what this device trained or can safely mask."""


def model_hash(plan_id: str, weights: np.ndarray) -> bytes:
    """SHA-256 binding a plan id to its float32 subset weights (the server's ``ModelPull.model_hash``)."""
    return sha256(b"ftte/model/v1", plan_id.encode(), np.ascontiguousarray(weights, dtype="<f4").tobytes())


@dataclass(frozen=True)
class CohortPolicy:
    """What shapes every cohort of a run, fixed by the operator's configuration (never per cohort).

    ``threshold`` 0 means the smallest strict majority; whatever is asked, the threshold in
    force is raised to what the graph and ``max_corrupt`` require (:meth:`threshold_for`).
    A ring smaller than ``neighbors + 2`` members falls back to the full graph.
    """

    graph: str
    neighbors: int
    threshold: int
    value_bits: int
    clip: float
    rule: WeightRule
    max_corrupt: int = 0

    def uses_ring(self, n: int) -> bool:
        return ring_applies(self.graph, self.neighbors, n)

    def threshold_for(self, n: int) -> int:
        """The survivor threshold T of an ``n``-member cohort: at least a strict majority of
        ``n + max_corrupt`` (two survivor lists honest members sign then share an honest signer)."""
        asked = self.threshold if self.threshold else n // 2 + 1
        return min(max(asked, (n + self.max_corrupt) // 2 + 1), n)

    def share_threshold_for(self, n: int) -> int:
        """On the ring, a strict majority of each member's ``neighbors + 1`` share holders plus the
        colluders among them; 0 (= T) on the full graph."""
        if not self.uses_ring(n):
            return 0
        return (self.neighbors + 1 + self.max_corrupt) // 2 + 1


def plan_cohort(policy: CohortPolicy, *, cohort_id: str, plan_id: str, model_hash: bytes, close_version: int,
                members: tuple[int, ...], identity_keys: tuple[bytes, ...], coordinates: int,
                reference_variance: float | None) -> CohortStart:
    """The :class:`CohortStart` of a cohort closing with ``members`` (sorted) at ``close_version``."""
    n = len(members)
    ring = policy.uses_ring(n)
    rule = policy.rule
    return CohortStart(
        cohort_id=cohort_id, plan_id=plan_id, model_hash=model_hash, close_version=close_version,
        members=tuple(members), identity_keys=tuple(zip(members, identity_keys)),
        threshold=policy.threshold_for(n), share_threshold=policy.share_threshold_for(n),
        graph="ring" if ring else "full",
        neighbors=policy.neighbors if ring else 0, dim=coordinates + EXTRA_COORDINATES,
        ring_bits=choose_ring_bits(n, policy.value_bits), value_bits=policy.value_bits, clip=policy.clip,
        reference_variance=-1.0 if reference_variance is None else float(reference_variance),
        staleness_exponent=rule.staleness_exponent, variance_penalty=rule.variance_penalty, r_min=rule.r_min,
        max_corrupt=policy.max_corrupt,
    )


def codec_for(start: CohortStart) -> UpdateCodec:
    """How members encode, and the server decodes, this cohort's vectors."""
    return UpdateCodec(start.dim - EXTRA_COORDINATES, start.clip, start.value_bits, start.ring_bits)


def reference_of(start: CohortStart) -> float | None:
    return None if start.reference_variance < 0 else start.reference_variance


def session_params(start: CohortStart) -> SessionParams:
    """The session a cohort start describes; raises ``ConfigError`` if it is unusable."""
    return SessionParams(
        cohort_id=start.cohort_id, plan_id=start.plan_id, model_hash=start.model_hash,
        close_version=start.close_version, members=tuple(start.members),
        identity_keys=tuple(k for _, k in start.identity_keys), threshold=start.threshold, dim=start.dim,
        ring_bits=start.ring_bits, graph=start.graph, neighbors=start.neighbors,
        share_threshold=start.share_threshold, max_corrupt=start.max_corrupt, binding=contribution_binding(start),
    )


def contribution_binding(start: CohortStart) -> bytes:
    """Digest of every cohort-start field that shapes a member's contribution beyond what
    :class:`SessionParams` already binds: precision, clip, the weighting rule and the announced
    reference variance. It enters the signed session context, so a server that shows two
    members different values gets two contexts, and their advertisements never verify for
    each other: the session aborts before anything is masked."""
    return sha256(b"ftte/cohort/contribution/v1", _u64(start.value_bits), _f64(start.clip),
                  _f64(start.reference_variance), _f64(start.staleness_exponent), _f64(start.variance_penalty),
                  _f64(start.r_min))


def _u64(x: int) -> bytes:
    return int(x).to_bytes(8, "big")


def _f64(x: float) -> bytes:
    return struct.pack(">d", float(x))


def weight_rule(start: CohortStart) -> WeightRule:
    return WeightRule(start.staleness_exponent, start.variance_penalty, start.r_min)


@dataclass(frozen=True)
class DevicePolicy:
    """What a device accepts from any server: its own floors and ceilings, never set by the network.

    ``trusted_keys`` pins the peers' identity keys to a list the device got from its
    operator, not from the server: otherwise a malicious server could fill a cohort with
    identities it controls and learn this device's input from the "sum". ``min_members`` is
    the device's floor on the cohort size; ``max_corrupt`` the colluding members it assumes
    (a cohort must tolerate at least that many: ``2T > n + max_corrupt``). The weighting
    bounds keep a server from making honest members' weights vanish, which would leave one
    member's update alone in the sum: the staleness exponent is capped, ``r_min`` floored,
    the staleness the server claims is capped (``max_staleness``: the server labels the
    versions), and a cohort in which this device's own weight would fall below ``min_weight``
    is refused. What remains: within the band, a server that picks members' staleness can
    skew a cohort's weight towards one member, whose share of the honest weight is then at
    most ``1/(1 + min_weight·(h−1))`` with ``h`` honest members, so a device that needs its
    update hidden among many should also raise ``min_members``.
    ``max_delta`` and ``min_noise_multiplier`` are the device's own privacy floor: a task asking
    for a larger delta or less noise is refused, whatever the server's policy says.
    """

    trusted_keys: frozenset[bytes] | None = None
    min_members: int = 3
    max_corrupt: int = 1
    max_staleness_exponent: float = 1.0
    min_r_min: float = 0.1
    min_weight: float = 0.05
    max_staleness: int = 50
    max_delta: float = 1e-5
    min_noise_multiplier: float = 0.5

    def __post_init__(self) -> None:
        if self.min_members < 2 or self.max_corrupt < 0 or not 0 < self.min_r_min <= 1:
            raise ValueError("min_members >= 2, max_corrupt >= 0 and min_r_min in (0, 1] are required")
        if not (0 <= self.max_staleness_exponent < math.inf and 0 < self.min_weight <= 1):
            raise ValueError("max_staleness_exponent must be finite and >= 0, min_weight in (0, 1]")


def check_task(task: TaskInfo, policy: DevicePolicy) -> None:
    """What a device verifies once, when it receives the task: the contribution terms are within its policy."""
    if not (task.clip > 0 and math.isfinite(task.clip)):
        raise CohortRefused(f"the task's clip norm {task.clip} is not a positive finite number")
    try:
        choose_ring_bits(2, task.value_bits)
    except ValueError as exc:
        raise CohortRefused(f"the task's precision: {exc}") from None
    if not 0 <= task.staleness_exponent <= policy.max_staleness_exponent:
        raise CohortRefused(f"staleness exponent {task.staleness_exponent} outside this device's "
                            f"[0, {policy.max_staleness_exponent}]")
    if not policy.min_r_min <= task.r_min <= 1:
        raise CohortRefused(f"r_min {task.r_min} below this device's floor {policy.min_r_min}")
    if not 0 <= task.variance_penalty < math.inf:
        raise CohortRefused(f"variance penalty {task.variance_penalty} out of range")
    if task.dp_enabled:
        if task.delta > policy.max_delta:
            raise CohortRefused(f"the task's delta {task.delta:g} is above this device's ceiling {policy.max_delta:g}")
        noise = task.min_noise_multiplier if task.target_epsilon > 0 else task.noise_multiplier
        if noise < policy.min_noise_multiplier:
            raise CohortRefused(f"the task's noise multiplier {noise:g} is below this device's floor "
                                f"{policy.min_noise_multiplier:g}")
    if task.max_corrupt < policy.max_corrupt:
        raise CohortRefused(f"the task tolerates {task.max_corrupt} colluding members, this device assumes "
                            f"{policy.max_corrupt}")


def check_cohort(start: CohortStart, task: TaskInfo, policy: DevicePolicy, *, member: int, identity_key: bytes,
                 plan_id: str, base_version: int, coordinates: int) -> None:
    """What a device verifies before masking into a cohort (raises :class:`CohortRefused`).

    Beyond the membership checks, every contribution term of the cohort must equal the
    task's (fixed for the whole deployment, checked against the device's policy once by
    :func:`check_task`), and the threshold must tolerate the colluders the device assumes.
    """
    n = len(start.members)
    if n < policy.min_members:
        raise CohortRefused(f"cohort of {n} members, this device requires at least {policy.min_members}")
    if policy.trusted_keys is not None:
        unknown = [m for m, k in start.identity_keys if k not in policy.trusted_keys]
        if unknown:
            raise CohortRefused(f"members {unknown} carry identity keys outside this device's trusted list")
    if start.plan_id != plan_id:
        raise CohortRefused(f"cohort trains plan {start.plan_id}, this device trained {plan_id}")
    keys = dict(start.identity_keys)
    if [m for m, _ in start.identity_keys] != list(start.members):
        raise CohortRefused("identity keys do not list the members in order")
    if keys.get(member) != identity_key:
        raise CohortRefused("the cohort does not carry this device's identity key")
    if start.close_version < base_version:
        raise CohortRefused(f"close version {start.close_version} precedes the trained version {base_version}")
    if start.close_version - base_version > policy.max_staleness:
        raise CohortRefused(f"staleness {start.close_version - base_version} above this device's "
                            f"{policy.max_staleness}: a server could use it to weigh this update out of the sum")
    if start.dim != coordinates + EXTRA_COORDINATES:
        raise CohortRefused(f"cohort vector has {start.dim} coordinates, the plan needs {coordinates + EXTRA_COORDINATES}")
    terms = ("clip", "value_bits", "staleness_exponent", "variance_penalty", "r_min")
    differ = [t for t in terms if getattr(start, t) != getattr(task, t)]
    if differ:
        raise CohortRefused(f"the cohort's {', '.join(differ)} differ from the task's")
    corrupt = max(start.max_corrupt, policy.max_corrupt, task.max_corrupt)
    if start.max_corrupt < corrupt or 2 * start.threshold <= n + corrupt:
        raise CohortRefused(f"threshold {start.threshold} of {n} members does not tolerate {corrupt} colluding "
                            "members (2T > n + colluders is required)")
    try:
        need = choose_ring_bits(n, start.value_bits)
    except ValueError as exc:
        raise CohortRefused(str(exc)) from None
    if start.ring_bits < need:
        raise CohortRefused(f"a {start.ring_bits}-bit ring can wrap the sum of {n} members")
    ref = start.reference_variance
    if not (ref == -1.0 or 0.0 <= ref <= start.clip**2 / coordinates):
        raise CohortRefused(f"reference variance {ref} is impossible for updates clipped to {start.clip}")


def check_own_weight(weight: float, policy: DevicePolicy) -> None:
    """Refuse to contribute with a weight so small that this update would vanish from the sum."""
    if weight < policy.min_weight:
        raise CohortRefused(f"this device's weight in the cohort would be {weight:.3g}, below its floor "
                            f"{policy.min_weight}")


def impossible_sum(start: CohortStart, staleness: dict[int, int], included: tuple[int, ...],
                   weighted_sum: np.ndarray, weight_sum: float, variance_sum: float) -> str:
    """Why a decoded cohort sum cannot come from honest members of ``start`` ("" when it can).

    Each honest member weighs its update with ``(1+τ)^-a · r`` where ``r`` lies in
    ``[r_min, 1]``, clips it to ``clip`` and reports a coordinate variance of at most
    ``clip²/d``; quantisation adds at most one level per member and coordinate. A sum outside
    these limits holds a member that lied about its weight, norm or variance, and merging it
    would let that member move the model (or the next reference variance) without bound.
    This is no range proof: a lying member inside the limits is not detected.
    """
    codec = codec_for(start)
    lv = levels(start.value_bits)  # quantisation levels per unit of weight (and of clip on each coordinate)
    n = len(included)
    rule = weight_rule(start)
    hi = [(1.0 + staleness[m]) ** -rule.staleness_exponent for m in included]
    lo = [h * (rule.r_min if rule.variance_penalty > 0 else 1.0) for h in hi]
    slack = n / lv
    if sum(lo) <= 2 * slack:
        return (f"the members' smallest honest weights sum to {sum(lo):.3g}, too close to the quantisation "
                f"slack {slack:.3g} to bound the cohort's step; refused")
    if not (sum(lo) - slack <= weight_sum <= sum(hi) + slack):
        return (f"the weights sum to {weight_sum:.6g}, outside [{sum(lo) - slack:.6g}, {sum(hi) + slack:.6g}] "
                f"that {n} honest members can produce")
    norm = float(np.linalg.norm(weighted_sum))
    limit = weight_sum * start.clip + n * codec.range_sigmas * start.clip / lv
    if not norm <= limit:
        return f"the weighted sum has norm {norm:.6g}, more than the {limit:.6g} clipped updates allow"
    var_max = n * start.clip**2 / codec.dim
    var_slack = n * start.clip**2 / (codec.dim * lv)
    if not (-var_slack <= variance_sum <= var_max + var_slack):
        return f"the variances sum to {variance_sum:.6g}, outside [0, {var_max:.6g}] for clipped updates"
    return ""
