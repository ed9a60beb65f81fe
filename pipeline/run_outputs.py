"""Running a configured simulation into a run folder, and writing its outputs.

Shared by ``ftte simulate``, ``ftte compare`` and the Python API (``ftte.simulate``). A
run folder holds one run: ``ledger.db`` (server state and privacy ledger), its
``config.toml`` and the outputs ``summary.json``, ``history.csv``, ``accuracy.png`` and
``report.md``. Three rules keep results from being lost or mislabelled:

* A folder is resumed only with the configuration it was started with. Keys that only
  extend the run (:data:`EXTENDING_KEYS`) or do not change what it computes
  (:data:`NEUTRAL_KEYS`) may differ; any other difference is refused before anything is
  written (:class:`RunFolderMismatch`), unless the caller asks for a fresh start.
* The summary describes the whole run however many sittings it took: counts come from
  the persisted cohort records, and the per-sitting figures the state does not keep
  (bytes, train rounds, wall time) are saved after every sitting in ``server_meta``
  under :data:`SITTINGS_KEY` and summed.
* An interrupted run (Ctrl-C) saves its sitting and raises :class:`RunInterrupted`, which
  says what is saved and how to resume.
"""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ftte.pipeline.config import Config, ConfigError, load_config, parse_config, parse_overrides

if TYPE_CHECKING:  # the simulator pulls in torch; import it only when a run starts
    from ftte.pipeline.simulator import RunResult, Simulation

#: Keys that only let a resumed run go further (or stop sooner).
EXTENDING_KEYS: frozenset[str] = frozenset({"run.max_versions", "run.max_virtual_time_s"})
#: Keys that do not change what a run computes: the target only labels "time to target"
#: in the summary, and a seeded run gives the same history on either backend.
NEUTRAL_KEYS: frozenset[str] = frozenset({"run.target_accuracy", "run.backend", "run.ray_address", "run.ray_workers",
                                          "run.keep_versions"})

#: Files a run writes into its folder (``--fresh`` removes exactly these; ``server.key``,
#: the server's signing identity, is kept).
RUN_FILES: tuple[str, ...] = (
    "ledger.db", "ledger.db-wal", "ledger.db-shm", "accountants.db", "accountants.db-wal", "accountants.db-shm",
    "config.toml", "summary.json", "history.csv", "accuracy.png", "report.md",
)
#: ``server_meta`` key holding one JSON record per sitting of the run.
SITTINGS_KEY = "cli_sittings"

FRESH_HINT = "use another --out, or pass --fresh to discard it and start over"


