"""Memory estimator against a real measured Opacus step, on every bundled model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ftte.edge.memory import (
    MemoryEstimator,
    TrainingSetup,
    estimate_training_memory,
    measure_training_memory,
    relative_error,
)
from ftte.edge.models import MODELS, build_model, model_input_shape
from ftte.edge.plan import SubsetPlan

TOLERANCE = 0.15


def _plans(name: str) -> dict[str, SubsetPlan]:
    """Full model, last layer, a middle layer onwards, and an odd tensor-level mix."""
    model = build_model(name)
    layers = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    plans = {"full": SubsetPlan.full(model), "last": SubsetPlan.from_layers(model, [layers[-1]])}
    if len(layers) > 2:
        plans["mid+last"] = SubsetPlan.from_layers(model, [layers[len(layers) // 2], layers[-1]])
        plans["bias-first+last-weight"] = SubsetPlan.from_names(model, [f"{layers[0]}.bias", f"{layers[-1]}.weight"])
    else:
        plans["weight-only"] = SubsetPlan.from_names(model, [f"{layers[-1]}.weight"])
    return plans


CASES = [(name, plan_name) for name in sorted(MODELS) for plan_name in _plans(name)]


@pytest.mark.parametrize("dp", [True, False], ids=["dp", "nodp"])
@pytest.mark.parametrize("name, plan_name", CASES)
def test_estimate_within_15_percent_of_measurement(name: str, plan_name: str, dp: bool) -> None:
    model = build_model(name)
    plan = _plans(name)[plan_name]
    setup = TrainingSetup(32, model_input_shape(name), dp=dp)
    measured = measure_training_memory(model, plan, setup)
    estimated = estimate_training_memory(model, plan, setup)
    err = relative_error(estimated.peak_bytes, measured.peak_bytes)
    assert abs(err) <= TOLERANCE, (
        f"{name}/{plan_name}/dp={dp}: estimate {estimated.peak_bytes} vs measured {measured.peak_bytes} "
        f"({err:+.1%}); phases est {estimated.phase_peaks} meas {measured.phase_peaks}"
    )
    # the held-state terms agree too: saved activations are counted the same way
    assert abs(estimated.saved_activation_bytes - measured.saved_activation_bytes) <= 0.15 * max(
        measured.saved_activation_bytes, 4096
    )
    assert measured.peak_bytes >= measured.baseline_bytes + measured.per_sample_gradient_bytes
    assert (measured.per_sample_gradient_bytes > 0) == dp


@pytest.mark.parametrize("name, plan_name", CASES)
def test_ghost_estimate_within_15_percent_of_measurement(name: str, plan_name: str) -> None:
    """Ghost clipping (two backward passes, no held per-sample gradients) is costed as well."""
    model = build_model(name)
    plan = _plans(name)[plan_name]
    setup = TrainingSetup(32, model_input_shape(name), dp=True, clipping="ghost")
    measured = measure_training_memory(model, plan, setup)
    estimated = estimate_training_memory(model, plan, setup)
    err = relative_error(estimated.peak_bytes, measured.peak_bytes)
    assert abs(err) <= TOLERANCE, (
        f"{name}/{plan_name}/ghost: estimate {estimated.peak_bytes} vs measured {measured.peak_bytes} "
        f"({err:+.1%}); phases est {estimated.phase_peaks} meas {measured.phase_peaks}"
    )
    # no per-sample gradient survives to the optimizer step, and the estimate says so
    assert measured.per_sample_gradient_bytes == 0 and estimated.per_sample_gradient_bytes == 0


def test_ghost_clipping_shrinks_linear_heads_but_not_conv_layers() -> None:
    """The trade-off the plan search exploits: ghost norms avoid batch x parameters for
    Linear layers, while convolutions still form per-sample gradients (one layer at a time)
    and the retained graph of the first backward pass costs extra."""
    model = build_model("cnn28")
    head = SubsetPlan.from_layers(model, ["13", "15"])
    conv = SubsetPlan.from_layers(model, ["8", "15"])
    per = TrainingSetup(32, (1, 28, 28), dp=True)
    ghost = TrainingSetup(32, (1, 28, 28), dp=True, clipping="ghost")
    head_per, head_ghost = (measure_training_memory(model, head, s) for s in (per, ghost))
    assert head_ghost.peak_bytes < 0.5 * head_per.peak_bytes
    assert head_per.per_sample_gradient_bytes >= 32 * 4 * head.num_coordinates
    conv_per, conv_ghost = (measure_training_memory(model, conv, s) for s in (per, ghost))
    assert conv_ghost.peak_bytes > conv_per.peak_bytes
    est = MemoryEstimator(model, (1, 28, 28))
    assert est.estimate(head, 32, clipping="ghost").peak_bytes < est.estimate(head, 32).peak_bytes
    assert est.estimate(conv, 32, clipping="ghost").peak_bytes > est.estimate(conv, 32).peak_bytes


@pytest.mark.parametrize(
    "name, plans, setup_kwargs",
    [
        ("cnn28", ("full", "last"), {"batch_size": 16, "optimizer": "adam"}),
        ("cnn28", ("last", "mid+last"), {"batch_size": 16, "prefix_chunk": 4}),
        ("cnn8", ("full", "bias-first+last-weight"), {"batch_size": 5, "optimizer": "sgd"}),
        ("mlp", ("last", "mid+last"), {"batch_size": 3, "prefix_chunk": 2}),
        ("cnn28", ("full", "last"), {"batch_size": 16, "optimizer": "adam", "clipping": "ghost"}),
        ("cnn8", ("full", "bias-first+last-weight"), {"batch_size": 5, "optimizer": "sgd", "clipping": "ghost"}),
        ("mlp", ("last", "mid+last"), {"batch_size": 3, "prefix_chunk": 2, "clipping": "ghost"}),
    ],
)
def test_estimate_tracks_optimizer_and_prefix_chunking(name: str, plans: tuple, setup_kwargs: dict) -> None:
    model = build_model(name)
    for plan in (_plans(name)[p] for p in plans):
        setup = TrainingSetup(input_shape=model_input_shape(name), **setup_kwargs)
        measured = measure_training_memory(model, plan, setup)
        estimated = estimate_training_memory(model, plan, setup)
        assert abs(relative_error(estimated.peak_bytes, measured.peak_bytes)) <= TOLERANCE, (plan.trainable, setup)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 2, 7, 64])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_estimate_across_batch_sizes(name: str, batch_size: int) -> None:
    model = build_model(name)
    for plan in _plans(name).values():
        for dp, clipping in ((True, "per_sample"), (True, "ghost"), (False, "per_sample")):
            setup = TrainingSetup(batch_size, model_input_shape(name), dp=dp, clipping=clipping)
            measured = measure_training_memory(model, plan, setup)
            estimated = estimate_training_memory(model, plan, setup)
            assert abs(relative_error(estimated.peak_bytes, measured.peak_bytes)) <= TOLERANCE, (
                plan.trainable, dp, clipping
            )


def test_frozen_prefix_removes_saved_activations_and_memory() -> None:
    model = build_model("cnn28")
    setup = TrainingSetup(32, (1, 28, 28))
    full = measure_training_memory(model, SubsetPlan.full(model), setup)
    last = measure_training_memory(model, SubsetPlan.from_layers(model, ["15"]), setup)
    assert last.saved_activation_bytes < 0.01 * full.saved_activation_bytes
    assert last.peak_bytes < 0.3 * full.peak_bytes
    nodp = measure_training_memory(model, SubsetPlan.full(model), TrainingSetup(32, (1, 28, 28), dp=False))
    assert nodp.peak_bytes < full.peak_bytes  # per-sample gradients are what DP adds
    chunked = measure_training_memory(
        model, SubsetPlan.from_layers(model, ["15"]), TrainingSetup(32, (1, 28, 28), prefix_chunk=4)
    )
    assert chunked.peak_bytes < 0.6 * last.peak_bytes


def test_measurement_is_repeatable_and_leaves_the_model_alone() -> None:
    model = build_model("cnn8")
    model[0].weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = SubsetPlan.from_layers(model, ["8", "10"])
    setup = TrainingSetup(16, (1, 8, 8))
    a = measure_training_memory(model, plan, setup)
    b = measure_training_memory(model, plan, setup)
    assert abs(a.peak_bytes - b.peak_bytes) <= 0.01 * a.peak_bytes
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p.detach())
    assert not model[0].weight.requires_grad and model[8].weight.requires_grad


def test_estimator_reuses_its_probe_and_rejects_non_sequential() -> None:
    model = build_model("cnn28")
    est = MemoryEstimator(model, (1, 28, 28))
    small = est.estimate(SubsetPlan.from_layers(model, ["15"]), 8)
    big = est.estimate(SubsetPlan.full(model), 8)
    assert small.peak_bytes < big.peak_bytes
    assert big.per_sample_gradient_bytes == 8 * big.trainable_bytes
    assert est.estimate(SubsetPlan.full(model), 16).peak_bytes > big.peak_bytes
    assert small.approximate_layers == ()

    class Net(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="nn.Sequential"):
        MemoryEstimator(Net(), (3,))


SLICED = [
    ("cnn28", ["8", "13", "15"], {"8": 16}),
    ("cnn28", ["13", "15"], {"13": 32}),
    ("cnn28", ["4", "5", "8"], {"4": 32, "8": 8}),
    ("cnn8", ["3", "10"], {"3": 8}),
    ("cnn8", ["0"], {"0": 4}),
    ("mlp", ["3", "5"], {"3": 16, "5": 3}),
    ("logistic", ["1"], {"1": 4}),
]


@pytest.mark.parametrize("clipping", ["per_sample", "ghost"])
@pytest.mark.parametrize("name, layers, slices", SLICED, ids=[f"{n}-{'-'.join(l)}" for n, l, _ in SLICED])
def test_estimate_of_channel_slice_plans_within_15_percent(name, layers, slices, clipping) -> None:
    model = build_model(name)
    names = [n for n, _ in model.named_parameters() if n.split(".")[0] in layers]
    plan = SubsetPlan.with_slices(model, names, slices)
    for batch_size in (1, 32):
        setup = TrainingSetup(batch_size, model_input_shape(name), dp=True, clipping=clipping)
        measured = measure_training_memory(model, plan, setup)
        estimated = estimate_training_memory(model, plan, setup)
        err = relative_error(estimated.peak_bytes, measured.peak_bytes)
        assert abs(err) <= TOLERANCE, (name, slices, clipping, batch_size, err)
        assert estimated.trainable_bytes == 4 * plan.num_coordinates
        if clipping == "per_sample":  # per-sample gradients cover the trained rows only
            assert measured.per_sample_gradient_bytes == batch_size * 4 * plan.num_coordinates


def test_replay_ignores_frees_of_blocks_not_allocated_in_the_measurement() -> None:
    """torch's CPU allocator keeps the size of a block recorded in an earlier profiling
    session and freed while profiling was off; a new block at that address, freed during
    the measurement, is reported with the old size. That made one measured peak 40% too
    low in CI, depending on which tests ran before (address reuse cannot be forced in a
    test, so the replay is checked on the event sequence torch produced then)."""
    from ftte.edge.memory import replay_allocation_events

    events = [(1, 0xA, 400), (2, 0xB, -262144), (3, 0xC, 800), (4, 0xA, -400), (5, 0xD, 100)]
    peak, phase, _ = replay_allocation_events(events, [(0, 3, "forward")])
    assert (peak, phase) == (1200, "forward")

