"""Configuration of a real deployment (``ftte server --config FILE.toml``): typed, frozen, strict.

The file holds the run sections the simulator already understands (``[run]``,
``[model]``, ``[train]``, ``[privacy]``, ``[secagg]``, ``[server]``; parsed by
:mod:`ftte.pipeline.config`, so a key means the same thing in a simulation and in a
deployment) plus two sections of its own:

``[http]``: the listener: ``host``, ``port``, ``tls_cert``/``tls_key`` (PEM files;
required unless ``plaintext = true``, which exists for local experiments only),
``max_request_bytes`` (every request except a secure-aggregation upload, whose limit is
derived from the plan), ``clock_skew_s`` (accepted distance between a request's timestamp
and the server clock), ``rate_per_s`` / ``rate_burst`` (per-device token bucket) and
``poll_wait_s`` (how long a long poll waits for news).

``[deploy]``: ``state`` (the SQLite file: model versions, cohorts, journal and the
privacy ledger), ``ledger_key`` (the ledger writer's Ed25519 key file, created if
missing), ``allow_list`` (one hex Ed25519 public key per line; ``#`` starts a comment),
``input_shape`` and ``num_classes`` (what the model is built for), ``trainable_layers``
(top-level layer names of the plan; empty = the whole model), ``test_data`` (optional
``.npz`` with ``x`` and ``y`` the server evaluates every version on),
``stage_timeout_s`` (how long a protocol stage waits for slow members),
``max_staleness`` (versions a device may lag when it joins) and ``synchronous``:
``"full"`` (default) fsyncs every commit, so an acknowledged message survives even a power
cut; ``"normal"`` (SQLite WAL) survives any crash of the server process, ``SIGKILL``
included, but may lose the last commits on a power cut or kernel crash, for a multiple of
the upload throughput on slow disks.

``[data]`` and ``[fleet]`` describe a simulated fleet and are refused here. Relative
paths are resolved against the configuration file's directory. Unknown keys, wrong
types and out-of-range values raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomllib
from ftte.pipeline.config import Config, ConfigError

SIMULATION_ONLY = ("data", "fleet")


def _check_fields(obj: Any, section: str) -> None:
    """Type-check a frozen dataclass's fields against their annotations (ints widen to floats)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        where = f"[{section}] {f.name}"
        if tp is bool:
            ok = isinstance(value, bool)
        elif tp is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif tp is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                object.__setattr__(obj, f.name, float(value))
                ok = not math.isnan(float(value))
        elif tp is str:
            ok = isinstance(value, str)
        elif typing.get_origin(tp) is tuple:
            inner = typing.get_args(tp)[0]
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(v, inner) and not isinstance(v, bool) for v in value)
            if ok:
                object.__setattr__(obj, f.name, tuple(value))
        else:  # pragma: no cover - programming error
            raise TypeError(f"unsupported annotation {tp!r} for {where}")
        if not ok:
            raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _require(section: str, key: str, ok: bool, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"[{section}] {key}: {rule}, got {value!r}")


