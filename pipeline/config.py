"""Run configuration: typed, frozen, strict.

A configuration is a :class:`Config` made of one frozen dataclass per TOML section
(``[run]``, ``[data]``, ``[model]``, ``[train]``, ``[privacy]``, ``[secagg]``,
``[server]``, ``[fleet]`` with its ``[[fleet.classes]]``). Every key is documented in the
packaged ``default.toml``; the dataclass defaults below equal that file.

Strictness: an unknown section or key, a value of the wrong type, an out-of-range value
or an inconsistent combination raises :class:`ConfigError` naming the offending key
(``[train] lr: must be > 0, got -1.0``). Validation runs in ``__post_init__``, so it also
guards objects built in code, :func:`dataclasses.replace` and :meth:`Config.with_overrides`.

Typical use::

    cfg = load_config(None)                      # packaged default.toml
    cfg = load_config("my_run.toml")             # a user's file, missing keys default
    cfg = cfg.with_overrides(run={"strategy": "fedavg"}, **{"server.buffer_size": 20})
    cfg = cfg.with_overrides(**parse_overrides(["run.seed=3", "data.name=synthetic"]))
    json.dump(cfg.to_dict(), fh)                 # into a run's outputs
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal, Mapping

from ftte.crypto.stages import STAGE_LABELS

__all__ = [
    "STAGES",
    "ConfigError",
    "Section",
    "build_section",
    "SIMULATION_ONLY",
    "StageDropout",
    "DeviceClass",
    "RunConfig",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "PrivacyConfig",
    "SecAggConfig",
    "ServerConfig",
    "FleetConfig",
    "Config",
    "FAST_CLASS",
    "STRAGGLER_CLASS",
    "shorthand_classes",
    "load_config",
    "preset_names",
    "parse_config",
    "parse_overrides",
    "MiB",
]

MiB = 1 << 20

#: Protocol stages at which a simulated device may drop out, in protocol order.
STAGES: tuple[str, ...] = ("train",) + STAGE_LABELS

#: Built-in model names; anything else must be ``"package.module:factory"``.
BUILTIN_MODELS: tuple[str, ...] = ("logistic", "mlp", "cnn8", "cnn28")
_FACTORY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")

#: Sections that describe a simulated fleet; a deployment refuses them.
SIMULATION_ONLY: tuple[str, ...] = ("data", "fleet")

Mode = Literal["simulation", "deployment"]

#: Tolerance on "class fractions sum to 1".
FRACTION_TOLERANCE = 1e-6


class ConfigError(ValueError):
    """A configuration is malformed; the message names the section and key."""


# --------------------------------------------------------------------------------------
# generic field checking


def _fail(where: str, key: str | None, message: str) -> typing.NoReturn:
    raise ConfigError(f"{where} {key}: {message}" if key else f"{where}: {message}")


def _type_name(value: Any) -> str:
    return type(value).__name__


def _coerce(value: Any, tp: Any, where: str, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints widened to float)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if not isinstance(value, str) or value not in choices:
            _fail(where, key, f"must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            _fail(where, key, f"expected true or false, got {value!r} ({_type_name(value)})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            # numpy integers are accepted for programmatic use
            if hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iu" and getattr(value, "ndim", 1) == 0:
                return int(value)
            _fail(where, key, f"expected an integer, got {value!r} ({_type_name(value)})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iuf" and getattr(value, "ndim", 1) == 0:
                value = float(value)
            else:
                _fail(where, key, f"expected a number, got {value!r} ({_type_name(value)})")
        value = float(value)
        if math.isnan(value):
            _fail(where, key, "must be a number, got nan")
        return value
    if tp is str:
        if not isinstance(value, str):
            _fail(where, key, f"expected a string, got {value!r} ({_type_name(value)})")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            _fail(where, key, f"expected a list, got {value!r} ({_type_name(value)})")
        inner = args[0]
        items = []
        for i, item in enumerate(value):
            if isinstance(inner, type) and dataclasses.is_dataclass(inner) and isinstance(item, Mapping):
                # e.g. the second [[fleet.classes]] table is located as "[[fleet.classes]] #2"
                items.append(_build(inner, item, f"[[{getattr(inner, 'SECTION', key)}]] #{i + 1}"))
            else:
                items.append(_coerce(item, inner, where, f"{key}[{i}]"))
        return tuple(items)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            try:
                return _build(tp, value, f"{where} {key}")
            except ConfigError as exc:
                message = str(exc)
                if message.startswith("["):  # already located
                    raise
                raise ConfigError(f"{where} {message}") from None
        _fail(where, key, f"expected a table, got {value!r} ({_type_name(value)})")
    raise TypeError(f"unsupported annotation {tp!r} for {where} {key}")  # programming error


class Section:
    """Mixin: type-check every field on construction, then run ``_check``.

    Every configuration section of ftte (simulation and deployment) is one of these, so
    unknown keys, wrong types and bad values are refused the same way, naming the key.
    """

    SECTION: ClassVar[str] = ""

    def _where(self) -> str:
        return f"[{self.SECTION}]"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        where = self._where()
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            old = getattr(self, f.name)
            new = _coerce(old, hints[f.name], where, f.name)
            if new is not old:
                object.__setattr__(self, f.name, new)
        self._check()

    def _check(self) -> None:  # range checks; overridden per section
        pass

    # small range helpers -------------------------------------------------------------
    def _require(self, key: str, ok: bool, rule: str) -> None:
        if not ok:
            _fail(self._where(), key, f"{rule}, got {getattr(self, key)!r}")


def build_section(cls: type, data: Any, where: str) -> Any:
    """Build any :class:`Section` dataclass (``[http]``, ``[deploy]`` too) with the strict rules of this module."""
    return _build(cls, data, where)


def _allowed_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown(kind: str, name: str, where: str, allowed: list[str]) -> typing.NoReturn:
    """Raise for an unknown key/section, suggesting the closest allowed name."""
    hint = difflib.get_close_matches(name, allowed, n=1)
    did_you_mean = f" (did you mean {hint[0]}?)" if hint else ""
    shown = name if kind == "section" else repr(name)
    raise ConfigError(f"{where}: unknown {kind} {shown}{did_you_mean}; allowed {kind}s: {', '.join(allowed)}")


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown and missing keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table, got {data!r} ({_type_name(data)})")
    allowed = _allowed_keys(cls)
    for key in data:
        if key not in allowed:
            _unknown("key", str(key), where, allowed)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s): {', '.join(missing)}")
    return cls(**dict(data))


# --------------------------------------------------------------------------------------
# fleet classes


@dataclass(frozen=True)
class StageDropout(Section):
    """Probability that a device drops out at each protocol stage (independent draws).

    ``train``: never finishes local training; ``advertise``: never sends its keys;
    ``share``: never sends its encrypted shares; ``upload``: never sends its masked
    update; ``consistency``: never sends the consistency check; ``unmask``: never
    sends its unmasking shares.
    """

    SECTION: ClassVar[str] = "dropout"

    def _where(self) -> str:
        return "dropout"

    train: float = 0.0
    advertise: float = 0.0
    share: float = 0.0
    upload: float = 0.0
    consistency: float = 0.0
    unmask: float = 0.0

    def _check(self) -> None:
        for stage in STAGES:
            p = getattr(self, stage)
            self._require(stage, 0.0 <= p < 1.0, "must be in [0, 1)")

    def as_dict(self) -> dict[str, float]:
        return {stage: float(getattr(self, stage)) for stage in STAGES}


@dataclass(frozen=True)
class DeviceClass(Section):
    """One class of simulated devices and the fraction of the fleet it makes up.

    Bandwidths are bytes per second (as in :class:`ftte.edge.profile.DeviceProfile`);
    ``compute_speed`` is relative work per virtual second (1.0 = reference device);
    ``availability`` is the fraction of time a device is online and idle.

    ``memory_bytes`` is the *training* memory of one DP-SGD step that the plan search may
    budget (a fraction ``[train] memory_budget_fraction`` of it), not the device's RAM: the
    whole ``ftte edge`` process needs far more (``ftte bench device`` measured about 394 MiB
    peak RSS, 275-280 MiB charged to its cgroup; it completed under a 300 MiB limit and was
    killed under 200 MiB). To calibrate a class, run ``ftte bench device --cpu F --memory M
    --json`` on the emulated device and set ``compute_speed`` to the reference device's
    training time over the measured ``phases_per_round.train.wall_s``; the per-round
    protocol CPU it reports (``protocol_cpu_s``) is device time a class charged only for
    training would miss.
    """

    SECTION: ClassVar[str] = "fleet.classes"

    name: str
    fraction: float
    compute_speed: float = 1.0
    memory_bytes: int = 64 * MiB
    uplink_bps: float = 1_000_000.0
    downlink_bps: float = 5_000_000.0
    availability: float = 1.0
    dropout: StageDropout = field(default_factory=StageDropout)

    def _where(self) -> str:
        return f"[[fleet.classes]] {getattr(self, 'name', '?')!r}"

    def _check(self) -> None:
        self._require("name", bool(self.name.strip()), "must be non-empty")
        self._require("fraction", 0.0 <= self.fraction <= 1.0, "must be in [0, 1]")
        self._require("compute_speed", 0.0 < self.compute_speed < math.inf, "must be > 0 and finite")
        self._require("memory_bytes", self.memory_bytes > 0, "must be > 0")
        self._require("uplink_bps", 0.0 < self.uplink_bps < math.inf, "must be > 0 and finite")
        self._require("downlink_bps", 0.0 < self.downlink_bps < math.inf, "must be > 0 and finite")
        self._require("availability", 0.0 < self.availability <= 1.0, "must be in (0, 1]")


#: The fast class of the ``stragglers = s`` shorthand (a mid-range phone's training share).
FAST_CLASS = DeviceClass(
    name="fast",
    fraction=1.0,
    compute_speed=1.0,
    memory_bytes=64 * MiB,
    uplink_bps=2_000_000.0,
    downlink_bps=10_000_000.0,
    availability=0.9,
    dropout=StageDropout(train=0.01, advertise=0.005, share=0.005, upload=0.01, consistency=0.005, unmask=0.005),
)

#: The straggler class of the shorthand: 10x slower, 32x less memory, 20x less
#: bandwidth, online half the time, and several times likelier to drop out.
STRAGGLER_CLASS = DeviceClass(
    name="straggler",
    fraction=0.0,
    compute_speed=0.1,
    memory_bytes=2 * MiB,
    uplink_bps=100_000.0,
    downlink_bps=500_000.0,
    availability=0.5,
    dropout=StageDropout(train=0.1, advertise=0.02, share=0.02, upload=0.05, consistency=0.02, unmask=0.02),
)


def shorthand_classes(stragglers: float, straggler_memory_bytes: int = STRAGGLER_CLASS.memory_bytes
                      ) -> tuple[DeviceClass, ...]:
    """Expand ``stragglers = s`` into ``fast`` (fraction 1-s) and ``straggler`` (s), the
    straggler class holding ``straggler_memory_bytes``.

    ``s = 0`` gives the fast class alone.
    """
    if not 0.0 <= stragglers < 1.0:
        raise ConfigError(f"[fleet] stragglers: must be in [0, 1), got {stragglers!r}")
    fast = dataclasses.replace(FAST_CLASS, fraction=1.0 - stragglers)
    if stragglers == 0.0:
        return (fast,)
    return (fast, dataclasses.replace(STRAGGLER_CLASS, fraction=stragglers, memory_bytes=straggler_memory_bytes))


# --------------------------------------------------------------------------------------
# sections


@dataclass(frozen=True)
class RunConfig(Section):
    SECTION: ClassVar[str] = "run"

    strategy: Literal["ftte", "fedbuff", "fedavg"] = "ftte"
    seed: int = 0
    target_accuracy: float = 0.5
    max_versions: int = 0
    max_virtual_time_s: float = 36_000.0
    backend: Literal["local", "ray"] = "local"
    ray_address: str = ""
    ray_workers: int = 0
    keep_versions: int = 10

    def _check(self) -> None:
        self._require("seed", self.seed >= 0, "must be >= 0")
        self._require("ray_workers", self.ray_workers >= 0, "must be >= 0 (0 = one per CPU)")
        self._require("keep_versions", self.keep_versions >= 0, "must be >= 0 (0 = keep every version)")
        self._require("target_accuracy", 0.0 < self.target_accuracy <= 1.0, "must be in (0, 1]")
        self._require("max_versions", self.max_versions >= 0, "must be >= 0 (0 = no limit)")
        self._require("max_virtual_time_s", self.max_virtual_time_s > 0.0, "must be > 0")


@dataclass(frozen=True)
class DataConfig(Section):
    SECTION: ClassVar[str] = "data"

    name: Literal["digits", "mnist", "breast_cancer", "synthetic", "csv", "npz"] = "mnist"
    path: str = ""
    target: str = ""
    partition: Literal["iid", "dirichlet"] = "dirichlet"
    alpha: float = 0.5
    test_fraction: float = 0.2
    min_samples_per_device: int = 2
    standardize: bool = True
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    synthetic_samples: int = 50
    synthetic_sigma: float = 1.0
    calibration_fraction: float = 0.05
    eval_samples: int = 20_000

    def _check(self) -> None:
        self._require("eval_samples", self.eval_samples >= 0, "must be >= 0 (0 = the whole held-out set)")
        self._require("calibration_fraction", 0.0 <= self.calibration_fraction < 0.5, "must be in [0, 0.5)")
        self._require("alpha", 0.0 < self.alpha < math.inf, "must be > 0 and finite")
        self._require("test_fraction", 0.0 < self.test_fraction < 1.0, "must be in (0, 1)")
        self._require("min_samples_per_device", self.min_samples_per_device >= 1, "must be >= 1")
        self._require("synthetic_alpha", 0.0 <= self.synthetic_alpha < math.inf, "must be >= 0 and finite")
        self._require("synthetic_beta", 0.0 <= self.synthetic_beta < math.inf, "must be >= 0 and finite")
        self._require("synthetic_samples", self.synthetic_samples >= 1, "must be >= 1")
        self._require("synthetic_sigma", 0.0 <= self.synthetic_sigma <= 4.0, "must be in [0, 4]")
        if self.name in ("csv", "npz") and not self.path:
            _fail(self._where(), "path", f"is required when name = {self.name!r}")
        if self.name == "csv" and not self.target:
            _fail(self._where(), "target", "is required when name = 'csv' (the label column's header)")


@dataclass(frozen=True)
class ModelConfig(Section):
    SECTION: ClassVar[str] = "model"

    name: str = "cnn28"

    def _check(self) -> None:
        if self.name not in BUILTIN_MODELS and not _FACTORY_RE.match(self.name):
            _fail(
                self._where(),
                "name",
                f"must be one of {', '.join(map(repr, BUILTIN_MODELS))} or 'package.module:factory', got {self.name!r}",
            )


@dataclass(frozen=True)
class TrainConfig(Section):
    SECTION: ClassVar[str] = "train"

    local_steps: int = 2
    batch_size: int = 16
    lr: float = 1.0
    memory_budget_fraction: float = 0.5
    clipping: Literal["per_sample", "ghost", "auto"] = "auto"
    max_coordinates: int = 0

    def _check(self) -> None:
        self._require("max_coordinates", self.max_coordinates >= 0, "must be >= 0 (0 = no cap)")
        self._require("local_steps", self.local_steps >= 1, "must be >= 1")
        self._require("batch_size", self.batch_size >= 1, "must be >= 1")
        self._require("lr", 0.0 < self.lr < math.inf, "must be > 0 and finite")
        self._require("memory_budget_fraction", 0.0 < self.memory_budget_fraction <= 1.0, "must be in (0, 1]")

    def settings(self, clipping: str | None = None) -> Any:
        """The device trainer's settings (:class:`~ftte.edge.runtime.TrainSettings`) from this section;
        ``clipping`` is the mode the plan search chose when this section says ``"auto"``."""
        from ftte.edge.runtime import TrainSettings

        mode = clipping or (self.clipping if self.clipping != "auto" else "per_sample")
        return TrainSettings(self.local_steps, self.batch_size, self.lr, mode)


@dataclass(frozen=True)
class PrivacyConfig(Section):
    SECTION: ClassVar[str] = "privacy"

    enabled: bool = True
    noise_multiplier: float = 1.5
    max_grad_norm: float = 1.0
    delta: float = 0.0
    epsilon_max: float = 10.0
    accountant: Literal["prv", "rdp"] = "rdp"
    target_epsilon: float = 10.0
    planned_rounds: int = 10
    min_noise_multiplier: float = 0.5
    unit: Literal["example", "user"] = "example"
    user_noise: Literal["distributed", "server"] = "distributed"
    user_epsilon: float = 8.0
    user_delta: float = 1e-6
    user_participations: int = 8
    user_noise_ratio: float = 3.5

    def _check(self) -> None:
        self._require("noise_multiplier", 0.0 <= self.noise_multiplier < math.inf, "must be >= 0 and finite")
        if self.enabled and not self.target_epsilon:
            self._require("noise_multiplier", self.noise_multiplier > 0.0, "must be > 0 when privacy is enabled")
        self._require("max_grad_norm", 0.0 < self.max_grad_norm < math.inf, "must be > 0 and finite")
        self._require("delta", 0.0 <= self.delta < 1.0,
                      "must be in [0, 1) (0 = auto: min(1e-5, 1/(10 n)) for a device holding n records; "
                      "a delta of 1/n or more is refused where n is known)")
        self._require("epsilon_max", self.epsilon_max > 0.0, "must be > 0 (inf = unlimited)")
        self._require("target_epsilon", 0.0 <= self.target_epsilon <= self.epsilon_max,
                      "must be in [0, epsilon_max] (0 = use noise_multiplier as given)")
        self._require("planned_rounds", self.planned_rounds >= 0, "must be >= 0")
        if self.target_epsilon and not self.planned_rounds:
            _fail(self._where(), "planned_rounds", "is required (>= 1) when target_epsilon is set")
        self._require("min_noise_multiplier", 0.0 < self.min_noise_multiplier < math.inf, "must be > 0 and finite")
        self._require("user_epsilon", 0.0 < self.user_epsilon < math.inf, "must be > 0 and finite")
        self._require("user_delta", 0.0 < self.user_delta <= 1e-5, "must be in (0, 1e-5]")
        self._require("user_participations", self.user_participations >= 1, "must be >= 1")
        self._require("user_noise_ratio", self.user_noise_ratio > 0.0, "must be > 0 (inf = no cap)")
        if self.enabled and not self.target_epsilon:
            self._require("noise_multiplier", self.noise_multiplier >= self.min_noise_multiplier,
                          f"must be >= min_noise_multiplier ({self.min_noise_multiplier})")

    @property
    def user_level(self) -> bool:
        return self.enabled and self.unit == "user"

    def user_noise_multiplier(self) -> float:
        """The multiplier each participation is charged at so that ``user_participations`` of them
        spend at most ``user_epsilon`` at ``user_delta`` (unit = "user")."""
        from ftte.privacy.distributed_dp import multiplier_for_budget

        return multiplier_for_budget(self.user_epsilon, self.user_delta, self.user_participations)

    def dp_config(self) -> Any:
        """The device trainer's DP settings (:class:`~ftte.privacy.dpsgd.DPConfig`) from this section.
        With ``unit = "user"`` the noise is added to the cohort's sum, not per example: DP-SGD is off."""
        from ftte.privacy.dpsgd import DPConfig

        target = self.target_epsilon or None
        return DPConfig(enabled=self.enabled and not self.user_level, noise_multiplier=self.noise_multiplier,
                        max_grad_norm=self.max_grad_norm, delta=self.delta or None, accountant=self.accountant,
                        epsilon_max=self.epsilon_max, target_epsilon=target,
                        planned_rounds=self.planned_rounds if target else None,
                        min_noise_multiplier=self.min_noise_multiplier)

    def policy(self) -> Any:
        """The operator's policy (:class:`~ftte.privacy.policy.PrivacyPolicy`) the server enforces and records."""
        from ftte.privacy.policy import PrivacyPolicy

        if self.user_level:
            return PrivacyPolicy(delta=self.user_delta, epsilon_cap=self.user_epsilon,
                                 min_noise_multiplier=self.user_noise_multiplier(), accountant="rdp", unit="user")
        cap = self.epsilon_max if math.isfinite(self.epsilon_max) else 1e6
        return PrivacyPolicy(delta=self.delta or 1e-5, epsilon_cap=cap, min_noise_multiplier=self.min_noise_multiplier,
                             accountant=self.accountant)