class RunFolderMismatch(ConfigError):
    """The output folder holds a run started with a different configuration."""

    def __init__(self, out_dir: Path, differences: list[str]) -> None:
        self.out_dir = out_dir
        self.differences = differences
        super().__init__(
            f"{out_dir} holds a run started with a different configuration "
            f"({'; '.join(differences)}); resume it with its own settings ({out_dir / 'config.toml'}), "
            + FRESH_HINT
        )


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, after what was done has been saved."""

    def __init__(self, out_dir: Path | None, version: int) -> None:
        self.out_dir = out_dir
        self.version = version
        if out_dir is None:
            message = f"interrupted at version {version}; nothing was saved (no output folder)"
        else:
            message = (f"interrupted; versions 1-{version} are saved in {out_dir / 'ledger.db'}; "
                       "run the same command again to resume") if version else (
                f"interrupted before the first version; run the same command again to start over in {out_dir}")
        super().__init__(message)
        self.message = message


# -- configuration ------------------------------------------------------------------------------


def config_from_args(path: str | None, overrides: list[str] | None, preset: str | None = None) -> Config:
    cfg = load_config(path, preset=preset)
    if overrides:
        cfg = cfg.with_overrides(**parse_overrides(overrides))
    return cfg


def add_common_arguments(parser, *, fresh: bool = False) -> None:
    """--config, --out, --set, --quiet; and --fresh for commands that pass it to :func:`run_one`."""
    parser.add_argument("--config", metavar="FILE.toml", help="run configuration (default: the packaged default)")
    parser.add_argument("--preset", metavar="NAME",
                        help="start from a packaged preset instead of the default: 'digits' (the quick 8x8-digits "
                             "scenario for smoke runs), 'mnist500' (500 devices); --config and --set apply on top")
    parser.add_argument("--out", metavar="DIR", default=None, help="output directory (default: runs/<command>)")
    parser.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                        help="override one config key, e.g. --set server.buffer_size=20 (repeatable)")
    if fresh:
        parser.add_argument("--fresh", action="store_true",
                            help="if DIR holds an earlier run, discard it and start over (default: resume it, which "
                                 "needs the same configuration; only run.max_versions and run.max_virtual_time_s "
                                 "may grow)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flat(value, name))
        else:
            out[name] = value
    return out


def config_differences(saved: Config, new: Config) -> list[str]:
    """``"key: saved -> new"`` for every key that differs, except those a resume may change."""
    old, cur = _flat(saved.to_dict()), _flat(new.to_dict())
    diffs = []
    for key in sorted(set(old) | set(cur)):
        if key in EXTENDING_KEYS or key in NEUTRAL_KEYS:
            continue
        a, b = old.get(key), cur.get(key)
        if a != b:
            shown = "(changed)" if isinstance(a, list) or isinstance(b, list) else f"{a!r} -> {b!r}"
            diffs.append(f"{key}: {shown}")
    return diffs


def saved_config(out_dir: Path) -> Config | None:
    """The configuration the run in ``out_dir`` was started (or last resumed) with, or None
    when the folder holds no run. Reads without writing anything."""
    ledger = out_dir / "ledger.db"
    if ledger.is_file():
        text = _read_meta(ledger, "config")
        if text is not None:
            try:
                return Config.from_dict(json.loads(text))
            except (ValueError, ConfigError) as exc:
                raise ConfigError(f"cannot read the configuration of the run in {out_dir}: {exc}; {FRESH_HINT}") from None
    toml = out_dir / "config.toml"
    if toml.is_file():
        return parse_config(toml.read_text(encoding="utf-8"), source=str(toml))
    return None


def _read_meta(ledger: Path, key: str) -> str | None:
    # A cleanly closed WAL database has everything in the main file: open it immutable, so
    # that not even SQLite's -wal/-shm side files appear. After a crash they exist already,
    # and the (read-only) connection must read the log too.
    wal = ledger.with_name(ledger.name + "-wal").exists()
    conn = sqlite3.connect(f"{ledger.resolve().as_uri()}?{'mode=ro' if wal else 'immutable=1'}", uri=True)
    try:
        row = conn.execute("SELECT value FROM server_meta WHERE key = ?", (key,)).fetchone()
    except sqlite3.OperationalError:  # no server_meta table: the ledger of some other writer
        return None
    finally:
        conn.close()
    return None if row is None else row[0]


def check_resumable(cfg: Config, out_dir: Path) -> None:
    """Raise :class:`RunFolderMismatch` if ``out_dir`` holds a run ``cfg`` may not resume."""
    saved = saved_config(out_dir)
    if saved is None:
        return
    diffs = config_differences(saved, cfg)
    if diffs:
        raise RunFolderMismatch(out_dir, diffs)


def _set_aside(out_dir: Path, names: tuple[str, ...]) -> Path | None:
    """Move the run files in ``out_dir`` into a hidden folder (restored if the new run cannot
    be built, deleted once it is); returns it, or None if there was nothing to move."""
    present = [n for n in names if (out_dir / n).exists()]
    if not present:
        return None
    aside = out_dir / f".discarded-{time.time_ns()}"
    aside.mkdir()
    for n in present:
        (out_dir / n).rename(aside / n)
    return aside


def _restore(out_dir: Path, aside: Path | None) -> None:
    if aside is None:
        return
    for p in aside.iterdir():
        p.rename(out_dir / p.name)
    aside.rmdir()


# -- running ------------------------------------------------------------------------------------


@dataclass
class Sitting:
    """What one process did to a run; the state does not keep these, so they are saved apart."""

    from_version: int
    to_version: int
    wall_time_s: float
    train_rounds: int
    upload_bytes: int
    uploads: int
    download_bytes: int
    downloads: int
    retired: list[int]
    worker_dropouts: int
    stopped_at_s: float = 0.0  # virtual time when the sitting stopped
    completed: bool = False  # the run returned (not interrupted)

    @classmethod
    def of(cls, sim: "Simulation", from_version: int, wall: float, *, completed: bool = False) -> "Sitting":
        return cls(from_version, sim.version, wall, sim.train_rounds, int(sum(sim.upload_bytes)),
                   len(sim.upload_bytes), int(sum(sim.download_bytes)), len(sim.download_bytes),
                   sorted(int(d) for d in sim.retired), len(getattr(sim.backend, "lost", ())),
                   float(sim.clock.now), completed)


def reached_horizon(sim: "Simulation", cfg: Config) -> bool:
    """True when the run's last sitting completed at or past ``cfg``'s horizon with nothing merged
    since: resuming it would only train rounds (and spend budget) that could never count."""
    if sim.state is None:
        return False
    text = sim.state.get_meta(SITTINGS_KEY)
    last = json.loads(text)[-1] if text else None
    return bool(last and last.get("completed") and last.get("to_version") == sim.version
                and last.get("stopped_at_s", 0.0) >= cfg.run.max_virtual_time_s)


def _save_sitting(sim: "Simulation", sitting: Sitting) -> list[dict[str, Any]]:
    """Append ``sitting`` to the run's record (if it did anything); return all sittings."""
    if sim.state is None:
        return [vars(sitting)]
    text = sim.state.get_meta(SITTINGS_KEY)
    sittings = json.loads(text) if text else []
    if sitting.train_rounds or sitting.to_version != sitting.from_version or sitting.downloads:
        sittings.append(vars(sitting))
        sim.state.set_meta(SITTINGS_KEY, json.dumps(sittings))
    return sittings


