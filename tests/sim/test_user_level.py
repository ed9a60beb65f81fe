"""User-level DP in the simulator (issue 13): noise in the masked sum, accounted per participation."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from ftte.pipeline.config import ConfigError
from ftte.privacy.audit import verify_ledger
from ftte.privacy.ledger import Ledger
from sim_helpers import tiny
from ftte.pipeline.run_outputs import run_one


@pytest.mark.parametrize("noise", ["distributed", "server"])
def test_user_level_runs_audit_and_never_pass_the_participation_budget(tmp_path, noise):
    # cohorts of 4: the plan rule (user_noise_ratio) would admit no plan; this test is about the mechanism
    cfg = tiny(**{"privacy.unit": "user", "privacy.user_noise": noise, "server.variance_penalty": 0.0,
                  "privacy.user_participations": 2, "run.max_versions": 6, "privacy.user_noise_ratio": math.inf})
    out = tmp_path / noise
    summary = run_one(cfg, out, quiet=True).summary
    assert summary["privacy_unit"].startswith("a device's whole contribution")
    assert summary["epsilon_max"] <= cfg.privacy.user_epsilon + 1e-9
    result = verify_ledger(out / "ledger.db")
    assert result.ok, result.summary()
    with Ledger(out / "ledger.db") as ledger:
        assert ledger.policy().unit == "user"
        rows = [e.row for e in ledger.entries()]
    assert rows and all(r.accountant == "rdp" and r.sample_rate == 1.0 and r.delta == cfg.privacy.user_delta
                        for r in rows)
    # 2 participations fill the budget: no device is charged a third
    assert max(Counter(r.device_id for r in rows).values()) <= 2
    assert all(("mech=ddg" in r.rng_source) == (noise == "distributed") or r.outcome == "unmerged" for r in rows)


def test_user_level_rules_are_checked():
    with pytest.raises(ConfigError, match="variance_penalty"):
        tiny(**{"privacy.unit": "user"})
    with pytest.raises(ConfigError, match="user_noise"):
        tiny(**{"privacy.unit": "user", "server.variance_penalty": 0.0, "secagg.enabled": False})


def test_a_deployment_takes_distributed_user_level_and_refuses_server_noise(tmp_path):
    """A deployment always masks: user-level noise is added by the devices ('distributed');
    'server' noise (a trusted server seeing the plain sum) is refused."""
    from ftte.pipeline.deploy_config import parse_server_config

    base = '[http]\nplaintext = true\n[server]\nvariance_penalty = 0.0\n[privacy]\nunit = "user"\n'
    settings = parse_server_config(base, base_dir=tmp_path)
    assert settings.run.privacy.user_level
    with pytest.raises(ConfigError, match="user_noise"):
        parse_server_config(base + 'user_noise = "server"\n', base_dir=tmp_path)


def test_user_level_plans_are_costed_without_dp_sgd_memory():
    """Under user-level DP the device runs plain SGD (the noise is in the sum), so the plan
    search must not budget per-sample gradients it will never hold: without the noise rule's cap
    (user_noise_ratio = inf) the plan is the one a non-private run gets, and larger than the
    example-level DP plan; with the default rule it is smaller still (tests/pipeline/test_user_plan_rule.py)."""
    from ftte.pipeline.simulator import Simulation

    from ftte.pipeline.config import load_config

    def plan_of(**overrides):  # the default MNIST task, where the straggler budget binds
        sim = Simulation(load_config(None).with_overrides(**overrides))
        try:
            return sim.plan.num_coordinates
        finally:
            sim.close()

    user = plan_of(**{"privacy.unit": "user", "server.variance_penalty": 0.0, "privacy.user_noise_ratio": math.inf})
    assert user == plan_of(**{"privacy.enabled": False})
    assert user > plan_of()
