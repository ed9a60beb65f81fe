"""Privacy budget policy: refuse a round *before* it touches any data.

DP guarantees are about what an adversary can see; once a model update computed from
the records has left the device, the cost is paid whether or not we later notice the
budget was exceeded. The only useful check is therefore a prospective one: compute what
the accountant would say *after* the planned round, and refuse the round if that exceeds
the budget, before a single gradient is computed. ``PrivateTrainer`` calls
:meth:`PrivacyBudget.check` first thing in every private round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .accountant import PrivacyStep, check_accountant_name, compute_epsilon


class BudgetExceededError(RuntimeError):
    """The planned round would push the device past its (ε_max, δ) budget.

    Carries the numbers as attributes so callers (the edge runtime, the server) can log
    or report them without parsing the message.
    """

    def __init__(
        self,
        *,
        device_id: str | None,
        epsilon_max: float,
        delta: float,
        epsilon_spent: float,
        round_cost: float,
        epsilon_after: float,
        planned: PrivacyStep,
        accountant: str,
    ) -> None:
        self.device_id = device_id
        self.epsilon_max = epsilon_max
        self.delta = delta
        self.epsilon_spent = epsilon_spent
        self.round_cost = round_cost
        self.epsilon_after = epsilon_after
        self.planned = planned
        self.accountant = accountant
        who = f"device {device_id!r}" if device_id is not None else "this device"
        super().__init__(
            f"privacy budget exceeded for {who}: budget epsilon_max={epsilon_max:.4g} at delta={delta:.3g} "
            f"({accountant} accountant); spent so far epsilon={epsilon_spent:.4g}; the planned round "
            f"({planned.steps} steps, sample_rate={planned.sample_rate:.4g}, "
            f"noise_multiplier={planned.noise_multiplier:.4g}) would cost {round_cost:.4g} "
            f"and bring the total to {epsilon_after:.4g}. The round was refused before training."
        )


@dataclass(frozen=True)
class BudgetCheck:
    """The outcome of a passed budget check: what the round will cost.

    ``round_cost`` is the *increase* in cumulative ε (ε_after − ε_spent). Under
    composition ε is not additive, so this is the marginal cost of this round given the
    history, which is what "ε spent in the round" means in the ledger.
    """

    epsilon_spent: float
    round_cost: float
    epsilon_after: float
    epsilon_max: float
    delta: float
    accountant: str

    @property
    def epsilon_remaining(self) -> float:
        """Budget left after the round."""
        return self.epsilon_max - self.epsilon_after


@dataclass(frozen=True)
class PrivacyBudget:
    """A device's (ε_max, δ) budget for its whole lifetime (all rounds, all plans)."""

    epsilon_max: float
    delta: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon_max", float(self.epsilon_max))
        object.__setattr__(self, "delta", float(self.delta))
        if not (self.epsilon_max > 0.0) or math.isnan(self.epsilon_max):
            raise ValueError(f"epsilon_max must be > 0, got {self.epsilon_max}")
        if not (0.0 < self.delta < 1.0):
            raise ValueError(f"delta must lie in (0, 1), got {self.delta}")

    def spent(self, history: Sequence[PrivacyStep], accountant: str = "prv") -> float:
        return compute_epsilon(history, self.delta, accountant)

    def remaining(self, history: Sequence[PrivacyStep], accountant: str = "prv") -> float:
        return self.epsilon_max - self.spent(history, accountant)

    def check(
        self,
        history: Sequence[PrivacyStep],
        planned: PrivacyStep,
        *,
        accountant: str = "prv",
        device_id: str | None = None,
        epsilon_spent: float | None = None,
    ) -> BudgetCheck:
        """Return the planned round's cost, or raise :class:`BudgetExceededError`.

        ``epsilon_spent`` may be passed when the caller already knows it (it is a pure
        function of ``history``); otherwise it is recomputed. Nothing is stored here:
        recording the round is the caller's next step once the check passed.
        """
        check_accountant_name(accountant)
        if epsilon_spent is None:
            epsilon_spent = compute_epsilon(history, self.delta, accountant)
        epsilon_after = compute_epsilon((*history, planned), self.delta, accountant)
        cost = epsilon_after - epsilon_spent
        if not (epsilon_after <= self.epsilon_max):
            raise BudgetExceededError(
                device_id=device_id,
                epsilon_max=self.epsilon_max,
                delta=self.delta,
                epsilon_spent=epsilon_spent,
                round_cost=cost,
                epsilon_after=epsilon_after,
                planned=planned,
                accountant=accountant,
            )
        return BudgetCheck(
            epsilon_spent=epsilon_spent,
            round_cost=cost,
            epsilon_after=epsilon_after,
            epsilon_max=self.epsilon_max,
            delta=self.delta,
            accountant=accountant,
        )
