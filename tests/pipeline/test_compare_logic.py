"""How ``ftte compare`` reads runs: smoothed curves, targets, final accuracy, memory flags,
verdicts and the table. Pure functions on hand-made histories (no simulation)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftte.pipeline.compare_cli import (
    CompareSettings, chance_warning, common_targets, format_table, memory_flags, strategy_figures, target_key,
    target_setter, verdicts,
)
from ftte.pipeline.config import shorthand_classes
from ftte.pipeline.report import final_accuracy_mean, smoothed_curve, smoothed_time_to_target, time_to_target


def hist(points):
    return [{"version": i + 1, "virtual_time_s": float(t), "accuracy": a, "loss": None, "cohort_size": 1,
             "mean_staleness": 0.0} for i, (t, a) in enumerate(points)]


def flat(points):
    return [x for p in points for x in p]


def test_smoothed_curve_is_a_trailing_mean_over_full_windows():
    h = hist([(10, 0.1), (20, 0.4), (30, 0.7), (40, 0.1)])
    assert flat(smoothed_curve(h, 3)) == pytest.approx([30.0, 0.4, 40.0, 0.4])
    assert smoothed_curve(h[:2], 3) == []  # fewer evaluations than the window: no point at all
    assert smoothed_curve(h, 1) == [(10.0, 0.1), (20.0, 0.4), (30.0, 0.7), (40.0, 0.1)]


def test_one_lucky_evaluation_does_not_reach_a_target_on_the_smoothed_curve():
    h = hist([(10, 0.2), (20, 0.9), (30, 0.2), (40, 0.6), (50, 0.65), (60, 0.7)])
    assert time_to_target(h, 0.6) == 20.0  # the raw curve: the spike decides
    assert smoothed_time_to_target(h, 0.6, 3) == 60.0  # mean of 0.6, 0.65, 0.7 is the first >= 0.6
    assert smoothed_time_to_target(h, 0.95, 3) is None


def test_horizon_cuts_the_curve_and_the_final_mean():
    h = hist([(t, 0.1 * i) for i, t in enumerate(range(100, 1600, 100), start=1)])  # 15 evaluations, 0.1 .. 1.5
    assert final_accuracy_mean(h, 10) == pytest.approx(math.fsum(0.1 * i for i in range(6, 16)) / 10)
    assert final_accuracy_mean(h, 10, horizon_s=500) == pytest.approx((0.1 + 0.2 + 0.3 + 0.4 + 0.5) / 5)
    assert smoothed_time_to_target(h, 0.55, 3, horizon_s=600) is None  # would be reached at 700 s
    assert smoothed_time_to_target(h, 0.55, 3) == 700.0
    assert final_accuracy_mean([], 10) is None


def test_unevaluated_versions_are_skipped():
    h = hist([(10, 0.5), (20, None), (30, float("nan")), (40, 0.7), (50, 0.9)])
    assert flat(smoothed_curve(h, 3)) == pytest.approx([50.0, 0.7])
    assert final_accuracy_mean(h, 2) == pytest.approx(0.8)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40), st.floats(0.0, 1.0), st.integers(1, 5))
def test_smoothed_time_is_never_before_the_raw_time(accs, target, window):
    """A window's mean reaches the target only if one of its evaluations does, at or before its end."""
    h = hist([(10 * (i + 1), a) for i, a in enumerate(accs)])
    smooth, raw = smoothed_time_to_target(h, target, window), time_to_target(h, target)
    if smooth is not None:
        assert raw is not None and raw <= smooth


