"""A cohort, planned once by the server and checked by the device: the one home of every cohort rule.

The server (the simulator's driver and the HTTP coordinator alike) calls
:func:`plan_cohort` to turn a :class:`CohortPolicy` and the closing members into a
:class:`~ftte.deploy_messages.CohortStart`; both sides derive the secure-aggregation
:class:`~ftte.crypto.secagg_session.SessionParams` from that start with
:func:`session_params`, and a device checks it with :func:`check_cohort` before it masks
anything. The model hash a pull is checked against lives here too.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass

import numpy as np
from ftte.crypto.primitives import sha256
from ftte.crypto.quantize import choose_ring_bits, levels
from ftte.crypto.secagg_session import SessionParams, ring_applies
from ftte.privacy.distributed_dp import UserDPParams, plan_user_dp
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
                reference_variance: float | None, user: UserLevelPlan | None = None) -> CohortStart:
    """The :class:`CohortStart` of a cohort closing with ``members`` (sorted) at ``close_version``;
    with ``user``, a user-level cohort (:func:`with_user_level`)."""
    n = len(members)
    ring = policy.uses_ring(n)
    rule = policy.rule
    start = CohortStart(
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
    return start if user is None else with_user_level(start, user.params, user.noise_multiplier)


# -- user-level DP: one definition of the mechanism's parameters and of what a device accepts ---------

@dataclass(frozen=True)
class UserLevelPlan:
    """The user-level mechanism of a cohort and the multiplier each participation is charged at."""

    params: UserDPParams
    noise_multiplier: float


def user_level_params(*, coordinates: int, clip: float, noise_multiplier: float, members: int,
                      calibrated_for: int) -> UserDPParams:
    """The mechanism for up to ``members`` contributions of ``coordinates`` values clipped to ``clip``,
    with per-device noise such that ``calibrated_for`` honest survivors give an effective multiplier
    of at least ``noise_multiplier``. The simulator calls it per cohort (``members`` = n,
    ``calibrated_for`` = T - max_corrupt); a deployment once per task, for its largest cohort and
    the honest survivors of its smallest (:func:`deployment_user_level`), so a device knows the
    parameters it signs for before its cohort closes."""
    return plan_user_dp(dim=coordinates, clip=clip, noise_multiplier=noise_multiplier, members=members,
                        threshold=calibrated_for, max_corrupt=0)


def deployment_user_level(policy: CohortPolicy, *, coordinates: int, noise_multiplier: float, min_members: int,
                          max_members: int) -> UserLevelPlan:
    """A deployment's one user-level plan: its ring holds ``max_members`` noisy contributions and
    its noise is calibrated to the ``T - max_corrupt`` honest survivors of the smallest cohort it
    may start (``T`` grows with ``n``, so every larger cohort carries at least the target)."""
    m = policy.threshold_for(min_members) - policy.max_corrupt
    return UserLevelPlan(user_level_params(coordinates=coordinates, clip=policy.clip,
                                           noise_multiplier=noise_multiplier, members=max_members,
                                           calibrated_for=m), noise_multiplier)


def with_user_level(start: CohortStart, params: UserDPParams, noise_multiplier: float) -> CohortStart:
    """``start`` as a user-level cohort: the session masks the ``d'`` rotated integers in the
    mechanism's ring, and every parameter of the mechanism rides in the start (and its binding)."""
    return dataclasses.replace(start, dim=params.padded_dim, ring_bits=params.ring_bits,
                               user_coordinates=params.dim, user_scale=params.scale, user_sigma=params.sigma,
                               user_calibrated_for=params.calibrated_for, user_members=params.members,
                               user_noise_multiplier=float(noise_multiplier))


def is_user_level(start: CohortStart) -> bool:
    return start.user_members > 0


def user_params_of(start: CohortStart) -> UserDPParams:
    """The mechanism a user-level start describes (raises :class:`CohortRefused` if it is unusable)."""
    if not is_user_level(start):
        raise CohortRefused("not a user-level cohort")
    try:
        return UserDPParams(start.user_coordinates, start.clip, start.user_scale, start.user_sigma,
                            start.user_calibrated_for, start.user_members, start.ring_bits)
    except ValueError as exc:
        raise CohortRefused(f"the cohort's user-level parameters: {exc}") from None


def user_params_digest(params: UserDPParams, noise_multiplier: float) -> bytes:
    """Digest of every user-level parameter that shapes a contribution (and the multiplier charged)."""
    return sha256(b"ftte/user-dp/params/v1", struct.pack(">qdddqqqd", params.dim, params.clip, params.scale,
                                                         params.sigma, params.calibrated_for, params.members,
                                                         params.ring_bits, float(noise_multiplier)))