@dataclass(frozen=True)
class SecAggConfig(Section):
    SECTION: ClassVar[str] = "secagg"

    enabled: bool = True
    graph: Literal["full", "ring"] = "full"
    neighbors: int = 4
    threshold: int = 0
    clip: float = 10.0
    value_bits: int = 12
    max_corrupt: int = 1

    def _check(self) -> None:
        self._require("max_corrupt", self.max_corrupt >= 0, "must be >= 0")
        self._require("neighbors", self.neighbors >= 2 and self.neighbors % 2 == 0, "must be even and >= 2")
        self._require("threshold", self.threshold >= 0, "must be >= 0 (0 = auto)")
        self._require("clip", 0.0 < self.clip < math.inf, "must be > 0 and finite")
        self._require("value_bits", 2 <= self.value_bits <= 31, "must be in [2, 31]")

    def effective_threshold(self, cohort_size: int) -> int:
        """The survivor threshold T in force for a cohort of ``cohort_size`` members.

        ``threshold = 0`` means ``floor((K + max_corrupt)/2) + 1``: the smallest strict
        majority of the cohort plus the members that may collude with the server, on either
        graph, so that any two survivor lists honest members sign share an honest signer and
        the server can never gather both share kinds that unmask one member. (On the ring,
        the per-member share threshold is a strict majority of its ``neighbors + 1``
        holders, derived by the protocol.)
        """
        return self.threshold if self.threshold else (cohort_size + self.max_corrupt) // 2 + 1


