"""A round over budget is refused before any training, and changes nothing."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from ftte.privacy.secure_random import SecureRandom
from ftte.privacy.accountant import AccountantStore, PrivacyStep, compute_epsilon
from ftte.privacy.budget import BudgetExceededError, PrivacyBudget
from ftte.privacy.dpsgd import DPConfig, PrivateTrainer
from ftte.privacy.ledger import Ledger


def test_check_reports_marginal_cost_and_refuses_past_the_budget():
    delta = 1e-4
    history = [PrivacyStep(1.2, 0.02, 10)]
    planned = PrivacyStep(1.2, 0.02, 10)
    spent = compute_epsilon(history, delta, "rdp")
    after = compute_epsilon(history + [planned], delta, "rdp")
    ok = PrivacyBudget(after + 1e-9, delta).check(history, planned, accountant="rdp")
    assert ok.epsilon_spent == spent and ok.epsilon_after == after
    assert ok.round_cost == pytest.approx(after - spent)
    assert 0 < ok.round_cost < after  # composition is sub-additive here
    with pytest.raises(BudgetExceededError) as err:
        PrivacyBudget(after - 1e-6, delta).check(history, planned, accountant="rdp", device_id="tablet-3")
    e = err.value
    assert (e.epsilon_spent, e.epsilon_after, e.device_id) == (spent, after, "tablet-3")
    msg = str(e)
    for fragment in ("tablet-3", f"{after - 1e-6:.4g}", f"{spent:.4g}", f"{after - spent:.4g}", "before training"):
        assert fragment in msg
    with pytest.raises(ValueError):
        PrivacyBudget(0.0, delta)
    with pytest.raises(ValueError):
        PrivacyBudget(1.0, 1.0)


def test_refusal_happens_before_training_and_leaves_everything_unchanged(tmp_path, easy_task, signing_key):
    x, y = easy_task
    store = AccountantStore(tmp_path / "acc.db")
    ledger_path = tmp_path / "ledger.db"
    ledger = Ledger(ledger_path, signing_key)
    gen = SecureRandom.from_seed(5)
    model = nn.Linear(4, 2)
    # noise 1.0, q = 1/16, 5 steps costs about 1.0 at delta=1/640 for the first round
    trainer = PrivateTrainer(model, DPConfig(noise_multiplier=1.0, epsilon_max=1.5, delta=1 / 640, accountant="prv"), device_id="pos-9",
                             store=store, rng=gen)

    first = trainer.train_round((x, y), loss_fn=nn.functional.cross_entropy, lr=0.1, batch_size=4, steps=5)
    ledger.append(first.to_ledger_row(plan_id="p", version=0))
    assert first.epsilon_total <= 1.5

    calls = []

    def counting_loss(out, target):
        calls.append(1)
        return nn.functional.cross_entropy(out, target)

    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng_state = gen.bytes_drawn
    history = store.history("pos-9")
    ledger_bytes = hashlib.sha256(ledger_path.read_bytes()).hexdigest()
    head = ledger.head()

    with pytest.raises(BudgetExceededError) as err:
        trainer.train_round((x, y), loss_fn=counting_loss, lr=0.1, batch_size=4, steps=40)
    assert err.value.epsilon_spent == pytest.approx(first.epsilon_total)
    assert err.value.epsilon_after > 1.5

    assert calls == []  # no forward pass, no loss
    assert gen.bytes_drawn == rng_state  # no sampling, no noise drawn
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert store.history("pos-9") == history  # nothing reserved
    assert hashlib.sha256(ledger_path.read_bytes()).hexdigest() == ledger_bytes
    assert len(ledger) == 1 and ledger.head() == head

    # a smaller round still fits and proceeds normally
    ok = trainer.train_round((x, y), loss_fn=counting_loss, lr=0.1, batch_size=4, steps=1)
    assert calls and ok.epsilon_total <= 1.5
    ledger.close()
    store.close()


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_target_epsilon_spreads_budget_over_planned_rounds(easy_task):
    """Noise derived for 3 planned rounds: 3 rounds fit under the target, a 4th does not."""
    x, y = easy_task
    cfg = DPConfig(target_epsilon=2.0, planned_rounds=3, epsilon_max=2.0, accountant="rdp", delta=1e-3)
    trainer = PrivateTrainer(nn.Linear(4, 2), cfg)
    totals = [trainer.train_round((x, y), loss_fn=nn.functional.cross_entropy, lr=0.1, batch_size=2,
                                  steps=5).epsilon_total for _ in range(3)]
    assert totals[-1] <= 2.0 and totals[-1] > 1.9  # close to the target, not wastefully below
    with pytest.raises(BudgetExceededError):
        trainer.train_round((x, y), loss_fn=nn.functional.cross_entropy, lr=0.1, batch_size=2, steps=5)