MAX_WRAP_PROBABILITY = 2.0 ** -30


def check_user_params(params: UserDPParams, *, members: int, threshold: int, max_corrupt: int,
                      min_noise_multiplier: float) -> None:
    """The device's floors on a user-level mechanism (raises :class:`CohortRefused`): the noise is
    calibrated to survivors it trusts to be honest (``threshold - max_corrupt`` with *its*
    colluder assumption), gives at least ``min_noise_multiplier`` (its own floor and the task's
    charge), and the ring holds the noisy sum of every member."""
    if members > params.members:
        raise CohortRefused(f"user-level parameters are planned for at most {params.members} members, the cohort "
                            f"has {members}")
    if params.calibrated_for > threshold - max_corrupt:
        raise CohortRefused(f"noise calibrated for {params.calibrated_for} honest survivors, but with threshold "
                            f"{threshold} and {max_corrupt} colluders only {threshold - max_corrupt} are certain")
    if params.sigma == 0.0 or params.noise_multiplier < min_noise_multiplier:
        raise CohortRefused(f"effective noise multiplier {params.noise_multiplier:.4g} below this device's floor "
                            f"{min_noise_multiplier:.4g}")
    if params.wrap_probability() > MAX_WRAP_PROBABILITY:
        raise CohortRefused(f"the noisy sum wraps the ring with probability up to {params.wrap_probability():.3g}")


def task_user_level(task: TaskInfo, coordinates: int) -> UserLevelPlan:
    """The plan a user-level task implies for a plan of ``coordinates`` values, computed by the
    device itself from the task's terms (the same function the server planned with)."""
    try:
        return UserLevelPlan(user_level_params(coordinates=coordinates, clip=task.clip,
                                               noise_multiplier=task.user_noise_multiplier,
                                               members=task.user_members, calibrated_for=task.user_calibrated_for),
                             task.user_noise_multiplier)
    except ValueError as exc:
        raise CohortRefused(f"the task's user-level terms: {exc}") from None


def check_user_cohort(start: CohortStart, plan: UserLevelPlan, policy: DevicePolicy, *, colluders: int) -> None:
    """What a device verifies on a user-level cohort start before it adds its noise: the start's
    mechanism is exactly the one it planned from the task (and signed its spend claim for), so
    a server that lowers one member's noise or changes its clip or scale is refused; then the
    device's own floors (:func:`check_user_params`) for this cohort's size and threshold."""
    if not is_user_level(start):
        raise CohortRefused("the task is user-level but the cohort start carries no user-level mechanism")
    got = user_params_of(start)
    if got != plan.params or start.user_noise_multiplier != plan.noise_multiplier:
        differ = [name for name in ("dim", "clip", "scale", "sigma", "calibrated_for", "members", "ring_bits")
                  if getattr(got, name) != getattr(plan.params, name)]
        if start.user_noise_multiplier != plan.noise_multiplier:
            differ.append("noise_multiplier")
        raise CohortRefused(f"the cohort's user-level {', '.join(differ)} differ from the task's")
    if start.dim != plan.params.padded_dim:
        raise CohortRefused(f"cohort vector has {start.dim} coordinates, the mechanism masks {plan.params.padded_dim}")
    check_user_params(got, members=len(start.members), threshold=start.threshold, max_corrupt=colluders,
                      min_noise_multiplier=max(policy.min_user_noise_multiplier, plan.noise_multiplier))


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
    parts = [_u64(start.value_bits), _f64(start.clip), _f64(start.reference_variance),
             _f64(start.staleness_exponent), _f64(start.variance_penalty), _f64(start.r_min)]
    if is_user_level(start):  # example-level bindings are unchanged
        parts.append(user_params_digest(user_params_of(start), start.user_noise_multiplier))
    return sha256(b"ftte/cohort/contribution/v1", *parts)


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
    for a larger delta or less noise is refused, whatever the server's policy says. For a
    user-level task, ``min_user_noise_multiplier`` is the floor on the effective multiplier the
    honest survivors of any cohort must carry (the device's user-level budget is its accountant's
    ``epsilon_max``). ``max_user_noise_ratio`` is the device's ceiling on the predicted noise/signal
    of the task's mechanism on a full cohort's mean (:func:`~ftte.privacy.distributed_dp.params_noise_ratio`):
    a participation spends the same user-level budget
    whatever the plan, so a device may refuse to spend it on a plan whose contribution drowns in
    noise. ``inf`` (the default) accepts any plan, as the server's own rule
    (``[privacy] user_noise_ratio``) is the operator's utility choice, not a privacy floor.
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
    min_user_noise_multiplier: float = 0.5  # user-level: the least effective multiplier per participation
    max_user_noise_ratio: float = math.inf  # user-level: the most noise/signal on a cohort mean it will pay for

    def __post_init__(self) -> None:
        # each message starts with the field's name: `ftte edge` names its flag instead
        if self.min_members < 2:
            raise ValueError(f"min_members must be at least 2 (a cohort of one hides nothing), got {self.min_members}")
        if self.max_corrupt < 0:
            raise ValueError(f"max_corrupt must be 0 or more, got {self.max_corrupt}")
        if not 0 < self.min_r_min <= 1:
            raise ValueError(f"min_r_min must be in (0, 1], got {self.min_r_min}")
        if not (0 <= self.max_staleness_exponent < math.inf and 0 < self.min_weight <= 1):
            raise ValueError("max_staleness_exponent must be finite and >= 0, min_weight in (0, 1]")
        if not self.max_user_noise_ratio > 0:
            raise ValueError(f"max_user_noise_ratio must be > 0 (inf or left out: no ceiling), got {self.max_user_noise_ratio}")


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
    if task.unit not in ("example", "user"):
        raise CohortRefused(f"unknown privacy unit {task.unit[:32]!r}")
    if task.unit == "user":
        _check_user_task(task, policy)
    elif task.dp_enabled:
        if task.delta > policy.max_delta:
            raise CohortRefused(f"the task's delta {task.delta:g} is above this device's ceiling {policy.max_delta:g}")
        noise = task.min_noise_multiplier if task.target_epsilon > 0 else task.noise_multiplier
        if noise < policy.min_noise_multiplier:
            raise CohortRefused(f"the task's noise multiplier {noise:g} is below this device's floor "
                                f"{policy.min_noise_multiplier:g}")
    if task.max_corrupt < policy.max_corrupt:
        raise CohortRefused(f"the task tolerates {task.max_corrupt} colluding members, this device assumes "
                            f"{policy.max_corrupt}")


