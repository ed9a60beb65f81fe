"""Bundled models, the model registry, user factories and BatchNorm repair."""

from __future__ import annotations

import textwrap

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from ftte.edge.models import (
    MODELS,
    UnsupportedModelError,
    build_model,
    load_factory,
    make_dp_compatible,
    model_input_shape,
    parameter_count,
)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bundled_models_are_sequential_dp_ready_and_run(name: str) -> None:
    model = build_model(name)
    assert isinstance(model, nn.Sequential)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []
    x = torch.randn((3,) + model_input_shape(name))
    assert model(x).shape == (3, 10)


def test_model_sizes() -> None:
    assert parameter_count(build_model("cnn28")) >= 100_000
    assert parameter_count(build_model("logistic")) == 64 * 10 + 10
    assert any(isinstance(m, nn.GroupNorm) for m in build_model("cnn8").modules())


def test_kwargs_reach_the_factory() -> None:
    model = build_model("mlp", in_features=20, hidden=(7,), num_classes=3)
    assert model(torch.randn(2, 20)).shape == (2, 3)
    assert model_input_shape("cnn28", in_channels=3) == (3, 28, 28)
    rgb = build_model("cnn28", in_channels=3)
    assert rgb(torch.randn(2, 3, 28, 28)).shape == (2, 10)


@pytest.fixture()
def user_module(tmp_path, monkeypatch) -> str:
    name = "ftte_test_user_models"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import torch.nn as nn

            CONSTANT = 3

            def make(width=4):
                return nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.Linear(width, 2))

            def not_a_model():
                return "nope"

            class Zoo:
                @staticmethod
                def tiny():
                    return nn.Sequential(nn.Linear(5, 2))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_module_factory_loading(user_module: str) -> None:
    model = build_model(f"{user_module}:make", width=6)
    assert isinstance(model, nn.Sequential)
    assert model[0].out_features == 6
    assert isinstance(build_model(f"{user_module}:Zoo.tiny"), nn.Sequential)
    assert callable(load_factory(f"{user_module}:make"))


@pytest.mark.parametrize(
    "ref, message",
    [
        ("resnet9000", "unknown model"),
        ("a:b:c", "package.module:factory"),
        (":make", "package.module:factory"),
        ("ftte_no_such_module_xyz:make", "cannot import"),
        ("{mod}:missing", "has no attribute"),
        ("{mod}:CONSTANT", "not callable"),
    ],
)
def test_bad_model_references_fail_clearly(user_module: str, ref: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(ref.format(mod=user_module))


def test_factory_must_return_a_module(user_module: str) -> None:
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        build_model(f"{user_module}:not_a_model")


def test_batchnorm_is_replaced_by_groupnorm_keeping_affine() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 12, 3),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Sequential(nn.Flatten(), nn.Linear(12 * 6 * 6, 6), nn.BatchNorm1d(6)),
    )
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
    fixed = make_dp_compatible(model)
    assert isinstance(model[1], nn.BatchNorm2d), "the input model must not change"
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fixed.modules())
    gn = fixed[1]
    assert isinstance(gn, nn.GroupNorm) and gn.num_channels == 12 and 12 % gn.num_groups == 0
    assert torch.equal(gn.weight, model[1].weight)
    assert isinstance(fixed[3][2], nn.GroupNorm)
    assert ModuleValidator.validate(fixed, strict=False) == []
    assert fixed(torch.randn(2, 1, 8, 8)).shape == (2, 6)
    # per-sample normalisation: a sample's output no longer depends on its batch mates
    fixed.train()
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(fixed(x)[:1], fixed(x[:1]), atol=1e-5)


def test_unrepairable_model_is_refused_clearly() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    model.add_module("rnn", nn.LSTM(4, 4))
    with pytest.raises(UnsupportedModelError, match="not DP-SGD compatible.*LSTM"):
        make_dp_compatible(model)


def test_lazy_batchnorm_is_refused_clearly() -> None:
    with pytest.raises(UnsupportedModelError, match="lazy BatchNorm"):
        make_dp_compatible(nn.Sequential(nn.Linear(3, 3), nn.LazyBatchNorm1d()))
