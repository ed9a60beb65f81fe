"""Protocol facts both the device and the server derive from the wire messages of a deployment.

Kept apart from the HTTP client so the server can import them without an HTTP client
library, and free of any transport: the model hash a pull is checked against, the
secure-aggregation session a :class:`~ftte.deploy_messages.CohortStart` describes, the weighting
rule it announces, and the checks a device makes before it trusts a cohort.
"""

from __future__ import annotations

import numpy as np
from ftte.crypto.primitives import sha256
from ftte.crypto.quantize import choose_ring_bits
from ftte.crypto.secagg_session import SessionParams
from ftte.edge.encoding import EXTRA_COORDINATES
from ftte.edge.weighting import WeightRule

from ftte.deploy_messages import CohortStart


class CohortRefused(ValueError):
    """A cohort's parameters do not fit what this device trained or can safely mask."""


def model_hash(plan_id: str, weights: np.ndarray) -> bytes:
    """SHA-256 binding a plan id to its float32 subset weights (the server's ``ModelPull.model_hash``)."""
    return sha256(b"ftte/model/v1", plan_id.encode(), np.ascontiguousarray(weights, dtype="<f4").tobytes())


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
