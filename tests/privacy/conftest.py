"""Shared fixtures for the privacy tests: tiny real data, real keys, a real signed ledger."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from ftte.privacy.secure_random import SecureRandom
from ftte.privacy.accountant import AccountantStore
from ftte.privacy.dpsgd import DPConfig, PrivateTrainer
from ftte.privacy.ledger import Ledger


@pytest.fixture
def easy_task() -> tuple[torch.Tensor, torch.Tensor]:
    """64 points, 4 features, label = sign of a fixed linear function (separable)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(64, 4, generator=g)
    y = (x @ torch.tensor([1.5, -2.0, 0.5, 1.0]) > 0).long()
    return x, y


@pytest.fixture
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def ce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, target)


@pytest.fixture(scope="session")
def clean_ledger(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A ledger written from real DP-SGD rounds: two devices, three rounds each, with a
    noise change on one device so its history is heterogeneous. Tests copy the file
    before tampering with it."""
    root = tmp_path_factory.mktemp("ledger")
    key = Ed25519PrivateKey.generate()
    path = root / "ledger.db"
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long()
    with Ledger(path, key) as ledger:
        for dev, schedule, acct in (("phone-1", (1.0, 1.0, 1.0), "prv"), ("watch-2", (1.1, 1.4, 1.1), "rdp")):
            store = AccountantStore(root / f"acc-{dev}.db")
            trainer = PrivateTrainer(
                nn.Linear(4, 2), DPConfig(noise_multiplier=schedule[0], accountant=acct, epsilon_max=8.0),
                device_id=dev, store=store, rng=SecureRandom.from_seed(1),
            )
            for version, nm in enumerate(schedule):
                trainer.config = DPConfig(noise_multiplier=nm, accountant=acct, epsilon_max=8.0)
                stats = trainer.train_round((x, y), loss_fn=ce, lr=0.2, batch_size=4, steps=4)
                ledger.append(stats.to_ledger_row(plan_id="plan-A", version=version, cohort_id=f"cohort-{version}"))
            trainer.close()
            store.close()
        n_rows = len(ledger)
        public_key = ledger.public_key_hex
    return {"path": Path(path), "key": key, "n_rows": n_rows, "public_key": public_key}