@dataclass(frozen=True)
class ServerConfig(Section):
    SECTION: ClassVar[str] = "server"

    buffer_size: int = 10
    deadline_s: float = 600.0
    lr: float = 1.0
    momentum: float = 0.0
    staleness_exponent: float = 0.5
    variance_penalty: float = 1.0
    r_min: float = 0.25
    fedavg_clients_per_round: int = 10
    fedavg_over_selection: float = 0.3
    fedavg_deadline_s: float = 0.0
    fedavg_fit_only: bool = False

    def _check(self) -> None:
        self._require("buffer_size", self.buffer_size >= 1, "must be >= 1")
        self._require("deadline_s", 0.0 < self.deadline_s, "must be > 0 (inf = no deadline)")
        self._require("lr", 0.0 < self.lr < math.inf, "must be > 0 and finite")
        self._require("momentum", 0.0 <= self.momentum < 1.0, "must be in [0, 1)")
        self._require("staleness_exponent", 0.0 <= self.staleness_exponent < math.inf, "must be >= 0 and finite")
        self._require("variance_penalty", 0.0 <= self.variance_penalty < math.inf, "must be >= 0 and finite")
        self._require("r_min", 0.0 < self.r_min <= 1.0, "must be in (0, 1]")
        self._require("fedavg_clients_per_round", self.fedavg_clients_per_round >= 1, "must be >= 1")
        self._require("fedavg_over_selection", 0.0 <= self.fedavg_over_selection <= 10.0, "must be in [0, 10]")
        self._require("fedavg_deadline_s", 0.0 <= self.fedavg_deadline_s, "must be >= 0 (0 = wait for all)")

    def fedavg_selected(self) -> int:
        """Devices FedAvg selects per round: ``ceil(clients * (1 + over_selection))``."""
        return math.ceil(self.fedavg_clients_per_round * (1.0 + self.fedavg_over_selection) - 1e-9)


