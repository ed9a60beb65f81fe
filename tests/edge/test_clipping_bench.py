"""``python -m ftte.bench.clipping_memory`` end to end (real measurements, real search)."""

from __future__ import annotations

import json

from ftte.bench.clipping_memory import main


def test_clipping_bench_reports_both_modes_and_the_auto_search(capsys) -> None:
    assert main(["--model", "mlp", "--batch-size", "16", "--heads", "2", "--budget", "300000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {(r["plan"], r["clipping"]): r for r in out["rows"]}
    assert set(rows) == {(p, m) for p in ("full", "head1", "head2") for m in ("per_sample", "ghost")}
    # an all-Linear model: ghost clipping never holds per-sample gradients and needs less memory
    for plan in ("full", "head2"):
        assert rows[(plan, "ghost")]["measured_bytes"] < rows[(plan, "per_sample")]["measured_bytes"]
        assert rows[(plan, "ghost")]["per_sample_gradient_bytes"] == 0
    assert max(out["max_abs_estimate_error"].values()) <= 0.15
    auto, per = out["search"]["auto"], out["search"]["per_sample"]
    assert auto["clipping"] == "ghost" and auto["measured_bytes"] <= 300_000
    assert auto["trainable_coordinates"] > per["trainable_coordinates"]
