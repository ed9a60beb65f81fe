"""How long a cohort takes, and who drops out of it, before any member's update exists.

The simulator's lazy mode (:mod:`ftte.pipeline.simulator`) schedules a cohort's merge
when the cohort closes but trains its members and runs its secure aggregation only when
that merge is reached. That works because a cohort's virtual duration does not depend on
the members' updates:

* the dropouts are drawn from the cohort's own generator (``derive_rng(seed, "cohort",
  id)``). On the secure path :class:`~ftte.protocol.encoding.UpdateCodec` first draws one
  uniform per coordinate for each member's stochastic rounding; that count is fixed by the
  cohort's dimension, so the same draws are skipped here and the dropouts that follow
  are the ones :func:`ftte.pipeline.cohort.run_cohort` will draw;
* every value field of a protocol message is fixed-size (keys, nonces, signatures, share
  ciphertexts and shares, the ring vector of ``dim`` elements); only member ids, list
  lengths and versions vary, and those are known at close. So the messages are rebuilt
  here with zero bytes of the right lengths and really encoded: their sizes are those of
  the real messages.

Supported: the plain path and the full masking graph (a ring's neighbours come from nonces
drawn during the session). The simulator checks every modelled cohort against the real
run when it computes it and stops with an error on any difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ftte import wire
from ftte.crypto.prg import ring_dtype
from ftte.crypto.secagg_session import SessionParams, uses_ring
from ftte.crypto.stages import STAGE_LABELS
from ftte.deploy_messages import CohortStart
from ftte.pipeline.cohort import stage_seconds, draw_dropouts
from ftte.pipeline.fleet import SimDevice
from ftte.protocol.cohort import session_params
from ftte.round_messages import PlainUpdate
from ftte.secagg_messages import (
    SHARE_BYTES,
    SHARE_CIPHERTEXT_BYTES,
    AdvertiseKeys,
    ConsistencyBundle,
    ConsistencySignature,
    MaskedInput,
    Roster,
    ShareDelivery,
    ShareKeys,
    SurvivorList,
    UnmaskShares,
)

__all__ = ["ModelledCohort", "model_cohort", "secure_stage_bytes", "supports"]

_K32 = bytes(32)
_SIG = bytes(64)
_CT = bytes(SHARE_CIPHERTEXT_BYTES)
_SHARE = bytes(SHARE_BYTES)


@dataclass(frozen=True)
class ModelledCohort:
    drops: dict[int, str]
    duration_s: float


def supports(*, secure: bool, graph: str) -> bool:
    """Whether a cohort's duration can be known before it runs (see the module docstring)."""
    return not secure or graph == "full"


def _size(msg: object) -> int:
    return len(wire.encode(msg))


