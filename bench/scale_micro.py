"""Per-operation costs behind the fleet-scale work (``python -m ftte.bench.scale_micro``), before/after
in one process: Opacus's one-step RDP curve against ``ftte.privacy.rdp_curve`` over a grid of the
mechanisms a simulated fleet uses, and the X25519 peer-key check against the exchange with a
throwaway key pair it replaced. Prints one JSON object."""

from __future__ import annotations

import json
import os
import time
import warnings


def _rdp() -> dict[str, float]:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as opacus_rdp

    from ftte.privacy.rdp_curve import rdp_one_step

    orders = RDPAccountant.DEFAULT_ALPHAS
    grid = [(q, s) for q in (0.003, 0.02, 0.1, 0.16, 0.3) for s in (0.5, 0.7, 1.0, 1.5)]
    t = time.perf_counter()
    for q, s in grid:
        opacus_rdp.compute_rdp(q=q, noise_multiplier=s, steps=1, orders=orders)
    opacus_s = time.perf_counter() - t
    t = time.perf_counter()
    for q, s in grid:
        rdp_one_step(q, s, orders)
    ours_s = time.perf_counter() - t
    return {"rdp_curves": len(grid), "rdp_opacus_s": round(opacus_s, 3), "rdp_ftte_s": round(ours_s, 3),
            "rdp_speedup": round(opacus_s / ours_s, 2)}


def _x25519() -> dict[str, float]:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    from ftte.crypto.primitives import x25519_check_public

    keys = [X25519PrivateKey.generate().public_key().public_bytes_raw() for _ in range(2000)]
    t = time.perf_counter()
    for k in keys:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(k))
    old = (time.perf_counter() - t) / len(keys)
    t = time.perf_counter()
    for k in keys:
        x25519_check_public(k)
    new = (time.perf_counter() - t) / len(keys)
    return {"x25519_check_exchange_us": round(old * 1e6, 2), "x25519_check_arith_us": round(new * 1e6, 3)}


def main() -> int:
    warnings.simplefilter("ignore")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    print(json.dumps({**_rdp(), **_x25519()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
