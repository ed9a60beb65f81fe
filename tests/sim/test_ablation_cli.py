"""`ftte bench ablation` on the quick preset: three ftte variants, read as the comparison reads runs."""

from __future__ import annotations

import json

from ftte.cli import main as cli_main

SMALL = ["--preset", "digits", "--set", "fleet.devices=10", "--set", "model.name=logistic", "--set",
         "server.buffer_size=4", "--set", "train.batch_size=4", "--set", "run.max_versions=4", "--quiet", "--json"]


def test_ablation_runs_every_variant_and_reports_smoothed_figures(tmp_path, capsys):
    out = tmp_path / "abl"
    assert cli_main(["bench", "ablation", "--out", str(out), *SMALL]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["runs"]) == {"age_and_variance", "age_only", "secagg_off"}
    for run in report["runs"].values():
        assert run["versions"] == 4 and run["final_accuracy_mean10"] is not None
    runs = report["runs"]
    assert report["secagg_upload_ratio"] == (runs["age_and_variance"]["bytes_up_per_update"]
                                             / runs["secagg_off"]["bytes_up_per_update"])
    assert runs["secagg_off"]["bytes_up_per_update"] != runs["age_and_variance"]["bytes_up_per_update"]
    assert report["variance_term_accuracy_gain_mean10"] == (
        report["runs"]["age_and_variance"]["final_accuracy_mean10"] - report["runs"]["age_only"]["final_accuracy_mean10"])
    assert json.loads((out / "ablation.json").read_text()) == report
