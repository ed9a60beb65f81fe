"""``ftte bench seeds``: several comparisons read together, and refused when they are not the same comparison."""

from __future__ import annotations

import json
import math

import pytest

from ftte.bench.compare_seeds import read_runs, summarise
from ftte.cli import main as cli_main

LRS = {"ftte": (1.0, 1.0), "fedbuff": (1.0, 1.0), "fedavg": (2.0, 0.5)}


def write_run(root, seed, finals, *, lrs=LRS, buffer=10):
    d = root / f"seed{seed}"
    d.mkdir()
    doc = {"horizon_s": 36000.0,
           "config": {"run": {"seed": seed, "strategy": "ftte"}, "server": {"lr": 1.0, "buffer_size": buffer},
                      "train": {"lr": 1.0}},
           "strategies": {n: {"final_accuracy": f, "learning_rates": {"server": lrs[n][0], "device": lrs[n][1]}}
                          for n, f in finals.items()},
           "verdicts": [{"goal": "g", "met": True, "detail": ""}]}
    (d / "compare.json").write_text(json.dumps(doc))
    return d


def test_means_paired_differences_and_the_goal_on_the_means(tmp_path):
    dirs = [write_run(tmp_path, 0, {"ftte": 0.40, "fedbuff": 0.20, "fedavg": 0.44}),
            write_run(tmp_path, 2, {"ftte": 0.50, "fedbuff": 0.25, "fedavg": 0.41}),
            write_run(tmp_path, 3, {"ftte": 0.48, "fedbuff": 0.22, "fedavg": 0.42})]
    s = summarise(read_runs(dirs))
    assert s["seeds"] == [0, 2, 3]
    assert s["final_accuracy"]["ftte"]["mean"] == pytest.approx(0.46)
    assert s["final_accuracy"]["ftte"]["sd"] == pytest.approx(math.sqrt(((0.06) ** 2 + 0.04 ** 2 + 0.02 ** 2) / 2))
    assert s["ftte_minus"]["fedavg"]["values"] == pytest.approx([-0.04, 0.09, 0.06])
    assert s["goal"]["met"] is True and s["goal"]["seeds_met"] == 2
    # the same runs with fedavg ahead on average: the goal is missed
    (tmp_path / "b").mkdir()
    dirs2 = [write_run(tmp_path / "b", 0, {"ftte": 0.40, "fedbuff": 0.2, "fedavg": 0.44}),
             write_run(tmp_path / "b", 1, {"ftte": 0.45, "fedbuff": 0.2, "fedavg": 0.44})]
    assert summarise(read_runs(dirs2))["goal"]["met"] is False


def test_runs_that_are_not_the_same_comparison_are_refused(tmp_path):
    a = write_run(tmp_path, 0, {"ftte": 0.4, "fedbuff": 0.2, "fedavg": 0.4})
    with pytest.raises(ValueError, match="at least two"):
        read_runs([a])
    (tmp_path / "x").mkdir()
    other_cfg = write_run(tmp_path / "x", 1, {"ftte": 0.4, "fedbuff": 0.2, "fedavg": 0.4}, buffer=20)
    with pytest.raises(ValueError, match="configured differently"):
        read_runs([a, other_cfg])
    (tmp_path / "y").mkdir()
    other_lrs = write_run(tmp_path / "y", 1, {"ftte": 0.4, "fedbuff": 0.2, "fedavg": 0.4},
                          lrs={**LRS, "fedavg": (1.0, 1.0)})
    with pytest.raises(ValueError, match="fedavg used other learning rates"):
        read_runs([a, other_lrs])
    (tmp_path / "z").mkdir()
    same_seed = write_run(tmp_path / "z", 0, {"ftte": 0.4, "fedbuff": 0.2, "fedavg": 0.4})
    with pytest.raises(ValueError, match="share a seed"):
        read_runs([a, same_seed])
    (tmp_path / "w").mkdir()
    fewer = write_run(tmp_path / "w", 1, {"ftte": 0.4, "fedavg": 0.4})
    with pytest.raises(ValueError, match="strategies"):
        read_runs([a, fewer])


def test_the_command_prints_the_table_and_refuses_clearly(tmp_path, capsys):
    dirs = [write_run(tmp_path, s, {"ftte": 0.4 + s / 100, "fedbuff": 0.2, "fedavg": 0.402}) for s in (0, 1)]
    assert cli_main(["bench", "seeds", *map(str, dirs)]) == 0
    out = capsys.readouterr().out
    assert "ftte - fedavg" in out and "MET" in out and "on 1 of 2 seeds" in out
    assert cli_main(["bench", "seeds", str(dirs[0]), str(tmp_path / "missing")]) == 2
    assert "not a readable compare.json" in capsys.readouterr().err
