"""Config: default loads, strict keys, types and ranges, cross-field rules, round trips."""

import dataclasses
import json
import textwrap

import pytest

from ftte.pipeline.config import (
    Config,
    ConfigError,
    FleetConfig,
    load_config,
    parse_config,
    parse_overrides,
)


def test_default_loads_and_equals_dataclass_defaults():
    cfg = load_config(None)
    assert cfg == Config()  # default.toml and the dataclass defaults agree
    assert cfg.run.strategy == "ftte"
    assert cfg.fleet.devices == 100 and cfg.fleet.stragglers == 0.9
    assert cfg.data.name == "mnist" and cfg.data.partition == "dirichlet" and cfg.data.alpha == 0.5
    assert cfg.model.name == "cnn28"
    assert cfg.privacy.target_epsilon == 10.0 and cfg.privacy.planned_rounds == 10 and cfg.privacy.delta == 0.0
    assert cfg.run.max_versions == 0  # the horizon (or spent budgets) ends a run
    assert cfg.privacy.enabled and cfg.secagg.enabled
    assert cfg.secagg_threshold == cfg.server.buffer_size // 2 + 1


def test_default_toml_documents_every_key():
    from importlib.resources import files

    text = files("ftte.pipeline").joinpath("default.toml").read_text()
    for section, values in Config().to_dict().items():
        assert f"[{section}]" in text
        for key in values:
            if key == "classes":
                assert "[[fleet.classes]]" in text
            else:
                assert f"\n{key} = " in text, f"{section}.{key} missing from default.toml"


@pytest.mark.parametrize(
    "toml, needles",
    [
        ("[bogus]\nx = 1", ["unknown section [bogus]", "[run]", "[fleet]"]),
        ("[train]\nlrr = 0.1", ["[train]", "'lrr'", "did you mean lr", "batch_size"]),
        ("[fleet]\nclases = []", ["[fleet]", "'clases'", "stragglers"]),
        ("[[fleet.classes]]\nname = 'a'\nfraction = 1.0\ncolour = 'red'", ["[[fleet.classes]] #1", "'colour'"]),
        ("[[fleet.classes]]\nname = 'a'\nfraction = 1.0\ndropout = { trian = 0.1 }", ["dropout", "'trian'", "unmask"]),
    ],
)
def test_unknown_sections_and_keys_are_named(toml, needles):
    with pytest.raises(ConfigError) as err:
        parse_config(toml)
    for needle in needles:
        assert needle in str(err.value)


@pytest.mark.parametrize(
    "toml, needles",
    [
        ("[train]\nlr = 'fast'", ["[train] lr", "expected a number"]),
        ("[run]\nseed = 1.5", ["[run] seed", "integer"]),
        ("[run]\nseed = true", ["[run] seed", "integer"]),
        ("[privacy]\nenabled = 1", ["[privacy] enabled", "true or false"]),
        ("[run]\nstrategy = 'fedprox'", ["[run] strategy", "'fedavg'"]),
        ("[train]\nlr = -0.1", ["[train] lr", "> 0"]),
        ("[train]\nmemory_budget_fraction = 0.0", ["memory_budget_fraction", "(0, 1]"]),
        ("[train]\nmemory_budget_fraction = 1.5", ["memory_budget_fraction"]),
        ("[fleet]\nstragglers = 1.0", ["[fleet] stragglers", "[0, 1)"]),
        ("[fleet]\nstragglers = -0.1", ["[fleet] stragglers"]),
        ("[data]\ntest_fraction = 1.0", ["[data] test_fraction"]),
        ("[data]\nalpha = 0", ["[data] alpha"]),
        ("[data]\nname = 'csv'\npath = 'x.csv'", ["[data] target", "required"]),
        ("[data]\nname = 'npz'", ["[data] path", "required"]),
        ("[server]\nmomentum = 1.0", ["[server] momentum"]),
        ("[secagg]\nneighbors = 3", ["[secagg] neighbors", "even"]),
        ("[secagg]\nvalue_bits = 64", ["[secagg] value_bits"]),
        ("[model]\nname = 'resnet'", ["[model] name", "module:factory"]),
        ("[privacy]\nnoise_multiplier = 0.0\ntarget_epsilon = 0.0", ["noise_multiplier", "enabled"]),
        ("[privacy]\nepsilon_max = 5.0", ["target_epsilon", "epsilon_max"]),
        ("[privacy]\ntarget_epsilon = 3.0\nplanned_rounds = 0", ["planned_rounds", "required"]),
        ("[[fleet.classes]]\nname = 'a'\nfraction = 1.0\navailability = 0", ["'a' availability"]),
        ("[[fleet.classes]]\nname = 'a'\nfraction = 1.0\ndropout = { unmask = 1.0 }", ["'a' dropout unmask"]),
        ("[[fleet.classes]]\nname = 'a'", ["[[fleet.classes]] #1", "missing", "fraction"]),
        ("[[fleet.classes]]\nname = 'a'\nfraction = 0.6\n[[fleet.classes]]\nname = 'b'\nfraction = 0.6", ["sum to 1"]),
        ("[run\nseed = 1", ["invalid TOML"]),
    ],
)
def test_bad_values_are_named(toml, needles):
    with pytest.raises(ConfigError) as err:
        parse_config(toml)
    for needle in needles:
        assert needle in str(err.value)


