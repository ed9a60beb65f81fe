"""`[train] clipping = "auto"` gives the full-model baselines the same choice as ftte: the DP
clipping mode with the lower estimated peak (so their memory is not overstated against ftte's)."""

from __future__ import annotations

from types import SimpleNamespace

from ftte.edge.memory import MemoryEstimator, TrainingSetup
from ftte.edge.plan import SubsetPlan
from ftte.pipeline.config import load_config
from ftte.pipeline.model_builder import build_global_model
from ftte.pipeline.strategies import cheaper_clipping, strategy_for


def test_auto_gives_the_baselines_the_cheaper_clipping_mode():
    model = build_global_model("cnn28", 0, (1, 28, 28), 10)
    full = SubsetPlan.full(model)
    est = MemoryEstimator(model, (1, 28, 28))
    costs = {m: est.estimate(full, 16, dp=True, optimizer="sgd", clipping=m).peak_bytes for m in ("per_sample", "ghost")}
    expected = min(costs, key=costs.get)
    assert costs["ghost"] != costs["per_sample"]
    assert cheaper_clipping(model, full, TrainingSetup(16, (1, 28, 28), dp=True, optimizer="sgd")) == expected
    data = SimpleNamespace(input_shape=(1, 28, 28), n_classes=10)
    for name in ("fedavg", "fedbuff"):
        cfg = load_config(None).with_overrides(**{"run.strategy": name, "train.clipping": "auto"})
        plan, mode = strategy_for(cfg).choose_plan(model, data, [])
        assert plan.plan_id == full.plan_id and mode == expected
        fixed = cfg.with_overrides(**{"train.clipping": "per_sample"})
        assert strategy_for(fixed).choose_plan(model, data, [])[1] == "per_sample"
