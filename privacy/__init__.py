"""Differential privacy: DP-SGD on a parameter subset, accountants, budgets, the ledger and its audit.

Modules (import them directly; names below are also re-exported lazily so that
``import ftte.privacy`` does not pull in torch/opacus, which the ``ftte`` CLI relies on):

- :mod:`.dpsgd`      ``DPConfig``, ``PrivateTrainer``, ``RoundStats``, ``RoundPlan``
- :mod:`.accountant` ``PrivacyStep``, ``AccountantStore``, ``compute_epsilon``
- :mod:`.budget`     ``PrivacyBudget``, ``BudgetCheck``, ``BudgetExceededError``
- :mod:`.ledger`     ``Ledger``, ``LedgerRow``, ``LedgerEntry``
- :mod:`.audit`      ``verify_ledger``, ``write_report``, ``AuditResult``
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DPConfig": "dpsgd",
    "PrivateTrainer": "dpsgd",
    "RoundStats": "dpsgd",
    "RoundPlan": "dpsgd",
    "default_delta": "dpsgd",
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