def test_targets_are_fractions_of_the_best_accuracy_every_strategy_reaches():
    histories = {
        "ftte": hist([(10, 0.5), (20, 0.8), (30, 0.9), (40, 0.9)]),      # smoothed peak 0.8667
        "fedbuff": hist([(10, 0.3), (20, 0.6), (30, 0.6), (40, 0.6)]),   # smoothed peak 0.6
        "fedavg": hist([(10, 0.4), (20, 0.7), (30, 0.7)]),               # smoothed peak 0.6
        "fedavg_fit": hist([(10, 0.1), (20, 0.1), (30, 0.1)]),           # not among those that set targets
    }
    best, targets = common_targets(histories, (0.5, 0.75, 0.9), window=3, horizon_s=None)
    assert best == pytest.approx(0.6)
    assert targets == [0.3, 0.45, 0.54]
    for name in ("ftte", "fedbuff", "fedavg"):  # every target-setter reaches every target
        assert all(smoothed_time_to_target(histories[name], t, 3) is not None for t in targets)
    # a strategy with too few evaluations for one window: no common target at all
    assert common_targets({**histories, "fedavg": hist([(10, 0.9)])}, (0.5,), window=3, horizon_s=None) == (None, [])


def test_targets_at_chance_are_flagged_naming_the_strategy_that_set_them():
    histories = {
        "ftte": hist([(10, 0.5), (20, 0.8), (30, 0.9)]),
        "fedbuff": hist([(10, 0.1), (20, 0.12), (30, 0.11)]),  # smoothed peak 0.11: sets the common best
        "fedavg": hist([(10, 0.4), (20, 0.7), (30, 0.7)]),
    }
    best, targets = common_targets(histories, (0.5, 0.75, 0.9), window=3, horizon_s=None)
    setter = target_setter(histories, window=3, horizon_s=None)
    assert setter == "fedbuff"
    report = {"targets_at_chance": [target_key(t) for t in targets if t <= 0.1], "majority_class_rate": 0.1,
              "best_common_accuracy": best, "best_common_set_by": setter}
    assert report["targets_at_chance"] == [target_key(targets[0]), target_key(targets[1]), target_key(targets[2])]
    line = chance_warning(report)
    assert line is not None and "fedbuff" in line and "0.1000" in line
    assert chance_warning({**report, "targets_at_chance": []}) is None


def test_memory_flags_name_the_classes_a_strategy_could_not_run_on():
    classes = shorthand_classes(0.9, 8 << 20)  # fast 64 MiB, straggler 8 MiB
    assert memory_flags(16_000_000, classes) == ["straggler"]
    assert memory_flags(4_000_000, classes) == []
    assert memory_flags(100 << 20, classes) == ["fast", "straggler"]
    assert memory_flags(None, classes) == []


def _figures(name, points, peak, up=None, full=4000):
    summary = {"strategy": name, "final_accuracy": points[-1][1], "peak_client_memory_bytes": peak,
               "bytes_up_per_update": up or full, "float32_full_update_bytes": full, "devices_out_of_budget": 3}
    return strategy_figures(summary, hist(points), [0.3, 0.5], CompareSettings(), 1000.0,
                            shorthand_classes(0.9, 8 << 20))


def test_strategy_figures_replace_last_accuracy_with_the_mean_and_read_every_target():
    f = _figures("ftte", [(10, 0.2), (20, 0.4), (30, 0.6), (40, 0.6), (2000, 0.99)], 3_000_000)
    assert f["last_accuracy"] == 0.99  # the run's own last evaluation is kept apart ...
    assert f["final_accuracy"] == pytest.approx((0.2 + 0.4 + 0.6 + 0.6) / 4)  # ... the one after the horizon is out
    assert f["targets"] == {"0.3000": 30.0, "0.5000": 40.0}
    assert f["time_to_target_s"] == 40.0 and f["primary_target"] == 0.5
    assert f["memory_exceeds_classes"] == []
    assert target_key(0.5) == "0.5000"


def test_verdicts_check_each_goal_and_say_by_how_much():
    ftte = _figures("ftte", [(10, 0.3), (20, 0.5), (30, 0.7), (40, 0.7)], 3_000_000, up=1000)
    fedavg = _figures("fedavg", [(100, 0.3), (200, 0.5), (300, 0.7), (400, 0.7)], 16_000_000)
    fedbuff = _figures("fedbuff", [(50, 0.3), (60, 0.5), (70, 0.7), (80, 0.8)], 16_000_000)
    v = {x.goal.split()[1]: x for x in verdicts({"ftte": ftte, "fedavg": fedavg, "fedbuff": fedbuff}, 1000.0)}
    assert v["time"].met is True and "0.3000: 0.10x" in v["time"].detail  # 30 s against 300 s
    assert v["final"].met is False  # fedbuff ends higher
    assert v["client"].met is True and "0.188x" in v["client"].detail
    assert v["upload"].met is True and v["upload"].detail.startswith("0.250x")  # 1000 / 4000 bytes


