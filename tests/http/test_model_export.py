"""``ftte export``: the newest version in the state file, as a file PyTorch loads, that scores as the server does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ftte.edge.plan import subset_vector
from ftte.pipeline.deploy_config import load_server_config
from ftte.pipeline.deploy_task import build_task
from ftte.pipeline.evaluation import Evaluator, evaluate
from ftte.pipeline.journal import CohortCommit, Database
from ftte.pipeline.model_export import load_model
from ftte.protocol.features import standardise

from ftte import cli


@pytest.fixture()
def deployment(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["deploy", "init", "dep", "--devices", "3"]) == 0
    capsys.readouterr()
    return tmp_path / "dep"


def test_export_writes_the_newest_version_and_it_scores_like_the_server(deployment, tmp_path, capsys):
    settings = load_server_config(deployment / "server.toml")
    task = build_task(settings)
    assert cli.main(["export", "--config", str(deployment / "server.toml"), "--out", str(tmp_path / "m.pt")]) == 2
    assert "state file not found" in capsys.readouterr().err  # nothing to export before the first start
    db = Database(settings.path(settings.deploy.state), settings.path(settings.deploy.ledger_key))
    db.open()
    rng = np.random.default_rng(0)
    newest = task.initial_subset + rng.normal(0, 0.1, task.initial_subset.shape)
    try:
        db.call_sync(db.commit_initial, task.initial_subset, task.plan.plan_id, "{}")
        db.call_sync(db.commit_cohort, CohortCommit(
            version=1, elapsed_s=1.0, weights=newest, velocity=None, reference_variance=None,
            record={"cohort_id": "c-1", "close_version": 0, "applied_version": 1},
            history_row={"version": 1, "elapsed_s": 1.0}, rounds=()))
    finally:
        db.close()
    out = tmp_path / "model.pt"
    assert cli.main(["export", "--config", str(deployment / "server.toml"), "--out", str(out)]) == 0
    assert '"version": 1' in capsys.readouterr().out
    doc = torch.load(out, weights_only=True)
    assert doc["version"] == 1 and doc["model_name"] == "logistic" and doc["input_shape"] == [64]
    model, info = load_model(out)
    np.testing.assert_allclose(subset_vector(model, task.plan), newest.astype(np.float32), rtol=0, atol=0)
    with np.load(deployment / "data" / "test.npz") as data:
        x = standardise(data["x"], info["feature_mean"].numpy(), info["feature_std"].numpy())
        y = data["y"]
    server_acc, server_loss = Evaluator(task.model, task.plan, x, y)(newest)
    acc, loss = evaluate(model, x, y)
    assert (acc, loss) == pytest.approx((server_acc, server_loss), abs=1e-6)


def test_export_refuses_a_state_file_of_another_plan(deployment, tmp_path, capsys):
    settings = load_server_config(deployment / "server.toml")
    task = build_task(settings)
    other = tmp_path / "other.db"
    (tmp_path / "k").mkdir()
    db = Database(other, tmp_path / "k" / "ledger.key")
    db.open()
    try:
        db.call_sync(db.commit_initial, task.initial_subset, "plan-somethingelse", "{}")
    finally:
        db.close()
    assert cli.main(["export", "--config", str(deployment / "server.toml"), "--out", str(tmp_path / "m.pt"),
                     "--state", str(other)]) == 2
    assert "belongs to plan plan-somethingelse" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()
