"""Differential privacy: DP-SGD on a parameter subset, accountants, budgets, the ledger and its audit.

Modules (import them directly; names below are also re-exported lazily so that
``import ftte.privacy`` does not pull in torch/opacus, which the ``ftte`` CLI relies on):

- :mod:`.dpsgd`      ``DPConfig``, ``PrivateTrainer``, ``RoundStats``, ``RoundPlan``
- :mod:`.accountant` ``PrivacyStep``, ``AccountantStore``, ``compute_epsilon``
- :mod:`.budget`     ``PrivacyBudget``, ``BudgetCheck``, ``BudgetExceededError``
- :mod:`.ledger`     ``Ledger``, ``LedgerRow``, ``LedgerEntry``
- :mod:`.audit`      ``verify_ledger``, ``write_report``, ``AuditResult``
- :mod:`.secure_random` ``SecureRandom`` (ChaCha20 sampling and secure-mode Gaussian noise)
- :mod:`.spend`      ``SpendRecord``, ``RoundOutcome``, ``ledger_row``, ``ledger_rows``, ``sign_spend``
- :mod:`.device_record` a device's own JSONL record of its signed spend claims
- :mod:`.policy`     ``PrivacyPolicy``, ``default_delta``, ``check_delta``, ``noise_multiplier_for_target``
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DPConfig": "dpsgd",
    "PrivateTrainer": "dpsgd",
    "RoundStats": "dpsgd",
    "RoundPlan": "dpsgd",
    "default_delta": "policy",
    "check_delta": "policy",
    "noise_multiplier_for_target": "policy",
    "PrivacyPolicy": "policy",
    "SecureRandom": "secure_random",
    "SpendRecord": "spend",
    "SpendClaim": "spend",
    "RoundOutcome": "spend",
    "ledger_row": "spend",
    "ledger_rows": "spend",
    "sign_spend": "spend",
    "Charge": "accountant",
    "PrivacyStep": "accountant",
    "AccountantStore": "accountant",
    "DeviceAccountantState": "accountant",
    "compute_epsilon": "accountant",
    "PrivacyBudget": "budget",
    "BudgetCheck": "budget",
    "BudgetExceededError": "budget",
    "Ledger": "ledger",
    "LedgerRow": "ledger",
    "LedgerEntry": "ledger",
    "LedgerError": "ledger",
    "AuditResult": "audit",
    "verify_ledger": "audit",
    "write_report": "audit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
