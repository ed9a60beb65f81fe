"""The deployment's global model as a file PyTorch loads: ``ftte export`` writes it, :func:`load_model` reads it.

The file is ``torch.save`` of a plain dictionary (loadable with ``torch.load(path,
weights_only=True)``, so opening it runs no pickled code):

- ``format``: ``"ftte-model/1"``;
- ``model_name``, ``model_kwargs``: the bundled architecture and its arguments;
- ``input_shape``, ``num_classes``, ``plan_id``, ``version``;
- ``state_dict``: every parameter and buffer, the trained subset at ``version`` included;
- ``feature_mean``, ``feature_std``: the standardisation the model expects (empty: none).

Rebuild it with :func:`load_model`, or by hand: ``make_dp_compatible(build_model(name,
**kwargs))`` from :mod:`ftte.edge.models`, then ``load_state_dict``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "ftte-model/1"


def read_latest(state_path: Path) -> tuple[int, np.ndarray, str | None]:
    """(version, plan weights, plan id) of the newest version in a server state file, read-only
    (safe while the server runs: SQLite WAL readers never block the writer)."""
    if not state_path.is_file():
        raise FileNotFoundError(f"state file not found: {state_path}")
    conn = sqlite3.connect(f"{state_path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT version, weights FROM server_versions ORDER BY version DESC LIMIT 1").fetchone()
        meta = conn.execute("SELECT value FROM server_meta WHERE key = 'deploy_plan_id'").fetchone()
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"{state_path} is not an ftte server state file: {exc}") from None
    finally:
        conn.close()
    if row is None:
        raise ValueError(f"{state_path} holds no model version yet (start the server once)")
    return int(row[0]), np.frombuffer(row[1], dtype="<f8").copy(), None if meta is None else meta[0]


def export_model(config: Path, out: Path, state: Path | None = None) -> dict[str, Any]:
    """Write the current global model of the deployment ``config`` describes to ``out``.

    ``state`` overrides ``[deploy] state`` (a copy of the state file, say). The plan the
    configuration builds must be the one the state file was made with.
    """
    from ftte.edge.plan import apply_subset_vector
    from ftte.pipeline.deploy_config import load_server_config
    from ftte.pipeline.deploy_task import build_task

    settings = load_server_config(config)
    task = build_task(settings)
    path = state if state is not None else settings.path(settings.deploy.state)
    version, weights, plan_id = read_latest(path)
    if plan_id is not None and plan_id != task.plan.plan_id:
        raise ValueError(f"{path} belongs to plan {plan_id}, {config} builds plan {task.plan.plan_id}")
    if weights.shape != (task.plan.num_coordinates,):
        raise ValueError(f"{path}: version {version} has {weights.size} values, the plan {task.plan.num_coordinates}")
    model = task.model
    with torch.no_grad():
        apply_subset_vector(model, task.plan, weights.astype(np.float32))
    doc = {
        "format": FORMAT,
        "model_name": settings.run.model.name,
        "model_kwargs": dict(task.kwargs),
        "input_shape": list(settings.deploy.input_shape),
        "num_classes": int(settings.deploy.num_classes),
        "plan_id": task.plan.plan_id,
        "version": version,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "feature_mean": torch.as_tensor(np.asarray(task.feature_mean, dtype=np.float32)),
        "feature_std": torch.as_tensor(np.asarray(task.feature_std, dtype=np.float32)),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(doc, tmp)
    tmp.replace(out)
    return {"out": str(out), "version": version, "model": doc["model_name"], "plan_id": doc["plan_id"]}


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, the file's other fields) from a file :func:`export_model` wrote."""
    from ftte.edge.models import build_registered_model, make_dp_compatible

    doc = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not an {FORMAT} file")
    model = make_dp_compatible(build_registered_model(doc["model_name"], doc["model_kwargs"]))
    model.load_state_dict(doc["state_dict"])
    model.eval()
    return model, {k: v for k, v in doc.items() if k != "state_dict"}