@dataclass(frozen=True)
class FleetConfig(Section):
    SECTION: ClassVar[str] = "fleet"

    devices: int = 100
    stragglers: float = 0.9
    straggler_memory_bytes: int = 8 * MiB
    latency_s: float = 0.05
    classes: tuple[DeviceClass, ...] = ()

    def _check(self) -> None:
        self._require("devices", self.devices >= 1, "must be >= 1")
        self._require("stragglers", 0.0 <= self.stragglers < 1.0, "must be in [0, 1)")
        self._require("straggler_memory_bytes", self.straggler_memory_bytes >= 1, "must be >= 1")
        self._require("latency_s", 0.0 <= self.latency_s < math.inf, "must be >= 0 and finite")
        if self.classes:
            names = [c.name for c in self.classes]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                _fail(self._where(), "classes", f"class names must be unique, repeated: {', '.join(dup)}")
            total = math.fsum(c.fraction for c in self.classes)
            if abs(total - 1.0) > FRACTION_TOLERANCE:
                _fail(
                    self._where(),
                    "classes",
                    f"fractions must sum to 1 (within {FRACTION_TOLERANCE:g}), got {total:.6g} from "
                    + ", ".join(f"{c.name}={c.fraction:g}" for c in self.classes),
                )

    def device_classes(self) -> tuple[DeviceClass, ...]:
        """The explicit ``[[fleet.classes]]`` if any, else the ``stragglers`` shorthand."""
        return self.classes if self.classes else shorthand_classes(self.stragglers, self.straggler_memory_bytes)