@dataclass(frozen=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8443
    tls_cert: str = ""
    tls_key: str = ""
    plaintext: bool = False
    max_request_bytes: int = 64 * 1024
    clock_skew_s: float = 60.0
    rate_per_s: float = 20.0
    rate_burst: int = 40
    poll_wait_s: float = 10.0

    def __post_init__(self) -> None:
        _check_fields(self, "http")
        _require("http", "port", 0 <= self.port <= 65535, "must be in [0, 65535]", self.port)
        if not self.plaintext and not (self.tls_cert and self.tls_key):
            raise ConfigError("[http] tls_cert and tls_key are required (set plaintext = true only for local tests)")
        _require("http", "max_request_bytes", 1024 <= self.max_request_bytes <= 64 << 20,
                 "must be in [1 KiB, 64 MiB]", self.max_request_bytes)
        _require("http", "clock_skew_s", 1.0 <= self.clock_skew_s <= 3600.0, "must be in [1, 3600]", self.clock_skew_s)
        _require("http", "rate_per_s", 0.0 < self.rate_per_s < math.inf, "must be > 0 and finite", self.rate_per_s)
        _require("http", "rate_burst", self.rate_burst >= 1, "must be >= 1", self.rate_burst)
        _require("http", "poll_wait_s", 0.0 <= self.poll_wait_s <= 120.0, "must be in [0, 120]", self.poll_wait_s)


@dataclass(frozen=True)
class DeploySettings:
    state: str = "ftte-server.db"
    ledger_key: str = "ledger.key"
    allow_list: str = "devices.txt"
    input_shape: tuple[int, ...] = (64,)
    num_classes: int = 10
    trainable_layers: tuple[str, ...] = ()
    test_data: str = ""
    stage_timeout_s: float = 30.0
    max_staleness: int = 50
    synchronous: str = "full"

    def __post_init__(self) -> None:
        _check_fields(self, "deploy")
        _require("deploy", "synchronous", self.synchronous in ("full", "normal"), "must be 'full' or 'normal'",
                 self.synchronous)
        _require("deploy", "input_shape", len(self.input_shape) >= 1 and all(s >= 1 for s in self.input_shape),
                 "must be a non-empty list of positive integers", self.input_shape)
        _require("deploy", "num_classes", self.num_classes >= 2, "must be >= 2", self.num_classes)
        _require("deploy", "stage_timeout_s", 0.1 <= self.stage_timeout_s <= 3600.0, "must be in [0.1, 3600]",
                 self.stage_timeout_s)
        _require("deploy", "max_staleness", self.max_staleness >= 0, "must be >= 0", self.max_staleness)
        for key in ("state", "ledger_key", "allow_list"):
            _require("deploy", key, bool(getattr(self, key)), "must not be empty", getattr(self, key))


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``ftte server`` needs; build it with :func:`load_server_config`."""

    run: Config
    http: HttpSettings
    deploy: DeploySettings
    base_dir: Path

    def path(self, value: str) -> Path:
        """A configured path, relative ones resolved against the configuration file's directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)


def _section(cls: type, raw: Any, name: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{name}]: expected a table, got {raw!r}")
    allowed = [f.name for f in fields(cls)]
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"[{name}]: unknown key {key!r}; allowed keys: {', '.join(allowed)}")
    return cls(**dict(raw))


def parse_server_config(text: str, *, base_dir: str | Path = ".", source: str = "<string>") -> ServerSettings:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    for name in SIMULATION_ONLY:
        if name in raw:
            raise ConfigError(f"{source}: [{name}] describes a simulated fleet and is not used by `ftte server`")
    try:
        http = _section(HttpSettings, raw.pop("http", None), "http")
        deploy = _section(DeploySettings, raw.pop("deploy", None), "deploy")
        # The run config cross-checks the buffer against a fleet size; a deployment's fleet
        # is its allow-list, checked when the server starts.
        k = raw.get("server", {}).get("buffer_size", 10) if isinstance(raw.get("server"), Mapping) else 10
        raw["fleet"] = {"devices": max(100, k) if isinstance(k, int) else 100}
        run = Config.from_dict(raw)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if run.run.strategy == "fedavg":
        raise ConfigError(f"{source}: [run] strategy: a deployment is buffered; use 'ftte' or 'fedbuff'")
    if not run.secagg.enabled:
        raise ConfigError(f"{source}: [secagg] enabled: a deployment always aggregates securely")
    if run.server.buffer_size < 2:
        raise ConfigError(f"{source}: [server] buffer_size: a secure-aggregation cohort needs >= 2 members")
    return ServerSettings(run, http, deploy, Path(base_dir).resolve())


def load_server_config(path: str | Path) -> ServerSettings:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    return parse_server_config(p.read_text(encoding="utf-8"), base_dir=p.parent, source=str(p))


def load_allow_list(path: Path) -> dict[bytes, str]:
    """``{public key: label}`` from a file of ``HEX [label]`` lines; ``#`` starts a comment."""
    if not path.is_file():
        raise ConfigError(f"[deploy] allow_list: file not found: {path}")
    keys: dict[bytes, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        hexkey, _, label = line.partition(" ")
        try:
            key = bytes.fromhex(hexkey)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ConfigError(f"{path}:{lineno}: expected a 64-digit hex Ed25519 public key, got {hexkey!r}")
        keys[key] = label.strip()
    if not keys:
        raise ConfigError(f"{path}: the allow-list admits no device")
    return keys