def whole_run_summary(sim: "Simulation", summary: dict[str, Any], sittings: list[dict[str, Any]]) -> dict[str, Any]:
    """``summary`` (of the last sitting) with the figures that describe the whole run."""
    out = dict(summary)
    if sim.state is not None:
        records = sim.state.cohort_records()
        out["updates_applied"] = sum(len(r.get("included", ())) for r in records if r.get("applied_version"))
        out["aborted_cohorts"] = sum(1 for r in records if not r.get("applied_version"))
    if not sittings:
        return out
    ups, downs = sum(s["uploads"] for s in sittings), sum(s["downloads"] for s in sittings)
    out["train_rounds"] = sum(s["train_rounds"] for s in sittings)
    out["bytes_up_per_update"] = sum(s["upload_bytes"] for s in sittings) / ups if ups else None
    out["bytes_down_per_update"] = sum(s["download_bytes"] for s in sittings) / downs if downs else None
    out["wall_time_s"] = math.fsum(s["wall_time_s"] for s in sittings)
    out["devices_out_of_budget"] = len({d for s in sittings for d in s["retired"]})
    out["worker_dropouts"] = sum(s["worker_dropouts"] for s in sittings)
    out["sittings"] = len(sittings)
    return out


def _majority_rate(labels: Any) -> float:
    import numpy as np

    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel())
    return float(counts.max() / counts.sum()) if counts.sum() else 0.0


def majority_class_rate(cfg: Config) -> float:
    """Accuracy of always answering the test set's most common label: a target at or below
    it says nothing about learning."""
    from ftte.pipeline.datasets import load_dataset

    return _majority_rate(load_dataset(cfg.data, cfg.run.seed, cfg.fleet.devices).y_test)


def target_warning(summary: Mapping[str, Any]) -> str | None:
    rate = summary.get("majority_class_rate")
    target = summary.get("target_accuracy")
    if summary.get("target_below_majority_rate"):
        return (f"warning: target accuracy {target:g} is at or below the majority-class rate of the test set "
                f"({rate:.3f}); always predicting the commonest label reaches it, so time_to_target_s says little")
    best = summary.get("best_accuracy")
    if rate is not None and best is not None and best <= rate + 0.01:
        return (f"warning: the best accuracy {best:.3f} does not beat always predicting the commonest label "
                f"({rate:.3f}). The default learning rates ([train] lr = 1.0, [server] lr = 1.0) suit the image "
                "presets; for a tabular CSV with a linear model or a small MLP start with --set train.lr=0.1, "
                "and check that [data] standardize = true")
    return None


def caused_by_interrupt(exc: BaseException | None) -> bool:
    """True for Ctrl-C, also when a cleanup handler replaced it by its own error: SQLite's
    ``except BaseException: ROLLBACK`` raises "no transaction is active" if the interrupt
    lands just after COMMIT (the commit stands, so the saved state is still whole)."""
    for _ in range(8):
        if exc is None:
            return False
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__context__
    return False


def quiet_library_warnings() -> None:
    """Silence the library warnings a normal run triggers and that ask nothing of the user
    (call inside ``warnings.catch_warnings()``)."""
    warnings.simplefilter("ignore", RuntimeWarning)  # opacus' PRV domain maths warns on log(0)
    # Opacus' per-sample-gradient hooks read only grad_output, so torch's note that the first
    # layer's full backward hook gets no grad_input (its input needs no gradient) is moot.
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


