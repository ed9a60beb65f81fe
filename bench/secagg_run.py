"""One secure-aggregation session with real crypto, measured: the body of ``ftte bench secagg``."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

from ftte.crypto.primitives import Signer
from ftte.crypto.quantize import Quantizer, choose_ring_bits
from ftte.crypto.secagg_local import run_session
from ftte.crypto.secagg_session import SessionParams, suggest_ring_neighbors


@dataclass(frozen=True)
class SecAggBenchConfig:
    clients: int = 10
    dim: int = 100_000
    dropout: float = 0.1
    graph: str = "full"
    neighbors: int = 0
    threshold: int = 0  # 0: floor(n/2) + 1, or a strict majority of the ring holders
    value_bits: int = 12
    clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clients < 2:
            raise ValueError("--clients must be >= 2")
        if self.dim < 1:
            raise ValueError("--dim must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("--dropout must be in [0, 1)")


def make_cohort(cfg: SecAggBenchConfig) -> tuple[SessionParams, dict[int, Signer], dict[int, np.ndarray], dict[int, str], np.ndarray]:
    """Members, identities, quantized inputs of random float updates, and who drops (after sharing keys)."""
    rng = np.random.default_rng(cfg.seed)
    members = tuple(range(cfg.clients))
    identities = {m: Signer() for m in members}
    bits = choose_ring_bits(cfg.clients, cfg.value_bits)
    threshold = cfg.threshold or cfg.clients // 2 + 1
    neighbors = cfg.neighbors
    if cfg.graph == "ring" and neighbors == 0:
        neighbors = suggest_ring_neighbors(cfg.clients, cfg.dropout)
    graph = "full" if neighbors >= cfg.clients - 1 else cfg.graph
    neighbors = neighbors if graph == "ring" else 0
    params = SessionParams(
        cohort_id=f"bench-{cfg.seed}",
        plan_id="bench",
        model_hash=bytes(32),
        close_version=0,
        members=members,
        identity_keys=tuple(identities[m].public_key for m in members),
        threshold=threshold,
        dim=cfg.dim,
        ring_bits=bits,
        graph=graph,
        neighbors=neighbors,
    )
    quantizer = Quantizer(cfg.clip, cfg.value_bits, bits)
    floats = rng.normal(0.0, cfg.clip / 3, size=(cfg.clients, cfg.dim))
    inputs = {m: quantizer.quantize(floats[m], rng) for m in members}
    n_drop = int(math.floor(cfg.dropout * cfg.clients + 1e-9))
    dropped = rng.choice(cfg.clients, size=n_drop, replace=False) if n_drop else []
    drop = {int(m): "upload" for m in dropped}
    return params, identities, inputs, drop, floats


def run(cfg: SecAggBenchConfig) -> dict:
    params, identities, inputs, drop, _ = make_cohort(cfg)
    result, stats = run_session(params, identities, inputs, drop)
    if result is None:
        raise RuntimeError(f"session aborted: {stats.aborted}")
    expected = np.zeros(cfg.dim, dtype=inputs[0].dtype)
    for m in result.survivors:
        np.add(expected, inputs[m], out=expected)
    survivors = result.survivors
    up = [stats.bytes_up[m] for m in survivors]
    down = [stats.bytes_down[m] for m in survivors]
    return {
        "clients": cfg.clients,
        "dim": cfg.dim,
        "dropout": cfg.dropout,
        "graph": params.graph,
        "neighbors": params.neighbors if params.graph == "ring" else cfg.clients - 1,
        "threshold": params.threshold,
        "ring_bits": params.ring_bits,
        "value_bits": cfg.value_bits,
        "survivors": len(survivors),
        "dropped": len(result.dropped),
        "exact": bool(np.array_equal(expected, result.total)),
        "client_mask_s": statistics.median(stats.mask_seconds.values()),
        "server_unmask_s": stats.server_unmask_seconds,
        "server_total_s": stats.server_seconds,
        "bytes_up_per_client": int(statistics.median(up)),
        "bytes_down_per_client": int(statistics.median(down)),
        "upload_bytes_per_coordinate": statistics.median(up) / cfg.dim,
        "vector_bytes_per_coordinate": inputs[0].dtype.itemsize,
    }