def test_upload_and_time_verdicts_at_their_thresholds():
    ftte = _figures("ftte", [(10, 0.3), (20, 0.5), (30, 0.7), (40, 0.7)], 3_000_000, up=1240)
    slow = _figures("fedavg", [(100, 0.3), (200, 0.5), (300, 0.7), (400, 0.7)], 16_000_000)
    v = {x.goal.split()[1]: x for x in verdicts({"ftte": ftte, "fedavg": slow}, 1000.0)}
    assert v["upload"].met is True and v["upload"].detail.startswith("0.310x")  # exactly at the goal
    over = _figures("ftte", [(10, 0.3), (20, 0.5), (30, 0.7), (40, 0.7)], 3_000_000, up=1300)
    assert [x.met for x in verdicts({"ftte": over}, 1000.0) if x.goal.split()[1] == "upload"] == [False]
    assert v["final"].met is None  # fedbuff missing: not measurable, not a pass
    # fedavg never reaching a target within the horizon: the ratio is bounded by t / horizon
    never = _figures("fedavg", [(100, 0.1), (200, 0.1), (300, 0.1)], 16_000_000)
    v = {x.goal.split()[1]: x for x in verdicts({"ftte": ftte, "fedavg": never}, 1000.0)}
    assert v["time"].met is True and "<0.03x (fedavg never)" in v["time"].detail
    v = {x.goal.split()[1]: x for x in verdicts({"ftte": ftte, "fedavg": never}, 100.0)}
    assert v["time"].met is False  # 30 s of a 100 s horizon: the bound 0.3x says nothing better


def test_table_has_one_row_per_strategy_with_every_column():
    ftte = _figures("ftte", [(10, 0.3), (20, 0.5), (30, 0.7), (40, 0.7)], 3_000_000, up=1000)
    fedavg = _figures("fedavg", [(100, 0.1), (200, 0.1), (300, 0.1)], 16_000_000)
    ftte["learning_rates"] = {"server": 2.0, "device": 0.5}
    text = format_table({"ftte": ftte, "fedavg": fedavg}, [0.3, 0.5])
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].split()[:3] == ["strategy", "t@0.300", "(s)"]
    # the first full window (0.3, 0.5, 0.7) has mean 0.5: both targets at 30 s
    assert lines[2].split() == ["ftte", "30", "30", "0.5500", "3.00", "1.0", "3", "2.0/0.5", "—"]
    assert lines[3].split()[:3] == ["fedavg", "—", "—"] and lines[3].split()[-1] == "straggler"


def test_settings_refuse_tuning_on_the_reported_seed():
    with pytest.raises(ValueError, match="another seed"):
        CompareSettings(tune_seed_offset=0)
    with pytest.raises(ValueError, match="fractions"):
        CompareSettings(target_fractions=(0.5, 1.5))


def test_learning_rates_are_reused_from_an_earlier_comparison(tmp_path):
    import json

    from ftte.pipeline.compare_cli import learning_rates_from

    path = tmp_path / "compare.json"
    path.write_text(json.dumps({"strategies": {
        "ftte": {"learning_rates": {"server": 2.0, "device": 0.5, "tuning_seed": 1}},
        "fedavg": {"learning_rates": {"server": 1.0, "device": 1.0, "tuning_seed": 1}},
        "fedbuff": {"learning_rates": {"server": -1.0, "device": 1.0}}}}))
    got = learning_rates_from(path, ["ftte", "fedavg"])
    assert got["ftte"] == {"server": 2.0, "device": 0.5, "tuning_seed": 1, "reused_from": str(path)}
    with pytest.raises(ValueError, match="no learning rates"):
        learning_rates_from(path, ["fedavg_fit"])
    with pytest.raises(ValueError, match="positive"):
        learning_rates_from(path, ["fedbuff"])
