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


# --- models named by the network (issue 10, finding 1) -----------------------------------------

import json  # noqa: E402
import sys  # noqa: E402

from hypothesis import given, settings, strategies as st  # noqa: E402

from ftte.edge.models import (  # noqa: E402
    MAX_REGISTERED_PARAMETERS,
    IntArg,
    ModelSpec,
    UntrustedModelError,
    build_registered_model,
    check_model_kwargs,
    parse_model_kwargs,
)


@pytest.mark.parametrize("name, kwargs", [
    ("logistic", {"in_features": 64, "num_classes": 10}),  # what ftte server sends (deploy_task.model_kwargs)
    ("mlp", {"in_features": 64, "num_classes": 10}),
    ("mlp", {"in_features": 20, "hidden": [7, 5], "num_classes": 3}),
    ("cnn8", {"in_channels": 1, "num_classes": 10}),
    ("cnn28", {"in_channels": 3, "num_classes": 10, "width": 8}),
    ("logistic", {}),
])
def test_registered_models_build_from_checked_arguments(name, kwargs):
    model = build_registered_model(name, kwargs)
    expected = build_model(name, **kwargs)
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in expected.named_parameters()]


def test_a_remote_factory_reference_is_refused_without_importing_it(user_module, tmp_path):
    marker = tmp_path / "imported"
    (tmp_path / "ftte_test_import_side_effect.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef make():\n    import torch.nn as nn\n    return nn.Sequential()\n")
    for ref in (f"{user_module}:make", "ftte_test_import_side_effect:make", "subprocess:run", "os:system",
                "builtins:eval", "", "logistic ", "LOGISTIC", 3, None):
        with pytest.raises(UntrustedModelError, match="not a bundled model"):
            build_registered_model(ref, {})
    assert "ftte_test_import_side_effect" not in sys.modules
    assert not marker.exists()


def test_bad_arguments_are_refused_before_the_factory_runs(monkeypatch):
    calls = []

    def spy(width: int = 2) -> nn.Sequential:
        calls.append(width)
        return nn.Sequential(nn.Linear(width, 2))

    monkeypatch.setitem(MODELS, "spy", ModelSpec("spy", spy, lambda **_: (2,), "test", {"width": IntArg(1, 8)}))
    for kwargs in ({"width": 9}, {"width": 0}, {"width": 2.0}, {"width": False}, {"width": "2"}, {"width": [2]},
                   {"depth": 1}, {"width": 2, "extra": 1}, [("width", 2)], "width=2"):
        with pytest.raises(UntrustedModelError):
            build_registered_model("spy", kwargs)
    assert calls == []
    build_registered_model("spy", {"width": 3})
    assert calls == [3, 3]  # once on the meta device (to count parameters), once for real


def test_parameter_count_is_bounded_without_allocating():
    with pytest.raises(UntrustedModelError, match="parameters"):
        check_model_kwargs("mlp", {"in_features": 1 << 20, "hidden": [1 << 16] * 16, "num_classes": 100_000})
    with pytest.raises(UntrustedModelError, match="parameters"):
        check_model_kwargs("cnn28", {"in_channels": 64, "num_classes": 100_000, "width": 512})


def test_model_arguments_json_is_parsed_defensively():
    assert parse_model_kwargs('{"in_features": 4}') == {"in_features": 4}
    for text in ("[" * 4000, "[]", "3", "null", "{", "x" * 5000, b"{}", None):
        with pytest.raises(UntrustedModelError):
            parse_model_kwargs(text)


_json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(MODELS)),
       st.dictionaries(st.sampled_from(["in_features", "num_classes", "hidden", "in_channels", "width", "bias", ""]),
                       _json_values | st.integers(0, 1 << 21), max_size=4))
def test_any_remote_arguments_are_either_refused_or_within_bounds(name, kwargs):
    try:
        checked = check_model_kwargs(name, json.loads(json.dumps(kwargs)))
    except UntrustedModelError:
        return
    assert set(checked) <= set(MODELS[name].args)
    with torch.device("meta"):
        count = sum(p.numel() for p in MODELS[name].factory(**checked).parameters())
    assert count <= MAX_REGISTERED_PARAMETERS
