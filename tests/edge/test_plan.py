"""Subset plans: identity, serialisation, the prefix/suffix split, and the update vector."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ftte.edge.models import build_model
from ftte.edge.plan import (
    FrozenPrefix,
    PlanMismatchError,
    PlannedModel,
    SubsetPlan,
    apply_subset_vector,
    split_model,
    subset_vector,
)
from ftte.edge.step import StepConfig, SubsetStep

CNN8_LAST_TWO = "plan-14132a9962124480"  # pinned: the canonical encoding must not drift


def test_plan_id_is_stable_across_instances_and_orderings() -> None:
    a = SubsetPlan.from_names(build_model("cnn8"), ["8.weight", "8.bias", "10.weight", "10.bias"])
    b = SubsetPlan.from_names(build_model("cnn8"), ["10.bias", "8.bias", "10.weight", "8.weight"])
    assert a == b and a.plan_id == b.plan_id and a.content_hash == b.content_hash
    assert a.plan_id == CNN8_LAST_TWO
    assert a.content_hash == hashlib.sha256(a.canonical_bytes()).hexdigest()
    assert a.plan_id == "plan-" + a.content_hash[:16]
    assert SubsetPlan.from_layers(build_model("cnn8"), ["8", 10]) == a


def test_plan_ids_are_distinct() -> None:
    model = build_model("cnn8")
    plans = [
        SubsetPlan.full(model),
        SubsetPlan.from_layers(model, ["10"]),
        SubsetPlan.from_layers(model, ["8", "10"]),
        SubsetPlan.from_names(model, ["10.weight"]),
        SubsetPlan.from_names(model, ["10.bias"]),
    ]
    assert len({p.plan_id for p in plans}) == len(plans)
    # same trainable names, different architecture (shapes) -> different plan
    wider = SubsetPlan.from_layers(build_model("cnn8", num_classes=7), ["10"])
    assert wider.trainable == plans[1].trainable and wider.plan_id != plans[1].plan_id


def test_plan_validation_and_serialisation() -> None:
    model = build_model("mlp")
    plan = SubsetPlan.from_layers(model, ["3", "5"])
    assert plan.num_coordinates == 128 * 64 + 64 + 64 * 10 + 10
    assert plan.trainable_layers == ("3", "5")
    again = SubsetPlan.from_json(plan.to_json())
    assert again == plan and again.plan_id == plan.plan_id
    doc = plan.to_dict()
    doc["trainable"] = ["5.weight", "5.bias"]
    with pytest.raises(ValueError, match="does not match"):
        SubsetPlan.from_dict(doc)
    with pytest.raises(ValueError, match="unknown parameter"):
        SubsetPlan.from_names(model, ["7.weight"])
    with pytest.raises(ValueError, match="unknown layer"):
        SubsetPlan.from_layers(model, ["99"])
    with pytest.raises(ValueError, match="hold no parameters"):
        SubsetPlan.from_layers(model, ["0"])  # Flatten
    with pytest.raises(ValueError, match="must not be empty"):
        SubsetPlan.from_names(model, [])
    with pytest.raises(PlanMismatchError):
        plan.check(build_model("mlp", hidden=(128, 32)))


def _count_saved(fn) -> int:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return len(saved)


def test_split_prefix_keeps_no_autograd_state_and_stays_in_eval() -> None:
    model = build_model("cnn28")
    plan = SubsetPlan.from_layers(model, ["8", "13", "15"])  # conv3, fc1, fc2
    prefix, suffix = split_model(model, plan)
    assert isinstance(prefix, FrozenPrefix) and len(prefix) == 8
    assert list(suffix._modules) == [str(i) for i in range(8, 16)]
    prefix.train()
    suffix.train()
    assert all(not m.training for m in prefix.layers.modules())
    x = torch.randn(4, 1, 28, 28, requires_grad=True)  # even an input that wants grad
    assert _count_saved(lambda: prefix(x)) == 0
    h = prefix(x)
    assert h.grad_fn is None and not h.requires_grad
    assert all(not p.requires_grad for p in prefix.parameters())
    # suffix: plan tensors trainable, the rest frozen; a frozen GroupNorm stays in eval
    names = {n for n, p in suffix.named_parameters() if p.requires_grad}
    assert names == set(plan.trainable)
    assert not suffix._modules["9"].training  # GroupNorm after conv3: frozen
    assert suffix._modules["8"].training  # trainable conv
    suffix.eval()
    suffix.train()
    assert not suffix._modules["9"].training
    # the halves compute the model's function
    model.eval()
    with torch.no_grad():
        assert torch.allclose(PlannedModel(prefix, suffix).eval()(x), model(x), atol=1e-5)


def test_trainable_norm_layer_trains() -> None:
    model = build_model("cnn8")
    _, suffix = split_model(model, SubsetPlan.from_layers(model, ["4", "10"]))
    suffix.train()
    assert suffix._modules["4"].training


def test_split_needs_a_sequential() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x)

    net = Net()
    with pytest.raises(TypeError, match="nn.Sequential"):
        split_model(net, SubsetPlan.full(net))


def test_chunked_prefix_computes_the_same_function() -> None:
    torch.manual_seed(0)
    model = build_model("cnn28")
    plan = SubsetPlan.from_layers(model, ["13", "15"])
    whole, _ = split_model(model, plan)
    chunked, _ = split_model(model, plan, prefix_chunk=3)
    x = torch.randn(10, 1, 28, 28)
    assert torch.allclose(whole(x), chunked(x), atol=1e-5)
    with pytest.raises(ValueError):
        split_model(model, plan, prefix_chunk=0)


def test_dp_step_changes_only_the_plan() -> None:
    torch.manual_seed(0)
    model = build_model("cnn8")
    plan = SubsetPlan.from_layers(model, ["4", "10"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = SubsetStep(model, plan, StepConfig(dp=True, optimizer="sgd"), expected_batch_size=8)
    loss = step(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    assert np.isfinite(loss)
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n in plan.trainable), n


def test_empty_poisson_batch_still_takes_a_noisy_step() -> None:
    torch.manual_seed(0)
    model = build_model("logistic")
    plan = SubsetPlan.full(model)
    before = subset_vector(model, plan)
    step = SubsetStep(model, plan, StepConfig(dp=True, optimizer="sgd"), expected_batch_size=4)
    assert np.isnan(step(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)))
    assert not np.array_equal(before, subset_vector(model, plan))  # pure noise was applied


def test_subset_vector_round_trip() -> None:
    torch.manual_seed(0)
    model = build_model("cnn8")
    plan = SubsetPlan.from_names(model, ["3.weight", "8.bias", "10.weight"])
    vec = subset_vector(model, plan)
    assert vec.dtype == np.float32 and vec.shape == (plan.num_coordinates,)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in plan.trainable}
    apply_subset_vector(model, plan, vec + 1.0)
    assert np.allclose(subset_vector(model, plan), vec + 1.0)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(frozen[n], p.detach())
    with pytest.raises(ValueError, match="1-D vector"):
        apply_subset_vector(model, plan, vec[:-1])
    with pytest.raises(ValueError, match="NaN"):
        apply_subset_vector(model, plan, np.full_like(vec, np.nan))
    with pytest.raises(PlanMismatchError):
        subset_vector(build_model("cnn28"), plan)


_MLP_NAMES = [n for n, _ in build_model("mlp").named_parameters()]


@settings(max_examples=25, deadline=None)
@given(
    chosen=st.sets(st.sampled_from(_MLP_NAMES), min_size=1),
    seed=st.integers(0, 2**31 - 1),
)
def test_subset_vector_round_trip_property(chosen: set[str], seed: int) -> None:
    model = build_model("mlp")
    plan = SubsetPlan.from_names(model, chosen)
    rng = np.random.default_rng(seed)
    new = rng.standard_normal(plan.num_coordinates).astype(np.float32)
    others = {n: p.detach().clone() for n, p in model.named_parameters() if n not in chosen}
    apply_subset_vector(model, plan, new)
    assert np.array_equal(subset_vector(model, plan), new)
    for n, p in model.named_parameters():
        if n in others:
            assert torch.equal(p.detach(), others[n])


def test_frozen_parts_return_to_eval_even_after_full_model_train() -> None:
    model = build_model("cnn28")
    prefix, suffix = split_model(model, SubsetPlan.from_layers(model, ["8", "13", "15"]))
    model.train()  # bypasses FrozenPrefix.train / TrainableSuffix.train
    assert model[1].training and model[9].training
    x = torch.randn(2, 1, 28, 28)
    suffix(prefix(x))
    assert not model[1].training  # prefix GroupNorm
    assert not model[9].training  # frozen GroupNorm in the suffix
    assert model[8].training  # trainable conv untouched


# --------------------------------------------------------------------------------------
# channel slices


def _sliced_cnn28_plan(model):
    names = ["8.weight", "8.bias", "13.weight", "13.bias", "15.weight", "15.bias"]
    return SubsetPlan.with_slices(model, names, {"13": 32, "8": 16})


def test_channel_slice_plan_identity_json_and_size() -> None:
    model = build_model("cnn28")
    plan = _sliced_cnn28_plan(model)
    assert plan.slices == (("8", 16), ("13", 32))  # model order whatever the dict order
    whole = SubsetPlan.from_names(model, plan.trainable)
    assert plan.plan_id != whole.plan_id and not plan.is_full()
    assert b'"slices"' not in whole.canonical_bytes()  # plans without slices hash as before
    # conv 8: 16 of 64 filters of 64x3x3 (+16 biases); linear 13: 32 of 128 rows of 576 (+32); linear 15 whole
    assert plan.num_coordinates == 16 * 64 * 9 + 16 + 32 * 576 + 32 + 1290
    doc = plan.to_dict()
    assert doc["slices"] == [["8", 16], ["13", 32]] and "slices" not in whole.to_dict()
    assert SubsetPlan.from_json(plan.to_json()) == plan
    tampered = dict(doc, slices=[["8", 17], ["13", 32]])
    with pytest.raises(ValueError, match="content_hash|plan_id"):
        SubsetPlan.from_dict(tampered)
    assert plan.trained_shape("13.weight") == (32, 576) and plan.trained_rows("15.bias") is None


@pytest.mark.parametrize(
    "names, slices, match",
    [
        (["13.weight", "13.bias"], {"13": 128}, "1..127"),
        (["13.weight", "13.bias"], {"13": 0}, "1..127"),
        (["13.weight"], {"15": 3}, "no trainable tensor"),
        (["9.weight", "9.bias"], {"9": 8}, "only top-level ungrouped Conv2d or Linear"),
    ],
)
def test_channel_slice_validation(names, slices, match) -> None:
    with pytest.raises(ValueError, match=match):
        SubsetPlan.with_slices(build_model("cnn28"), names, slices)


def test_channel_slice_update_vector_covers_only_the_trained_rows() -> None:
    model = build_model("cnn28")
    plan = _sliced_cnn28_plan(model)
    vec = subset_vector(model, plan)
    assert vec.shape == (plan.num_coordinates,)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_subset_vector(model, plan, np.zeros(plan.num_coordinates, dtype=np.float32))
    params = dict(model.named_parameters())
    assert torch.count_nonzero(params["13.weight"][:32]) == 0 and torch.equal(params["13.weight"][32:],
                                                                               before["13.weight"][32:])
    assert torch.count_nonzero(params["8.bias"][:16]) == 0 and torch.equal(params["8.bias"][16:], before["8.bias"][16:])
    assert torch.count_nonzero(params["15.weight"]) == 0
    apply_subset_vector(model, plan, vec)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


@pytest.mark.parametrize("clipping", ["per_sample", "ghost"])
def test_training_a_channel_slice_moves_only_its_rows(clipping: str) -> None:
    torch.manual_seed(0)
    model = build_model("cnn28")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = _sliced_cnn28_plan(model)
    step = SubsetStep(model, plan, StepConfig(dp=True, lr=0.5, clipping=clipping), expected_batch_size=8)
    for _ in range(2):
        step(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    params = dict(model.named_parameters())
    moved = (params["8.weight"] - start["8.weight"]).abs().flatten(1).sum(1) > 0
    assert moved[:16].all() and not moved[16:].any()
    moved = (params["13.weight"] - start["13.weight"]).abs().sum(1) > 0
    assert moved[:32].all() and not moved[32:].any()
    assert not torch.equal(params["15.weight"], start["15.weight"])
    for n in ("0.weight", "4.weight", "9.weight"):
        assert torch.equal(params[n], start[n])
    # Opacus only formed per-sample gradients of the trained rows
    trained = [p for p in step.params]
    assert sum(p.numel() for p in trained) == plan.num_coordinates
    # the suffix computes the same function as the unsplit model
    prefix, suffix = split_model(model, plan)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(suffix(prefix(x)), model.eval()(x), atol=1e-5)


@pytest.mark.parametrize("clipping", ["per_sample", "ghost"])
def test_private_trainer_trains_a_channel_sliced_suffix(clipping: str) -> None:
    """The device runtime's path: split_model, then PrivateTrainer on the suffix."""
    from ftte.privacy.dpsgd import DPConfig, PrivateTrainer
    from ftte.privacy.secure_random import SecureRandom

    torch.manual_seed(1)
    model = build_model("cnn8")
    plan = SubsetPlan.with_slices(model, ["8.weight", "8.bias", "10.weight", "10.bias"], {"8": 12})
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    v0 = subset_vector(model, plan)
    prefix, suffix = split_model(model, plan)
    trainer = PrivateTrainer(suffix, DPConfig(noise_multiplier=1.0, epsilon_max=1e3, accountant="rdp"),
                             prefix=prefix, rng=SecureRandom.from_seed(0, "slice-test"), clipping=clipping)
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
    trainer.train_round((x, y), loss_fn=nn.CrossEntropyLoss(), lr=0.3, batch_size=10, steps=3)
    trainer.close()
    v1 = subset_vector(model, plan)
    assert v1.shape == v0.shape and not np.array_equal(v0, v1)
    params = dict(model.named_parameters())
    assert torch.equal(params["8.weight"][12:], start["8.weight"][12:])
    assert not torch.equal(params["8.weight"][:12], start["8.weight"][:12])
    assert torch.equal(params["3.weight"], start["3.weight"])
