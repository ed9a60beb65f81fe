"""The user-level DP utility study (``python -m ftte.bench.user_dp_study``) runs a grid end to end and
writes JSON that agrees with itself: one record per run of the grid, accuracies in range, the privacy
figures of each run matching its setting, and goals recomputable from the records."""

from __future__ import annotations

import json
import math

import pytest

from ftte.bench.user_dp_study import VARIANTS, RunSpec, StudySettings, goals, grid, run_config, run_study


def _tiny(**kw) -> StudySettings:
    base = dict(devices=16, buffer=8, neighbors=4, versions=2, horizon_s=14400.0, epsilons=(8.0,),
                preset="digits", model="logistic", participations=2,
                extra={"train.batch_size": 4, "fleet.stragglers": 0.5,
                       # cohorts of 8: the plan rule would admit no plan; the grid is what these tests check
                       "privacy.user_noise_ratio": math.inf})
    base.update(kw)
    return StudySettings(**base)


def test_a_tiny_study_writes_one_consistent_record_per_run(tmp_path):
    settings = _tiny()
    doc = run_study(settings, tmp_path, quiet=True, figures=False)
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["complete"] and saved["runs"] == json.loads(json.dumps(doc["runs"], default=str))
    runs = saved["runs"]
    # the grid: non-private per variant (ftte-memory has no other run), then distributed and central at
    # epsilon 8 for ftte and fedbuff
    assert [r["name"] for r in runs] == [s.name for s in grid(settings)] == [
        "ftte-nonprivate", "fedbuff-nonprivate", "ftte-memory-nonprivate", "ftte-distributed-eps8", "fedbuff-distributed-eps8",
        "ftte-server-eps8", "fedbuff-server-eps8"]
    for r in runs:
        assert r["strategy"] == VARIANTS[r["variant"]]["strategy"]
        assert 1 <= r["versions"] <= settings.versions
        assert 1 <= r["evaluations"] <= r["versions"]
        assert 0.0 <= r["final_accuracy"] <= r["best_accuracy"] <= 1.0
        assert r["virtual_time_s"] <= settings.horizon_s
        if r["noise"] == "none":
            assert r["epsilon_target"] is None and r["epsilon_reached"] is None and r["noise_multiplier"] is None
        else:
            assert r["delta"] == settings.delta
            assert 0.0 < r["epsilon_reached"] <= r["epsilon_target"] + 1e-9
            assert r["noise_multiplier"] > 0
    # the full-model variant trains every coordinate the subset variant's plan could
    by = {r["name"]: r for r in runs}
    assert by["fedbuff-distributed-eps8"]["trainable_coordinates"] >= by["ftte-distributed-eps8"]["trainable_coordinates"]
    # the goals are the records' own differences
    g = saved["goals"]
    gap = by["ftte-nonprivate"]["final_accuracy"] - by["ftte-distributed-eps8"]["final_accuracy"]
    assert g["ftte_eps8_within_10_points_of_nonprivate"]["gap"] == pytest.approx(gap)
    assert g["ftte_eps8_within_10_points_of_nonprivate"]["met"] == (gap <= 0.10)
    assert (tmp_path / "table.md").read_text().count("\n| ") == len(runs)  # one row per run under the header