# --------------------------------------------------------------------------------------
# the whole configuration

_SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "privacy": PrivacyConfig,
    "secagg": SecAggConfig,
    "server": ServerConfig,
    "fleet": FleetConfig,
}


@dataclass(frozen=True)
class Config:
    """A whole run configuration; see ``default.toml`` for every key's meaning."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, _build(cls, value, f"[{name}]"))
            elif not isinstance(value, cls):
                raise ConfigError(f"[{name}]: expected {cls.__name__} or a table, got {_type_name(value)}")
        self._cross_checks()

    # cross-field checks ------------------------------------------------------------------
    @property
    def cohort_size(self) -> int:
        """Members of one aggregation cohort: the buffer size K for ftte/fedbuff, the
        per-round client count for fedavg."""
        if self.run.strategy == "fedavg":
            return self.server.fedavg_clients_per_round
        return self.server.buffer_size

    @property
    def secagg_threshold(self) -> int:
        """The Shamir threshold in force for this configuration's cohorts."""
        return self.secagg.effective_threshold(self.cohort_size)

    def _cross_checks(self) -> None:
        """Rules between sections that hold in every mode (simulation and deployment)."""
        p = self.privacy
        if p.user_level:
            if p.user_noise == "distributed" and not self.secagg.enabled:
                raise ConfigError("[privacy] user_noise: 'distributed' noise lives inside the masked sum; "
                                  "enable [secagg] or use 'server' (a trusted server adds it)")
            if self.run.strategy == "ftte" and self.server.variance_penalty != 0.0:
                raise ConfigError("[server] variance_penalty: must be 0 with [privacy] unit = 'user' (the weight "
                                  "is public there, so it may depend on staleness only)")
        if not self.secagg.enabled:
            return
        k = self.cohort_size
        what = "fedavg_clients_per_round" if self.run.strategy == "fedavg" else "buffer_size"
        # k quantized values of value_bits must sum inside a 32-bit ring without wrapping
        if k * (2 ** (self.secagg.value_bits - 1) - 1) > 2**31 - 1:
            raise ConfigError(
                f"[secagg] value_bits: {k} values of {self.secagg.value_bits} bits can overflow a 32-bit ring "
                f"([server] {what} = {k}); lower value_bits"
            )
        if k < 2:
            raise ConfigError(f"[server] {what}: secure aggregation needs a cohort of >= 2, got {k}")
        sa = self.secagg
        if sa.graph == "ring" and sa.neighbors >= k:
            raise ConfigError(
                f"[secagg] neighbors: must be < the cohort size ([server] {what} = {k}) on the ring graph, "
                f"got {sa.neighbors}; use graph = 'full' for small cohorts"
            )
        if sa.max_corrupt >= k:
            raise ConfigError(f"[secagg] max_corrupt: must be < the cohort size ([server] {what} = {k})")
        t = sa.effective_threshold(k)
        label = f"threshold (in force: {t}{', auto' if sa.threshold == 0 else ''})"
        if t < 2:
            raise ConfigError(f"[secagg] {label}: must be >= 2")
        if t > k:
            raise ConfigError(f"[secagg] {label}: must be <= the cohort size ([server] {what} = {k})")
        if 2 * t <= k + sa.max_corrupt:
            raise ConfigError(
                f"[secagg] {label}: must be > half of the cohort ([server] {what} = {k}) plus max_corrupt "
                f"({sa.max_corrupt}) so that the server, even with colluding members, can never reconstruct "
                "both the self-mask and the mask keys that unmask one member"
            )

    def check_simulation(self) -> "Config":
        """Rules that only a simulated fleet can break (a deployment's fleet is its allow-list)."""
        devices = self.fleet.devices
        if self.server.buffer_size > devices:
            raise ConfigError(
                f"[server] buffer_size: must be <= [fleet] devices ({devices}), got {self.server.buffer_size}"
            )
        if self.run.strategy == "fedavg" and self.server.fedavg_selected() > devices:
            raise ConfigError(
                f"[server] fedavg_clients_per_round: {self.server.fedavg_clients_per_round} clients with "
                f"fedavg_over_selection {self.server.fedavg_over_selection:g} select {self.server.fedavg_selected()} "
                f"devices per round, more than [fleet] devices ({devices})"
            )
        return self

    # conversions -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, mode: Mode = "simulation") -> "Config":
        """Strictly build a configuration from nested mappings (e.g. parsed TOML).

        In ``"deployment"`` mode the simulation-only sections (``[data]``, ``[fleet]``) are
        refused and the rules about a simulated fleet are not applied.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"configuration: expected a table, got {_type_name(data)}")
        sections: dict[str, Any] = {}
        for name, value in data.items():
            if name not in _SECTIONS:
                _unknown("section", f"[{name}]", "configuration", [f"[{s}]" for s in _SECTIONS])
            if mode == "deployment" and name in SIMULATION_ONLY:
                raise ConfigError(f"[{name}] describes a simulated fleet and is not used by `ftte server`")
            sections[name] = _build(_SECTIONS[name], value, f"[{name}]")
        cfg = cls(**sections)
        return cfg.check_simulation() if mode == "simulation" else cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, not tuples) that :meth:`from_dict` reads back."""
        return _plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=True)

    def to_toml(self) -> str:
        """TOML text that :func:`parse_config` reads back to an equal configuration."""
        lines: list[str] = []
        for name in _SECTIONS:
            section = getattr(self, name)
            lines.append(f"[{name}]")
            tables: list[tuple[str, tuple]] = []
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                if isinstance(value, tuple):
                    tables.append((f.name, value))
                else:
                    lines.append(f"{f.name} = {_toml_value(value)}")
            for key, items in tables:
                for item in items:
                    lines.append("")
                    lines.append(f"[[{name}.{key}]]")
                    for g in dataclasses.fields(item):
                        lines.append(f"{g.name} = {_toml_value(getattr(item, g.name))}")
            lines.append("")
        return "\n".join(lines)

    def with_overrides(self, **overrides: Any) -> "Config":
        """A copy with some values replaced, validated like a loaded file.

        Keys are either a section name with a (partial) mapping, ``run={"seed": 3}``, or a
        dotted ``"section.key"``, ``**{"server.buffer_size": 20}``. ``fleet.classes``
        takes a list of class tables and replaces the list.
        """
        data = self.to_dict()
        for key, value in overrides.items():
            if "." in key:
                section, _, sub = key.partition(".")
                if section not in _SECTIONS:
                    _unknown("section", f"[{section}]", f"override {key!r}", [f"[{s}]" for s in _SECTIONS])
                allowed = _allowed_keys(_SECTIONS[section])
                if sub not in allowed:
                    _unknown("key", sub, f"[{section}]", allowed)
                data[section][sub] = _plain(dataclasses.asdict(value)) if dataclasses.is_dataclass(value) else value
            else:
                if key not in _SECTIONS:
                    _unknown("section", f"[{key}]", f"override {key!r}", [f"[{s}]" for s in _SECTIONS])
                if dataclasses.is_dataclass(value):
                    data[key] = _plain(dataclasses.asdict(value))
                elif isinstance(value, Mapping):
                    data[key].update(value)
                else:
                    raise ConfigError(f"override {key}: expected a mapping or a section object, got {_type_name(value)}")
        return Config.from_dict(data)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    return value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if dataclasses.is_dataclass(value):
        inner = ", ".join(f"{f.name} = {_toml_value(getattr(value, f.name))}" for f in dataclasses.fields(value))
        return "{ " + inner + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


