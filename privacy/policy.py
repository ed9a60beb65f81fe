"""What a privacy claim may be: default δ, the refusal of a meaningless δ, noise from a target ε,
and the operator's policy that the server enforces and the audit re-checks.

Why δ ≤ 1/(10 n) and never ≥ 1/n: an (ε, δ) mechanism may, with probability δ, publish a
record outright; with δ ≥ 1/n "publish one random record in full" satisfies the definition.
For example-level DP on a device with n records we default to min(1e-5, 1/(10 n)) and refuse
δ ≥ 1/n with an error that names the config key.

Why a policy object: a budget that each device states for itself is a promise nobody checks.
The operator fixes one :class:`PrivacyPolicy` per task (unit protected, the largest δ, the ε
cap per device, the noise floor, the accountant); the server refuses joins outside it, the
ledger stores it in its metadata, and ``ftte audit`` checks every row against it.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .accountant import PrivacyStep, check_accountant_name, compute_epsilon

if TYPE_CHECKING:
    from .ledger import LedgerRow

DELTA_KEY = "privacy.delta"
DELTA_CEILING = 1e-5
UNITS = ("record", "user")  # example-level DP on one device's records; user-level (the device), distributed_dp.py


def default_delta(n_records: int) -> float:
    """min(1e-5, 1/(10 n)): far below 1/n, the level at which δ stops meaning anything."""
    if n_records < 1:
        raise ValueError("n_records must be >= 1")
    return min(DELTA_CEILING, 1.0 / (10.0 * n_records))


def check_delta(delta: float, n_records: int, *, key: str = DELTA_KEY) -> float:
    """Return ``delta`` if it is meaningful for ``n_records`` records; raise naming ``key`` if not."""
    if n_records < 1:
        raise ValueError("n_records must be >= 1")
    if not (0.0 < delta < 1.0):
        raise ValueError(f"{key}={delta!r} must lie in (0, 1)")
    if delta >= 1.0 / n_records:
        raise ValueError(
            f"{key}={delta!r} is >= 1/n = {1.0 / n_records:.3g} for a device with {n_records} records: "
            f"such a delta allows publishing a whole record; use at most {default_delta(n_records):.3g}"
        )
    return delta


@functools.lru_cache(maxsize=65536)  # pure: a simulation asks the same question for every device of a size
def noise_multiplier_for_target(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    *,
    accountant: str = "rdp",
    tolerance: float = 0.01,
    max_sigma: float = 1e4,
) -> float:
    """The smallest noise multiplier (to within ``tolerance`` in ε) for which ``rounds``
    rounds of ``steps_per_round`` steps at ``sample_rate`` cost at most ``target_epsilon``
    at ``delta`` under ``accountant`` — the same search as Opacus's
    ``get_noise_multiplier``, run through our accountants so the figure matches the ledger.

    The returned σ always satisfies the target (we return the upper end of the bracket).
    """
    check_accountant_name(accountant)
    if not (target_epsilon > 0.0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon}")
    if steps_per_round < 1 or rounds < 1:
        raise ValueError("steps_per_round and rounds must be >= 1")

    def eps(sigma: float) -> float:
        # Identical rounds merge into one history entry, exactly as the store would hold them.
        return compute_epsilon([PrivacyStep(sigma, sample_rate, steps_per_round)] * rounds, delta, accountant)

    low, high = 0.0, 1.0
    eps_high = eps(high)
    while eps_high > target_epsilon:
        low, high = high, 2.0 * high
        if high > max_sigma:
            raise ValueError(f"no noise multiplier <= {max_sigma} reaches epsilon {target_epsilon} at delta {delta}")
        eps_high = eps(high)
    while target_epsilon - eps_high > tolerance:
        mid = 0.5 * (low + high)
        if mid <= 0.0:
            break
        e = eps(mid)
        if e <= target_epsilon:
            high, eps_high = mid, e
        else:
            low = mid
        if high - low < 1e-9:
            break
    return high


@dataclass(frozen=True)
class PrivacyPolicy:
    """The operator's privacy policy for one task.

    ``delta`` is the largest δ any device may be accounted at (a device with many records
    gets min(delta, its default)); ``epsilon_cap`` bounds every device's cumulative ε and its
    stated ``epsilon_max``; ``min_noise_multiplier`` is the noise floor of every round.
    """

    delta: float
    epsilon_cap: float
    min_noise_multiplier: float
    accountant: str = "rdp"
    unit: str = "record"

    def __post_init__(self) -> None:
        check_accountant_name(self.accountant)
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if not (0.0 < self.delta < 1.0):
            raise ValueError(f"{DELTA_KEY}={self.delta!r} must lie in (0, 1)")
        if not (self.epsilon_cap > 0.0 and math.isfinite(self.epsilon_cap)):
            raise ValueError(f"epsilon_cap must be finite and > 0, got {self.epsilon_cap}")
        if not (self.min_noise_multiplier > 0.0 and math.isfinite(self.min_noise_multiplier)):
            raise ValueError(f"min_noise_multiplier must be finite and > 0, got {self.min_noise_multiplier}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "PrivacyPolicy":
        doc: Any = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError("policy must be a JSON object")
        unknown = set(doc) - {"delta", "epsilon_cap", "min_noise_multiplier", "accountant", "unit"}
        if unknown:
            raise ValueError(f"unknown policy keys {sorted(unknown)}")
        return cls(**doc)

    def violations(self, *, delta: float, noise_multiplier: float, accountant: str,
                   epsilon_max: float | None = None, epsilon_total: float | None = None) -> list[str]:
        """What a round with these settings would violate (empty: nothing). The server calls
        this before admitting a join (``epsilon_total``: the device's ledger ε after the
        round), a device before accepting a task; the audit calls it on every row."""
        out = []
        if accountant != self.accountant:
            out.append(f"accountant {accountant!r} is not the policy's {self.accountant!r}")
        if not (delta <= self.delta):
            out.append(f"delta {delta!r} exceeds the policy's {self.delta!r}")
        if not (noise_multiplier >= self.min_noise_multiplier):
            out.append(f"noise multiplier {noise_multiplier!r} is below the floor {self.min_noise_multiplier!r}")
        if epsilon_max is not None and not (epsilon_max <= self.epsilon_cap):
            out.append(f"epsilon_max {epsilon_max!r} exceeds the cap {self.epsilon_cap!r}")
        if epsilon_total is not None and not (epsilon_total <= self.epsilon_cap):
            out.append(f"epsilon_total {epsilon_total!r} exceeds the cap {self.epsilon_cap!r}")
        return out

    def row_violations(self, row: "LedgerRow") -> list[str]:
        """What is wrong with one ledger row under this policy (empty: nothing).

        The cumulative-ε check here uses the recorded figure; the audit also checks the
        recomputed one, and one δ per device, which need the device's other rows.
        """
        return self.violations(delta=row.delta, noise_multiplier=row.noise_multiplier, accountant=row.accountant,
                               epsilon_max=row.epsilon_max, epsilon_total=row.epsilon_total)
