"""Configuration of a real deployment (``ftte server --config FILE.toml``): typed, frozen, strict.

The file holds the run sections the simulator already understands (``[run]``,
``[model]``, ``[train]``, ``[privacy]``, ``[secagg]``, ``[server]``; parsed by
:mod:`ftte.pipeline.config`, so a key means the same thing in a simulation and in a
deployment) plus two sections of its own:

``[http]``: the listener: ``host``, ``port``, ``tls_cert``/``tls_key`` (PEM files;
required unless ``plaintext = true``, which exists for local experiments only),
``max_request_bytes`` (every request except a secure-aggregation upload, whose limit is
derived from the plan), ``clock_skew_s`` (accepted distance between a request's timestamp
and the server clock), ``rate_per_s`` / ``rate_burst`` (per-device token bucket),
``poll_wait_s`` (how long a long poll waits for news) and ``metrics`` (serve
``GET /v1/metrics`` in the Prometheus text format; off by default, as it reveals load and
timing to anyone who can reach the port).

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

``keep_versions`` (default 100; 0 keeps every version): the state file keeps the weights of
the newest ``max(keep_versions, max_staleness + 1)`` versions; each commit deletes older ones
in its own transaction, so resuming (the latest version) and joins that may still cite an
older base (up to ``max_staleness`` behind) always find theirs;
cohort records, history rows and the ledger are never pruned, so ``ftte audit`` is unaffected.

``standardize`` says who standardises features: ``"none"`` (default: devices train on their
records as given, so the app must preprocess them exactly as the model expects),
``"file"`` (``feature_stats`` names an ``.npz`` with ``mean`` and ``std``, one value per
feature of the flattened record or one value for all) or ``"test_data"`` (the statistics
of ``test_data``'s raw ``x``). With ``"file"`` or ``"test_data"`` the task carries the
statistics, every device computes ``(x - mean) / std`` on its raw records before training,
and the server evaluates ``test_data`` standardised the same way. A zero ``std`` counts as 1.

``[data]`` and ``[fleet]`` describe a simulated fleet and are refused here. Relative
paths are resolved against the configuration file's directory. Every section, these two
included, goes through the one strict engine of :mod:`ftte.pipeline.config`: unknown keys
(with a suggestion), wrong types and out-of-range values raise :class:`ConfigError`
naming the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import tomllib
from ftte.pipeline.config import Config, ConfigError, Section, build_section

DEPLOYMENT_SECTIONS = ("http", "deploy")


@dataclass(frozen=True)
class HttpSettings(Section):
    SECTION: ClassVar[str] = "http"

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
    metrics: bool = False

    def _check(self) -> None:
        self._require("port", 0 <= self.port <= 65535, "must be in [0, 65535]")
        if not self.plaintext and not (self.tls_cert and self.tls_key):
            raise ConfigError("[http] tls_cert and tls_key are required (set plaintext = true only for local tests)")
        self._require("max_request_bytes", 1024 <= self.max_request_bytes <= 64 << 20, "must be in [1 KiB, 64 MiB]")
        self._require("clock_skew_s", 1.0 <= self.clock_skew_s <= 3600.0, "must be in [1, 3600]")
        self._require("rate_per_s", 0.0 < self.rate_per_s < math.inf, "must be > 0 and finite")
        self._require("rate_burst", self.rate_burst >= 1, "must be >= 1")
        self._require("poll_wait_s", 0.0 <= self.poll_wait_s <= 120.0, "must be in [0, 120]")


@dataclass(frozen=True)
class DeploySettings(Section):
    SECTION: ClassVar[str] = "deploy"

    state: str = "ftte-server.db"
    ledger_key: str = "ledger.key"
    allow_list: str = "devices.txt"
    input_shape: tuple[int, ...] = (64,)
    num_classes: int = 10
    trainable_layers: tuple[str, ...] = ()
    test_data: str = ""
    stage_timeout_s: float = 30.0
    max_staleness: int = 50
    synchronous: Literal["full", "normal"] = "full"
    keep_versions: int = 100
    standardize: Literal["none", "file", "test_data"] = "none"
    feature_stats: str = ""

    def _check(self) -> None:
        self._require("input_shape", len(self.input_shape) >= 1 and all(s >= 1 for s in self.input_shape),
                      "must be a non-empty list of positive integers")
        self._require("num_classes", self.num_classes >= 2, "must be >= 2")
        self._require("stage_timeout_s", 0.1 <= self.stage_timeout_s <= 3600.0, "must be in [0.1, 3600]")
        self._require("max_staleness", self.max_staleness >= 0, "must be >= 0")
        for key in ("state", "ledger_key", "allow_list"):
            self._require(key, bool(getattr(self, key)), "must not be empty")
        self._require("keep_versions", self.keep_versions >= 0, "must be >= 0 (0 keeps every version)")
        self._require("feature_stats", self.standardize != "file" or bool(self.feature_stats),
                      "must name an .npz file with mean and std when standardize = \"file\"")
        self._require("test_data", self.standardize != "test_data" or bool(self.test_data),
                      "must be set when standardize = \"test_data\"")

    @property
    def versions_kept(self) -> int:
        """How many versions the state file keeps (0: all): never fewer than a join may cite."""
        return 0 if self.keep_versions == 0 else max(self.keep_versions, self.max_staleness + 1)


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
    return cls() if raw is None else build_section(cls, raw, f"[{name}]")


def parse_server_config(text: str, *, base_dir: str | Path = ".", source: str = "<string>") -> ServerSettings:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    try:
        http = _section(HttpSettings, raw.pop("http", None), "http")
        deploy = _section(DeploySettings, raw.pop("deploy", None), "deploy")
        run = Config.from_dict(raw, mode="deployment")
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if run.privacy.user_level and run.privacy.user_noise != "distributed":
        raise ConfigError(f"{source}: [privacy] user_noise: a deployment masks every update, so its user-level "
                          "noise is 'distributed' (added by the devices inside the masked sum)")
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
