"""The user-level plan rule (issue 13): under ``unit = "user"`` ftte's plan is capped so the predicted
noise-to-signal ratio on a cohort's mean stays within ``[privacy] user_noise_ratio``."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftte.pipeline.config import ConfigError, load_config
from ftte.pipeline.strategies import strategy_for, user_coordinate_cap, user_noise_terms
from ftte.privacy.distributed_dp import mean_noise_ratio

DEFAULT_TASK_COORDINATES = 131_210  # cnn28, the full model


def _user(**overrides):
    """The default task's config under user-level DP with cohorts of ``buffer_size`` (100 unless given)."""
    base = {"privacy.unit": "user", "server.variance_penalty": 0.0, "server.buffer_size": 100,
            "fleet.devices": 1000, "secagg.graph": "ring", "secagg.neighbors": 10}
    base.update(overrides)
    return load_config(None).with_overrides(**base)


@settings(max_examples=25, deadline=None)
@given(eps=st.floats(0.5, 16.0), more_eps=st.floats(0.0, 8.0), k=st.integers(12, 400), more_k=st.integers(0, 400),
       ratio=st.sampled_from([0.5, 1.0, 3.5, 8.0]), noise=st.sampled_from(["distributed", "server"]))
def test_a_larger_epsilon_or_cohort_never_gives_a_smaller_cap(eps, more_eps, k, more_k, ratio, noise):
    def cap(e, kk):
        cfg = _user(**{"privacy.user_epsilon": e, "server.buffer_size": kk, "privacy.user_noise_ratio": ratio,
                       "privacy.user_noise": noise})
        return cfg, user_coordinate_cap(cfg, upper=DEFAULT_TASK_COORDINATES)

    cfg, base = cap(eps, k)
    assert cap(eps + more_eps, k)[1] >= base
    assert cap(eps, k + more_k)[1] >= base
    # the cap is the rule's boundary: within the ratio at the cap, above it one coordinate later
    terms = user_noise_terms(cfg)
    if base > 0:
        assert mean_noise_ratio(base, **terms) <= ratio
    if base < DEFAULT_TASK_COORDINATES:
        assert mean_noise_ratio(base + 1, **terms) > ratio


def test_the_cap_follows_the_noise_it_predicts():
    """Central noise is sqrt(n/m) smaller than distributed, so its cap is about n/m times larger;
    the ratio it bounds is the bench's figure (7.57 for the 75,274-coordinate plan at epsilon 8)."""
    dist, central = _user(), _user(**{"privacy.user_noise": "server"})
    assert mean_noise_ratio(75_274, **user_noise_terms(dist)) == pytest.approx(7.565, abs=5e-3)
    c_dist, c_central = user_coordinate_cap(dist), user_coordinate_cap(central)
    n, m = 100, dist.secagg_threshold - dist.secagg.max_corrupt
    assert c_central / c_dist == pytest.approx(n / m, rel=0.02)
    assert user_coordinate_cap(_user(**{"privacy.enabled": False})) is None
    assert user_coordinate_cap(_user(**{"privacy.user_noise_ratio": math.inf}), upper=5) == 5


@pytest.fixture(scope="module")
def default_task():
    import torch

    from ftte.pipeline.datasets import load_dataset
    from ftte.pipeline.fleet import build_fleet
    from ftte.pipeline.model_builder import build_global_model

    torch.set_num_threads(1)
    cfg = _user()
    data = load_dataset(cfg.data, 0, cfg.fleet.devices)
    fleet = build_fleet(cfg.fleet, cfg.fleet.devices, 0)
    model = build_global_model(cfg.model.name, 0, data.input_shape, data.n_classes)
    return model, data, fleet


def _plan(cfg, default_task):
    return strategy_for(cfg).choose_training(*default_task).plan


@pytest.mark.parametrize("eps, noise", [(8.0, "distributed"), (2.0, "distributed"), (8.0, "server")])
def test_the_chosen_plan_obeys_the_cap_and_is_the_capped_search(default_task, eps, noise):
    cfg = _user(**{"privacy.user_epsilon": eps, "privacy.user_noise": noise, "privacy.user_noise_ratio": 3.5})
    plan = _plan(cfg, default_task)
    cap = user_coordinate_cap(cfg)
    assert cap is not None and plan.num_coordinates <= cap
    assert mean_noise_ratio(plan.num_coordinates, **user_noise_terms(cfg)) <= 3.5
    memory_only = _plan(_user(**{"privacy.enabled": False}), default_task)
    assert plan.num_coordinates < memory_only.num_coordinates
    # "pick as the plan search does today": the same plan as a non-private search given the same cap
    same = _plan(_user(**{"privacy.enabled": False, "train.max_coordinates": cap}), default_task)
    assert same.plan_id == plan.plan_id


def test_fedbuff_keeps_the_full_model_under_user_level_dp(default_task):
    plan = _plan(_user(**{"run.strategy": "fedbuff", "privacy.user_epsilon": 2.0, "privacy.user_noise_ratio": 0.5}),
                 default_task)
    assert plan.num_coordinates == DEFAULT_TASK_COORDINATES


def test_a_cap_that_admits_no_plan_is_an_error_naming_its_numbers(default_task):
    """Epsilon 2 and a ratio of 1 admit 110 coordinates; the first GroupNorm (64) is smaller but does not fit
    the stragglers' memory (it needs the whole graph from the first layer on); the smallest unit that fits
    is a later GroupNorm (128)."""
    cfg = _user(**{"privacy.user_epsilon": 2.0, "privacy.user_noise_ratio": 1.0})
    cap = user_coordinate_cap(cfg)
    with pytest.raises(ConfigError, match="user_noise_ratio = 1 admits no plan") as info:
        _plan(cfg, default_task)
    text = str(info.value)
    for part in (f"at most {cap} coordinates", "user_epsilon 2", "cohorts of 100 with threshold 51",
                 "max_corrupt 1", "8 participations", "the smallest plan within memory trains 128"):
        assert part in text, (part, text)


def test_a_user_level_deployment_refuses_a_plan_beyond_the_cap(tmp_path):
    from ftte.pipeline.deploy_config import parse_server_config
    from ftte.pipeline.deploy_task import build_task

    # logistic on 64 features: 650 coordinates; cohorts of up to 100, noise calibrated to the honest
    # survivors of the smallest cohort (51 members, threshold 27, 26 honest): noise/signal 0.98 at epsilon 8
    base = ('[http]\nplaintext = true\n[model]\nname = "logistic"\n[server]\nvariance_penalty = 0.0\n'
            'buffer_size = 100\n[privacy]\nunit = "user"\n')
    with pytest.raises(ConfigError, match="trains 650 .* name fewer \\[deploy\\] trainable_layers"):
        build_task(parse_server_config(base + "user_noise_ratio = 0.9\n", base_dir=tmp_path))
    assert build_task(parse_server_config(base + "user_noise_ratio = 1.0\n", base_dir=tmp_path)).dim == 650
