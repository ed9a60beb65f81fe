from __future__ import annotations

import numpy as np
import pytest

from ftte.crypto.primitives import Signer
from ftte.crypto.secagg_session import SessionParams

_SIGNERS: dict[int, Signer] = {}


def signer(member: int) -> Signer:
    """Long-term identities are reused across tests (they are not session keys)."""
    if member not in _SIGNERS:
        _SIGNERS[member] = Signer()
    return _SIGNERS[member]


def make_params(n: int, *, threshold: int | None = None, dim: int = 32, bits: int = 16, graph: str = "full",
                neighbors: int = 0, cohort: str = "c", version: int = 1, members=None,
                max_corrupt: int = 0) -> SessionParams:
    members = tuple(members if members is not None else range(n))
    return SessionParams(
        cohort_id=cohort,
        plan_id="plan-a",
        model_hash=bytes(range(32)),
        close_version=version,
        members=members,
        identity_keys=tuple(signer(m).public_key for m in members),
        threshold=threshold if threshold is not None else len(members) // 2 + 1,
        dim=dim,
        ring_bits=bits,
        graph=graph,
        neighbors=neighbors,
        max_corrupt=max_corrupt,
    )


def random_inputs(params: SessionParams, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if params.ring_bits == 16 else np.uint32
    return {m: rng.integers(0, 2**params.ring_bits, params.dim, dtype=np.uint64).astype(dtype) for m in params.members}


def ring_sum(inputs, members, bits):
    total = 0
    for m in members:
        total = total + inputs[m].astype(np.uint64)
    return (total % (2**bits)).astype(np.uint16 if bits == 16 else np.uint32)


@pytest.fixture
def identities():
    return {m: signer(m) for m in range(64)}