def test_every_run_shares_seed_fleet_and_horizon_and_differs_only_in_its_setting():
    settings = _tiny()
    cfgs = {s.name: run_config(settings, s) for s in grid(settings)}
    for cfg in cfgs.values():
        assert cfg.run.seed == settings.seed and cfg.run.max_virtual_time_s == settings.horizon_s
        assert cfg.fleet.devices == 16 and cfg.server.buffer_size == 8 and cfg.secagg.graph == "ring"
        assert cfg.server.variance_penalty == 0.0
        assert all(c.dropout.share == 0.0 for c in cfg.fleet.device_classes())
    assert not cfgs["ftte-nonprivate"].privacy.enabled
    dist, central = cfgs["ftte-distributed-eps8"].privacy, cfgs["fedbuff-server-eps8"].privacy
    assert dist.user_level and dist.user_noise == "distributed" and central.user_noise == "server"
    assert dist.user_epsilon == central.user_epsilon == 8.0 and dist.user_delta == 1e-6
    tuned = _tiny(clip=2.0, device_lr=0.1, server_lr=0.5, noise_ratio=2.0, extra={},
                  device_lrs={"ftte-private": 3.0, "fedbuff": 1.0})
    private = run_config(tuned, grid(settings)[3])  # ftte-distributed-eps8
    assert private.secagg.clip == 2.0 and private.server.lr == 0.5 and private.privacy.user_noise_ratio == 2.0
    lrs = {s.name: run_config(tuned, s).train.lr for s in grid(settings)}
    assert lrs["ftte-distributed-eps8"] == lrs["ftte-server-eps8"] == 3.0
    assert lrs["ftte-nonprivate"] == lrs["ftte-memory-nonprivate"] == 0.1  # the plain --device-lr
    assert lrs["fedbuff-nonprivate"] == lrs["fedbuff-server-eps8"] == 1.0


def test_ftte_nonprivate_trains_the_plan_of_its_private_run_at_epsilon_8():
    """The goal's comparison: non-private ftte is capped at the coordinates the user-level rule admits for
    ftte's distributed run at epsilon 8; ftte-memory and fedbuff are not capped."""
    from ftte.pipeline.strategies import user_coordinate_cap

    finite = _tiny(epsilons=(2.0, 8.0), extra={"train.batch_size": 4, "fleet.stragglers": 0.5})
    cfgs = {s.name: run_config(finite, s) for s in grid(finite)}
    cap = user_coordinate_cap(cfgs["ftte-distributed-eps8"])
    assert cap is not None and cap != user_coordinate_cap(cfgs["ftte-distributed-eps2"])
    assert cfgs["ftte-nonprivate"].train.max_coordinates == cap
    assert cfgs["ftte-memory-nonprivate"].train.max_coordinates == 0 == cfgs["fedbuff-nonprivate"].train.max_coordinates
    assert not cfgs["ftte-memory-nonprivate"].privacy.enabled


def test_threshold_momentum_and_participations_reach_the_config_and_the_plan_rule():
    """The study's levers are config overrides: a higher threshold lowers the distributed noise (the cap grows),
    more participations raise it (the cap shrinks), momentum reaches the server optimizer; 0 / None keep the
    config's."""
    from ftte.pipeline.strategies import user_coordinate_cap

    finite = dict(extra={"train.batch_size": 4, "fleet.stragglers": 0.5})
    base = _tiny(**finite)
    spec = grid(base)[3]  # ftte-distributed-eps8
    assert spec.name == "ftte-distributed-eps8"
    plain = run_config(base, spec)
    assert plain.secagg.threshold == 0 and plain.server.momentum == 0.0 and plain.privacy.user_participations == 2
    tuned = run_config(_tiny(threshold=7, momentum=0.9, participations=4, **finite), spec)
    assert tuned.secagg.threshold == 7 and tuned.server.momentum == 0.9 and tuned.privacy.user_participations == 4
    cap = user_coordinate_cap(plain)
    assert user_coordinate_cap(run_config(_tiny(threshold=7, **finite), spec)) > cap  # T = 7 of 8 instead of 5
    assert user_coordinate_cap(run_config(_tiny(participations=4, **finite), spec)) < cap
    # non-private ftte follows its private run's plan under the same levers
    nonprivate = run_config(_tiny(threshold=7, **finite), grid(base)[0])
    assert nonprivate.train.max_coordinates == user_coordinate_cap(run_config(_tiny(threshold=7, **finite), spec))