# --------------------------------------------------------------------------------------
# loading


def parse_config(text: str, *, base_dir: str | Path | None = None, source: str = "<string>",
                 mode: Mode = "simulation") -> Config:
    """Parse TOML text into a :class:`Config`; missing keys take their defaults.

    A relative ``[data] path`` is resolved against ``base_dir`` when given.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    data = raw.get("data")
    if base_dir is not None and isinstance(data, dict) and isinstance(data.get("path"), str) and data["path"]:
        p = Path(data["path"]).expanduser()
        if not p.is_absolute():
            data["path"] = str((Path(base_dir) / p).resolve())
    try:
        return Config.from_dict(raw, mode=mode)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def preset_names() -> list[str]:
    """Names of the packaged presets (``pipeline/presets/<name>.toml``)."""
    folder = importlib.resources.files("ftte.pipeline").joinpath("presets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _preset_text(name: str) -> str:
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(preset_names())}")
    return importlib.resources.files("ftte.pipeline").joinpath("presets", f"{name}.toml").read_text(encoding="utf-8")


def _layer(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``top``'s keys replacing its keys section by section (a list replaces a list)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, table in top.items():
        if isinstance(table, Mapping) and isinstance(out.get(section), dict):
            out[section].update(table)
        else:
            out[section] = table
    return out


def load_config(path: str | Path | None = None, *, preset: str | None = None) -> Config:
    """Load a configuration file, or the packaged ``default.toml`` when ``path`` is None.

    Keys missing from a user's file take the defaults (which equal ``default.toml``), or
    those of the packaged ``preset`` when one is named: a preset is a partial file whose
    keys replace the defaults' (``load_config(None, preset="digits")`` is the quick digits
    scenario). A relative ``[data] path`` is resolved against the directory of the file.
    """
    if preset is not None:
        try:
            raw = tomllib.loads(_preset_text(preset))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"preset {preset}: invalid TOML: {exc}") from None
        base = _layer(load_config(None).to_dict(), raw)
        try:
            cfg = Config.from_dict(base)
        except ConfigError as exc:
            raise ConfigError(f"preset {preset}: {exc}") from None
        if path is None:
            return cfg
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        user = parse_config(p.read_text(encoding="utf-8"), base_dir=p.parent, source=str(p))
        try:
            top = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:  # pragma: no cover - parse_config refused it already
            raise ConfigError(f"{p}: invalid TOML: {exc}") from None
        if isinstance(top.get("data"), dict) and top["data"].get("path"):
            top["data"]["path"] = user.data.path  # resolved against the file's folder
        return Config.from_dict(_layer(cfg.to_dict(), top))
    if path is None:
        text = importlib.resources.files("ftte.pipeline").joinpath("default.toml").read_text(encoding="utf-8")
        return parse_config(text, source="default.toml")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    return parse_config(p.read_text(encoding="utf-8"), base_dir=p.parent, source=str(p))


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Turn CLI-style ``section.key=value`` strings into :meth:`Config.with_overrides`
    keywords. Values are read as TOML values (``20``, ``0.5``, ``true``, ``"x"``,
    ``[..]``); anything that is not valid TOML is taken as a bare string.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        text = text.strip()
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        out[key] = value
    return out
