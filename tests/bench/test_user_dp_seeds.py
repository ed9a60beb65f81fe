"""The over-seeds judge of the user-level goal reads real run folders (config + history) and
compares each private run with the best reference of its own seed."""

import json

import pytest

from ftte.bench import user_dp_seeds as uds
from ftte.pipeline.report import write_history_csv


def _run(folder, seed, accs, horizon=450.0, times=None):
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(f"[run]\nseed = {seed}\nmax_virtual_time_s = {horizon}\n")
    times = times or [10.0 * (i + 1) for i in range(len(accs))]
    rows = [{"version": i + 1, "virtual_time_s": t, "accuracy": a, "loss": 1.0, "cohort_size": 10,
             "mean_staleness": 0.0} for i, (t, a) in enumerate(zip(times, accs))]
    write_history_csv(folder / "history.csv", rows)
    return folder


def test_gap_per_seed_against_the_best_reference_and_at_equal_versions(tmp_path):
    # seed 0: private 4 evaluations at 0.4; references: 0.5 flat and one rising to 0.9 after 4 evaluations
    p0 = _run(tmp_path / "p0", 0, [0.4] * 4)
    flat = _run(tmp_path / "flat0", 0, [0.5] * 6)
    rising = _run(tmp_path / "rise0", 0, [0.3, 0.3, 0.3, 0.3, 0.9, 0.9])
    p1 = _run(tmp_path / "p1", 1, [0.2, 0.6])
    r1 = _run(tmp_path / "r1", 1, [0.6, 0.7])
    rows = uds.seed_gaps([uds.read_run(p) for p in (p1, p0)], [uds.read_run(r) for r in (flat, rising, r1)],
                         window=2)
    assert [r.seed for r in rows] == [0, 1]
    s0, s1 = rows
    assert s0.reference == "rise0" and s0.reference_final == pytest.approx(0.9)
    assert s0.gap == pytest.approx(0.5)
    # at the private run's last 2 evaluations (indices 2, 3) the rising reference was at 0.3, the flat one 0.5
    assert s0.reference_at_equal_versions == "flat0"
    assert s0.at_equal_versions == pytest.approx(0.5) and s0.gap_at_equal_versions == pytest.approx(0.1)
    # seed 1's reference made as many evaluations: at equal versions it is its final
    assert s1.gap == pytest.approx(0.25) and s1.gap_at_equal_versions == pytest.approx(0.25)
    s = uds.summary(rows)
    assert s["mean_gap"] == pytest.approx(0.375) and s["within_goal"] == 0 and not s["goal_met_on_mean"]
    assert s["mean_gap_at_equal_versions"] == pytest.approx(0.175)


def test_a_reference_with_fewer_evaluations_counts_with_its_own_final_window(tmp_path):
    p = _run(tmp_path / "p", 0, [0.1, 0.2, 0.3, 0.4])
    short = _run(tmp_path / "short", 0, [0.6, 0.7])
    (row,) = uds.seed_gaps([uds.read_run(p)], [uds.read_run(short)], window=2)
    assert row.at_equal_versions == pytest.approx(0.65) and row.gap_at_equal_versions == pytest.approx(0.3)


def test_only_evaluations_up_to_the_horizon_count(tmp_path):
    p = _run(tmp_path / "p", 0, [0.5, 0.5, 0.1], horizon=25.0)  # the third evaluation (t=30) is past the horizon
    r = _run(tmp_path / "r", 0, [0.55, 0.55])
    (row,) = uds.seed_gaps([uds.read_run(p)], [uds.read_run(r)], window=10)
    assert row.private_final == pytest.approx(0.5) and row.private_evaluations == 2
    assert row.gap == pytest.approx(0.05) and uds.summary([row])["goal_met_on_mean"]


def test_bad_inputs_are_refused_by_name(tmp_path):
    p = uds.read_run(_run(tmp_path / "p", 3, [0.5]))
    other = uds.read_run(_run(tmp_path / "q", 3, [0.5]))
    with pytest.raises(ValueError, match="two private runs for seed 3"):
        uds.seed_gaps([p, other], [p])
    with pytest.raises(ValueError, match="seed 3 .* has no reference run"):
        uds.seed_gaps([p], [])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.toml is missing"):
        uds.read_run(tmp_path / "empty")


def test_command_prints_the_table_and_json(tmp_path, capsys):
    p = _run(tmp_path / "p", 0, [0.4, 0.4])
    r = _run(tmp_path / "r", 0, [0.6, 0.6])
    uds.main(["--private", str(p), "--reference", str(r)])
    out = capsys.readouterr().out
    assert "| 0 | 0.4000 | 2 | r | 0.6000 | +0.2000 | r | 0.6000 | +0.2000 |" in out and "MISSED" in out
    uds.main(["--private", str(p), "--reference", str(r), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["mean_gap"] == pytest.approx(0.2) and doc["rows"][0]["reference"] == "r"
    uds.main(["--private", str(p), "--reference", str(r), "--reference-label", "central", "--goal", "0.3"])
    out = capsys.readouterr().out
    assert "best central" in out and "(met: the goal is at most +0.30)" in out
    with pytest.raises(SystemExit):
        uds.main(["--private", str(tmp_path / "nope"), "--reference", str(r)])