def test_max_coordinates_holds_ftte_to_one_plan_in_every_run():
    """--max-coordinates caps every ftte run, private (both noises) and non-private, below the rule's caps, so
    they train the same plan; the full model and the memory-only plan keep theirs."""
    finite = _tiny(epsilons=(2.0, 8.0), max_coordinates=12, extra={"train.batch_size": 4, "fleet.stragglers": 0.5})
    cfgs = {s.name: run_config(finite, s) for s in grid(finite)}
    ftte_runs = [name for name in cfgs if name.startswith("ftte-") and not name.startswith("ftte-memory")]
    assert {"ftte-nonprivate", "ftte-distributed-eps8", "ftte-server-eps2"} <= set(ftte_runs)
    assert all(cfgs[name].train.max_coordinates == 12 for name in ftte_runs)
    assert cfgs["ftte-memory-nonprivate"].train.max_coordinates == 0 == cfgs["fedbuff-nonprivate"].train.max_coordinates
    assert cfgs["fedbuff-distributed-eps8"].train.max_coordinates == 0


def _rec(variant: str, noise: str, eps: float | None, acc: float) -> dict:
    return {"variant": variant, "noise": noise, "epsilon_target": eps, "final_accuracy": acc}


def test_goals_are_met_or_missed_by_their_thresholds():
    s = StudySettings(epsilons=(8.0,))
    runs = [_rec("ftte", "none", None, 0.90), _rec("fedbuff", "none", None, 0.95),
            _rec("ftte", "distributed", 8.0, 0.81), _rec("fedbuff", "distributed", 8.0, 0.70),
            _rec("ftte", "server", 8.0, 0.815), _rec("fedbuff", "server", 8.0, 0.72)]
    g = goals(runs, s)
    assert g["ftte_eps8_within_10_points_of_nonprivate"]["met"] is True
    assert g["ftte_ahead_of_full_model_at_every_epsilon"]["met"] is True
    assert g["distributed_within_1_point_of_central"]["met"] is False  # fedbuff: central 2 points ahead
    runs[2] = _rec("ftte", "distributed", 8.0, 0.79)  # 11 points below non-private
    g = goals(runs, s)
    assert g["ftte_eps8_within_10_points_of_nonprivate"]["met"] is False
    assert goals(runs[:2], s)["ftte_ahead_of_full_model_at_every_epsilon"]["met"] is None  # not measured


def test_with_a_learning_rate_sweep_the_goal_is_judged_against_the_best_nonprivate_run():
    """A weak non-private reference must not make the gap look small: the best of the sweep counts."""
    s = StudySettings(epsilons=(8.0,), nonprivate_lrs=(0.1, 1.0))
    assert [spec.name for spec in grid(s)][:2] == ["ftte-nonprivate-lr0.1", "ftte-nonprivate-lr1"]
    assert run_config(s, grid(s)[0]).train.lr == 0.1 and run_config(s, grid(s)[1]).train.lr == 1.0
    runs = [dict(_rec("ftte", "none", None, 0.60), device_lr=0.1), dict(_rec("ftte", "none", None, 0.30), device_lr=1.0),
            dict(_rec("fedbuff", "none", None, 0.75), device_lr=0.1), _rec("ftte", "distributed", 8.0, 0.55)]
    g = goals(runs, s)["ftte_eps8_within_10_points_of_nonprivate"]
    assert g["met"] is True and g["gap"] == pytest.approx(0.05) and g["reference"]["device_lr"] == 0.1
    assert g["met_any"] is False and g["gap_any"] == pytest.approx(0.20) and g["reference_any"]["variant"] == "fedbuff"
    with pytest.raises(ValueError, match="learning rates"):
        StudySettings(nonprivate_lrs=(0.0,))


def test_settings_refuse_an_impossible_grid():
    with pytest.raises(ValueError, match="buffer"):
        StudySettings(devices=10, buffer=20)
    with pytest.raises(ValueError, match="noise"):
        StudySettings(noises=("local",))
    assert RunSpec("ftte", "none", None).name == "ftte-nonprivate"
    with pytest.raises(ValueError, match="threshold"):
        StudySettings(buffer=100, threshold=101)
    with pytest.raises(ValueError, match="participations"):
        StudySettings(participations=0)