@pytest.mark.parametrize(
    "toml, needles",
    [
        # full graph: T must exceed K/2 ...
        ("[server]\nbuffer_size = 10\n[secagg]\nthreshold = 5", ["[secagg] threshold", "half"]),
        # ... and not exceed K
        ("[server]\nbuffer_size = 10\n[secagg]\nthreshold = 11", ["[secagg] threshold", "<="]),
        ("[server]\nbuffer_size = 1", ["buffer_size", ">= 2"]),
        ("[server]\nbuffer_size = 20\n[secagg]\ngraph = 'ring'\nneighbors = 20", ["[secagg] neighbors", "< the cohort"]),
        # the ring graph needs a majority of the whole cohort too (a majority of neighbours is not enough)
        ("[server]\nbuffer_size = 20\n[secagg]\ngraph = 'ring'\nneighbors = 6\nthreshold = 7", ["threshold", "half of the cohort", "max_corrupt"]),
        ("[server]\nbuffer_size = 20\n[secagg]\nmax_corrupt = 20", ["max_corrupt", "cohort size"]),
        ("[fleet]\ndevices = 5", ["[server] buffer_size", "[fleet] devices"]),
        ("[run]\nstrategy = 'fedavg'\n[fleet]\ndevices = 12", ["fedavg_clients_per_round", "13"]),
    ],
)
def test_cross_field_rules(toml, needles):
    with pytest.raises(ConfigError) as err:
        parse_config(toml)
    for needle in needles:
        assert needle in str(err.value)


def test_valid_threshold_and_ring_settings():
    cfg = parse_config("[server]\nbuffer_size = 50\n[secagg]\ngraph = 'ring'\nneighbors = 8")
    assert cfg.secagg_threshold == 26
    cfg = parse_config("[server]\nbuffer_size = 10\n[secagg]\nthreshold = 6")
    assert cfg.secagg_threshold == 6
    # secagg off: the threshold rules do not apply
    assert parse_config("[server]\nbuffer_size = 1\n[secagg]\nenabled = false").server.buffer_size == 1


def test_partial_file_takes_defaults_and_resolves_relative_path(tmp_path):
    (tmp_path / "d.csv").write_text("a,y\n1,0\n")
    path = tmp_path / "run.toml"
    path.write_text(textwrap.dedent("""
        [run]
        seed = 7
        [data]
        name = "csv"
        path = "d.csv"
        target = "y"
    """))
    cfg = load_config(path)
    assert cfg.run.seed == 7 and cfg.run.strategy == "ftte"
    assert cfg.data.path == str((tmp_path / "d.csv").resolve())
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_round_trips():
    cfg = Config().with_overrides(
        fleet={"classes": [{"name": "a", "fraction": 0.3, "dropout": {"train": 0.2}}, {"name": "b", "fraction": 0.7}]},
        privacy={"epsilon_max": float("inf")},
    )
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert parse_config(cfg.to_toml()) == cfg
    json.loads(json.dumps(cfg.to_dict()))  # plain data
    assert cfg.to_dict()["fleet"]["classes"][0]["dropout"]["train"] == 0.2


def test_overrides_and_replace_validate():
    cfg = Config()
    new = cfg.with_overrides(run={"strategy": "fedavg"}, **{"server.buffer_size": 20, "fleet.devices": 200})
    assert (new.run.strategy, new.server.buffer_size, new.fleet.devices) == ("fedavg", 20, 200)
    assert cfg.run.strategy == "ftte"  # frozen original untouched
    with pytest.raises(ConfigError, match="'bufer_size'"):
        cfg.with_overrides(**{"server.bufer_size": 3})
    with pytest.raises(ConfigError, match="unknown section"):
        cfg.with_overrides(nope={"x": 1})
    with pytest.raises(ConfigError, match=r"\[train\] lr"):
        dataclasses.replace(cfg.train, lr=0.0)
    small_fleet = dataclasses.replace(cfg, fleet=FleetConfig(devices=3))  # fine for a deployment ...
    with pytest.raises(ConfigError, match="buffer_size"):
        small_fleet.check_simulation()  # ... not for a simulation of 3 devices
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run.seed = 3  # type: ignore[misc]


def test_parse_overrides():
    got = parse_overrides(["run.seed=3", "data.name=synthetic", "privacy.enabled=false", "run.strategy = 'fedbuff'"])
    assert got == {"run.seed": 3, "data.name": "synthetic", "privacy.enabled": False, "run.strategy": "fedbuff"}
    cfg = Config().with_overrides(**got)
    assert cfg.run.seed == 3 and cfg.data.name == "synthetic" and not cfg.privacy.enabled
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["seed=3"])


def test_value_bits_that_could_wrap_the_ring_are_refused():
    from ftte.pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="value_bits"):
        load_config(None).with_overrides(**{"secagg.value_bits": 30, "server.buffer_size": 10})
    assert load_config(None).with_overrides(**{"secagg.value_bits": 27, "server.buffer_size": 10}).secagg.value_bits == 27


def test_domain_objects_restate_no_default_of_their_own():
    """One schema: the library's DP settings default to [privacy]'s values, the trainer's and the
    weighting's settings have no defaults but the schema's."""
    import dataclasses as dc

    from ftte.edge.runtime import TrainSettings
    from ftte.privacy.dpsgd import DPConfig
    from ftte.protocol.weighting import WeightRule

    p, dp = Config().privacy, DPConfig()
    for name in ("enabled", "noise_multiplier", "max_grad_norm", "accountant", "epsilon_max"):
        assert getattr(dp, name) == getattr(p, name), name
    assert [f.name for f in dc.fields(WeightRule) if f.default is not dc.MISSING] == []
    assert [f.name for f in dc.fields(TrainSettings) if f.default is not dc.MISSING] == ["clipping", "prefix_chunk"]
    assert TrainSettings.__dataclass_fields__["clipping"].default == Config().train.settings().clipping
    # not a schema value: the plan search picks the prefix chunk per plan; unset is the whole batch
    assert TrainSettings.__dataclass_fields__["prefix_chunk"].default is None is Config().train.settings().prefix_chunk
