"""Differential privacy: DP-SGD on a parameter subset, accountants, budgets, the ledger and its audit."""
