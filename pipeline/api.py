"""The Python API behind ``ftte.simulate``, ``ftte.compare``, ``ftte.audit`` and
``ftte.load_config`` (see those for the documentation). It does what the commands do,
with the same run-folder rules, and returns the summaries instead of printing them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from ftte.pipeline.config import Config, ConfigError, load_config as _load_file


def load_config(config: Config | str | os.PathLike[str] | Mapping[str, Any] | None = None, *,
                preset: str | None = None, **overrides: Any) -> Config:
    if config is None or isinstance(config, (str, os.PathLike)):
        cfg = _load_file(config, preset=preset)
    elif isinstance(config, Config):
        cfg = config
    elif isinstance(config, Mapping):  # nested tables over the packaged defaults (or a preset's)
        cfg = _load_file(None, preset=preset).with_overrides(**{str(k): v for k, v in config.items()})
    else:
        raise ConfigError(f"config: expected a path, a Config or a mapping, got {type(config).__name__}")
    return cfg.with_overrides(**overrides) if overrides else cfg


def _quiet_native_logs() -> None:
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # see ftte.cli.quiet_native_logs


def simulate(config: Any = None, out: str | os.PathLike[str] | None = None, *, preset: str | None = None,
             fresh: bool = False, progress: bool = False, **overrides: Any) -> dict[str, Any]:
    from ftte.pipeline.run_outputs import run_one

    cfg = load_config(config, preset=preset, **overrides)
    _quiet_native_logs()
    result = run_one(cfg, None if out is None else Path(out), quiet=not progress, fresh=fresh)
    return result.summary


def compare(config: Any = None, out: str | os.PathLike[str] | None = None, *,
            strategies: Iterable[str] = ("ftte", "fedbuff", "fedavg"), preset: str | None = None,
            tune: bool = True, fresh: bool = False, progress: bool = False, **overrides: Any) -> dict[str, Any]:
    from ftte.pipeline.compare_cli import STRATEGIES, CompareSettings, compare as run_compare

    names = list(strategies)
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise ValueError(f"unknown strategies {unknown}; choose from {STRATEGIES}")
    cfg = load_config(config, preset=preset, **overrides)
    _quiet_native_logs()
    return run_compare(cfg, None if out is None else Path(out), names, quiet=not progress, fresh=fresh,
                       settings=CompareSettings(tune=tune))


def audit(path: str | os.PathLike[str], *, report: str | os.PathLike[str] | None = None,
          rtol: float = 1e-6, atol: float = 1e-9, expect_public_key: str | None = None,
          expect_head: str | None = None) -> Any:
    from ftte.privacy.audit import verify_ledger, write_report

    ledger = Path(path)
    if ledger.is_dir():
        ledger = ledger / "ledger.db"
    result = verify_ledger(ledger, rtol=rtol, atol=atol, expect_public_key=expect_public_key, expect_head=expect_head)
    if report is not None:
        write_report(result, report)
    return result