def run_one(cfg: Config, out_dir: Path | None, *, quiet: bool = False, label: str = "", fresh: bool = False,
            checked: bool = False) -> "RunResult":
    """Run ``cfg`` into ``out_dir`` (resuming an earlier run of the same configuration there)
    and write the outputs; ``out_dir=None`` runs in memory and writes nothing.

    Raises :class:`RunFolderMismatch` before writing anything if ``out_dir`` holds a run of
    another configuration (``fresh=True`` discards it instead; ``checked=True`` skips the
    check, done already by the caller), and :class:`RunInterrupted` on Ctrl-C.
    """
    from ftte.pipeline.progress import Progress
    from ftte.pipeline.simulator import RunResult, Simulation

    if out_dir is not None and not fresh and not checked:
        check_resumable(cfg, out_dir)
    aside = _set_aside(out_dir, RUN_FILES) if (out_dir is not None and fresh) else None
    desc = label or cfg.run.strategy
    with warnings.catch_warnings():
        quiet_library_warnings()
        # Build first: data, fleet, model and plan search can still refuse the config, and a
        # refused run must leave no directory behind (and, with --fresh, the old run intact).
        try:
            sim = Simulation(cfg, out_dir)
        except BaseException:
            if out_dir is not None:
                _restore(out_dir, aside)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        start_version = sim.version
        t0 = time.perf_counter()
        try:
            if out_dir is not None:
                (out_dir / "config.toml").write_text(cfg.to_toml())
            with Progress(total=cfg.run.max_versions or None, desc=desc, enabled=not quiet) as bar:
                def tick(row: dict[str, Any]) -> None:
                    bar.update(1, status=f"acc {row['accuracy']:.3f}  t={row['virtual_time_s']:.0f}s")

                sim.on_version = tick
                if sim.version:
                    bar.update(sim.version, status=f"resumed at version {sim.version}")
                try:
                    if reached_horizon(sim, cfg):  # a finished run to the horizon: read it, do not rerun
                        result = RunResult(sim.summary(0.0, start_version), list(sim.history), sim.server.weights.copy())
                    else:
                        result = sim.run()
                except BaseException as exc:
                    if not caused_by_interrupt(exc):
                        raise
                    bar.set_status("interrupted")
                    _save_sitting(sim, Sitting.of(sim, start_version, time.perf_counter() - t0))
                    raise RunInterrupted(out_dir, sim.version) from None
            sittings = _save_sitting(sim, Sitting.of(sim, start_version, result.summary["wall_time_s"], completed=True))
            summary = whole_run_summary(sim, result.summary, sittings)
            rate = _majority_rate(sim.data.y_test)
        finally:
            sim.close()
    summary["majority_class_rate"] = rate
    summary["target_below_majority_rate"] = cfg.run.target_accuracy <= rate
    result = RunResult(summary, result.history, result.weights)
    if out_dir is not None:
        write_outputs(out_dir, result, cfg)
    return result


def write_outputs(out_dir: Path, result: "RunResult", cfg: Config) -> None:
    from ftte.pipeline.report import plot_accuracy, write_history_csv, write_markdown_report, write_summary_json

    write_summary_json(out_dir / "summary.json", result.summary)
    write_history_csv(out_dir / "history.csv", result.history)
    plot = out_dir / "accuracy.png"
    strategy = result.summary["strategy"]
    plot_accuracy({strategy: result.history}, plot, target=cfg.run.target_accuracy,
                  title=f"{strategy}: test accuracy against virtual time")
    write_markdown_report(out_dir, result.summary, result.history, plots=[plot])


SUMMARY_KEYS: tuple[str, ...] = (
    "strategy", "devices", "versions", "final_accuracy", "target_accuracy", "time_to_target_s", "virtual_time_s",
    "wall_time_s", "updates_applied", "bytes_up_per_update", "bytes_down_per_update", "peak_client_memory_bytes",
    "epsilon_max", "delta",
)


def _json_value(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return json.dumps(str(value))
        return f"{value:.4g}"
    return json.dumps(value)


def print_summary(summary: Mapping[str, Any], out_dir: Path | None, *, warn: bool = True) -> None:
    """The headline figures as ``key: value`` lines, values written as JSON (``null``, ``true``);
    the target warning, if any, goes to stderr."""
    for key in SUMMARY_KEYS:
        print(f"  {key:>26}: {_json_value(summary.get(key))}")
    if out_dir is not None:
        print(f"  {'outputs':>26}: {out_dir}")
    warning = target_warning(summary) if warn else None
    if warning:
        print(warning, file=sys.stderr)


def fail(prog: str, exc: BaseException) -> int:
    print(f"{prog}: {exc}", file=sys.stderr)
    return 2


def interrupted(prog: str, exc: BaseException) -> int:
    """One line for Ctrl-C, and the conventional exit status 128 + SIGINT."""
    message = exc.message if isinstance(exc, RunInterrupted) else "interrupted"
    if not isinstance(exc, RunInterrupted) and isinstance(exc.__cause__, RunInterrupted):
        message = exc.__cause__.message
    print(f"{prog}: {message}", file=sys.stderr)
    return 130


__all__ = [
    "EXTENDING_KEYS", "NEUTRAL_KEYS", "ConfigError", "caused_by_interrupt", "RunFolderMismatch", "RunInterrupted", "add_common_arguments",
    "check_resumable", "config_differences", "config_from_args", "fail", "interrupted", "majority_class_rate",
    "print_summary", "run_one", "saved_config", "target_warning", "whole_run_summary", "write_outputs",
]
