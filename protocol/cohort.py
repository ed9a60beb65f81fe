"""A cohort, planned once by the server and checked by the device: the one home of every cohort rule.

The server (the simulator's driver and the HTTP coordinator alike) calls
:func:`plan_cohort` to turn a :class:`CohortPolicy` and the closing members into a
:class:`~ftte.deploy_messages.CohortStart`; both sides derive the secure-aggregation
:class:`~ftte.crypto.secagg_session.SessionParams` from that start with
:func:`session_params`, and a device checks it with :func:`check_cohort` before it masks
anything. The model hash a pull is checked against lives here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ftte.crypto.primitives import sha256
from ftte.crypto.quantize import choose_ring_bits
from ftte.crypto.secagg_session import SessionParams
from ftte.protocol.encoding import EXTRA_COORDINATES, UpdateCodec
from ftte.protocol.weighting import WeightRule

from ftte.deploy_messages import CohortStart


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
        return self.graph == "ring" and self.neighbors < n - 1

    def threshold_for(self, n: int) -> int:
        """The survivor threshold T of an ``n``-member cohort: at least a strict majority of
        ``n + max_corrupt`` (two survivor lists honest members sign then share an honest signer)."""
        asked = self.threshold if self.threshold else n // 2 + 1
        return min(max(asked, (n + self.max_corrupt) // 2 + 1), n)


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
        threshold=policy.threshold_for(n), share_threshold=0, graph="ring" if ring else "full",
        neighbors=policy.neighbors if ring else 0, dim=coordinates + EXTRA_COORDINATES,
        ring_bits=choose_ring_bits(n, policy.value_bits), value_bits=policy.value_bits, clip=policy.clip,
        reference_variance=-1.0 if reference_variance is None else float(reference_variance),
        staleness_exponent=rule.staleness_exponent, variance_penalty=rule.variance_penalty, r_min=rule.r_min,
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
        share_threshold=start.share_threshold,
    )


def weight_rule(start: CohortStart) -> WeightRule:
    return WeightRule(start.staleness_exponent, start.variance_penalty, start.r_min)


def check_cohort(start: CohortStart, *, member: int, identity_key: bytes, plan_id: str, base_version: int,
                 coordinates: int, trusted_keys: frozenset[bytes] | None = None, min_members: int = 2) -> None:
    """What a device verifies before masking into a cohort (raises :class:`CohortRefused`).

    ``trusted_keys`` pins the peers' identity keys to a list the device got from its
    operator, not from the server: otherwise a malicious server could fill a cohort with
    identities it controls and learn this device's input from the "sum". ``min_members``
    is the device's own floor on the cohort size, whatever threshold the server announces.
    """
    if len(start.members) < min_members:
        raise CohortRefused(f"cohort of {len(start.members)} members, this device requires at least {min_members}")
    if trusted_keys is not None:
        unknown = [m for m, k in start.identity_keys if k not in trusted_keys]
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
    if start.dim != coordinates + EXTRA_COORDINATES:
        raise CohortRefused(f"cohort vector has {start.dim} coordinates, the plan needs {coordinates + EXTRA_COORDINATES}")
    try:
        need = choose_ring_bits(len(start.members), start.value_bits)
    except ValueError as exc:
        raise CohortRefused(str(exc)) from None
    if start.ring_bits < need:
        raise CohortRefused(f"a {start.ring_bits}-bit ring can wrap the sum of {len(start.members)} members")
    if not (start.clip > 0 and 0 < start.r_min <= 1 and start.staleness_exponent >= 0 and start.variance_penalty >= 0):
        raise CohortRefused("clip or weighting parameters out of range")