MAX_USER_MEMBERS = 100_000


def _check_user_task(task: TaskInfo, policy: DevicePolicy) -> None:
    if not task.dp_enabled:
        raise CohortRefused("a user-level task must have DP enabled")
    if not 0.0 < task.user_delta <= policy.max_delta:
        raise CohortRefused(f"the task's user-level delta {task.user_delta:g} is outside (0, {policy.max_delta:g}]")
    if not (math.isfinite(task.user_noise_multiplier) and task.user_noise_multiplier >= policy.min_user_noise_multiplier):
        raise CohortRefused(f"the task's user-level noise multiplier {task.user_noise_multiplier:g} is below this "
                            f"device's floor {policy.min_user_noise_multiplier:g}")
    if not (0.0 < task.user_epsilon < math.inf):
        raise CohortRefused(f"the task's user-level epsilon {task.user_epsilon:g} is not a positive finite budget")
    if not 1 <= task.user_calibrated_for <= task.user_members <= MAX_USER_MEMBERS:
        raise CohortRefused(f"the task's user-level cohort terms ({task.user_calibrated_for} of "
                            f"{task.user_members}) are out of range")
    if task.variance_penalty != 0.0:
        raise CohortRefused("a user-level task weighs by staleness only (variance_penalty 0): a variance "
                            "weight would depend on private data")


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
    user = task.unit == "user"
    if is_user_level(start) != user:
        raise CohortRefused(f"the cohort is {'user' if is_user_level(start) else 'example'}-level, the task "
                            f"{task.unit}-level")
    if user and start.user_coordinates != coordinates:
        raise CohortRefused(f"the cohort's mechanism covers {start.user_coordinates} coordinates, the plan has "
                            f"{coordinates}")
    if not user and start.dim != coordinates + EXTRA_COORDINATES:
        raise CohortRefused(f"cohort vector has {start.dim} coordinates, the plan needs {coordinates + EXTRA_COORDINATES}")
    terms = ("clip", "value_bits", "staleness_exponent", "variance_penalty", "r_min")
    differ = [t for t in terms if getattr(start, t) != getattr(task, t)]
    if differ:
        raise CohortRefused(f"the cohort's {', '.join(differ)} differ from the task's")
    corrupt = max(start.max_corrupt, policy.max_corrupt, task.max_corrupt)
    if start.max_corrupt < corrupt or 2 * start.threshold <= n + corrupt:
        raise CohortRefused(f"threshold {start.threshold} of {n} members does not tolerate {corrupt} colluding "
                            "members (2T > n + colluders is required)")
    if user:  # the mechanism's own ring and floors (the example-level encoding is not used)
        check_user_cohort(start, task_user_level(task, coordinates), policy, colluders=corrupt)
        return
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