def secure_stage_bytes(params: SessionParams, drops: Mapping[int, str]
                       ) -> tuple[dict[str, dict[int, int]], dict[str, dict[int, int]]]:
    """Per stage, the bytes each honest member sends and receives in the full-graph session
    that :func:`ftte.crypto.secagg_local.run_session` runs with these drops, stopping where
    the server aborts (fewer than ``T`` members left), as the session does."""
    if uses_ring(params, len(params.members)):
        raise ValueError("the byte model covers the full masking graph only")
    T, t = params.threshold, params.t
    up: dict[str, dict[int, int]] = {}
    down: dict[str, dict[int, int]] = {}
    alive = set(params.members)

    def stage_alive(label: str) -> list[int]:
        nonlocal alive
        alive = {m for m in alive if drops.get(m) != label}
        return sorted(alive)

    # advertise: no input; each member sends its keys
    a0 = stage_alive("advertise")
    adverts = {m: AdvertiseKeys(_K32, m, _K32, _K32, _SIG, _K32) for m in a0}
    up["advertise"] = {m: _size(adverts[m]) for m in a0}
    if len(a0) < T or len(a0) < t:
        return up, down
    # share: the roster in, shares for every other roster member out
    a1 = stage_alive("share")
    roster = _size(Roster(_K32, tuple((m, wire.encode(adverts[m])) for m in a0)))
    down["share"] = {m: roster for m in a1}
    up["share"] = {m: _size(ShareKeys(_K32, m, _K32, tuple((r, _CT) for r in a0 if r != m), _SIG, _K32)) for m in a1}
    if len(a1) < T:
        return up, down
    # upload: each member's delivery (every other sharer's ciphertext, every sharer's nonce) in, masked input out
    a2 = stage_alive("upload")
    nonces = tuple((s, _K32) for s in a1)
    down["upload"] = {m: _size(ShareDelivery(_K32, tuple((s, _CT) for s in a1 if s != m), nonces)) for m in a2}
    vector = np.zeros(params.dim, dtype=ring_dtype(params.ring_bits))
    up["upload"] = {m: _size(MaskedInput(_K32, m, vector, _SIG, ())) for m in a2}
    if len(a2) < T:
        return up, down
    # consistency: the survivor list in, a signature out
    survivors = tuple(a2)
    a3 = stage_alive("consistency")
    listed = _size(SurvivorList(_K32, survivors))
    down["consistency"] = {m: listed for m in a3}
    up["consistency"] = {m: _size(ConsistencySignature(_K32, m, _SIG)) for m in a3}
    if len(a3) < T:
        return up, down
    # unmask: the bundle in; seed shares of survivors, key shares and pair seeds of the dropped sharers out
    a4 = stage_alive("unmask")
    bundle = _size(ConsistencyBundle(_K32, tuple((s, _SIG) for s in a3)))
    down["unmask"] = {m: bundle for m in a4}
    seeds = tuple((o, _SHARE) for o in a1 if o in set(survivors))
    gone = [o for o in a1 if o not in set(survivors)]
    keys = tuple((o, _SHARE) for o in gone)
    pairs = tuple((o, _K32) for o in gone)
    up["unmask"] = {m: _size(UnmaskShares(_K32, m, seeds, keys, _SIG, pairs)) for m in a4}
    return up, down


def model_cohort(start: CohortStart, devices: Sequence[SimDevice], base_versions: Mapping[int, int],
                 rng: np.random.Generator, *, secure: bool, latency_s: float) -> ModelledCohort:
    """The drops and virtual duration :func:`ftte.pipeline.cohort.run_cohort` will report for
    this cohort (example-level path; ``rng`` fresh from the cohort's seed, as run_cohort gets it)."""
    by_id = {d.device_id: d for d in devices}
    ids = tuple(start.members)
    if tuple(sorted(by_id)) != ids:
        raise ValueError("the cohort start does not list the members being modelled")
    if not secure:
        drops = draw_dropouts([by_id[m] for m in ids], ["upload"], rng)
        vector = np.zeros(start.dim - _extra(), dtype=np.float32)
        up = {m: _size(PlainUpdate(m, base_versions[m], vector, 0.0, 0.0)) for m in ids if m not in drops}
        return ModelledCohort(drops, stage_seconds(by_id, up, {}, latency_s, bool(drops)))
    # UpdateCodec.encode draws one float64 uniform per coordinate for each member, in id order:
    # each is one 64-bit step of the cohort's PCG64 stream, so skip them instead of drawing them
    rng.bit_generator.advance(len(ids) * start.dim)
    drops = draw_dropouts([by_id[m] for m in ids], STAGE_LABELS, rng)
    up, down = secure_stage_bytes(session_params(start), drops)
    duration = 0.0
    for stage in STAGE_LABELS:
        dropped_here = any(s == stage for s in drops.values())
        duration += stage_seconds(by_id, up.get(stage, {}), down.get(stage, {}), latency_s, dropped_here)
    return ModelledCohort(drops, duration)


def _extra() -> int:
    from ftte.protocol.encoding import EXTRA_COORDINATES

    return EXTRA_COORDINATES
