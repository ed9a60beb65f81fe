"""``ftte compare``: ftte, fedbuff and fedavg on the same fleet, data and seeds, measured honestly.

What makes the comparison fair (issue 12 §4):

* **One horizon.** Every strategy runs until its devices' privacy budgets are spent or the
  common virtual-time horizon ``[run] max_virtual_time_s``, whichever comes first (the
  version limit is lifted), so no strategy's "final accuracy" is read at another time.
* **Several targets on a smoothed curve.** Targets are fractions (default 50/75/90%) of the
  best accuracy *every* compared strategy reaches (the lowest of their smoothed peaks), and a
  time to target is read from the moving average of 3 evaluations, so one lucky evaluation
  cannot decide it. Final accuracy is the mean of the last 10 evaluations.
* **Tuned learning rates.** Each strategy picks its own server and device learning rates
  from the same small grid, scored on a different seed (and a shorter horizon) from the one
  reported; the chosen values and every grid score are written into ``compare.json``.
* **Memory it could not have.** A strategy whose measured peak training memory exceeds a
  device class's memory is flagged for that class; ``fedavg_fit`` is FedAvg restricted to
  the devices that hold the full model.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ftte.pipeline.run_outputs import (
    ConfigError, add_common_arguments, caused_by_interrupt, check_resumable, config_from_args, fail, interrupted,
    print_summary, run_one,
)

#: The strategies every comparison can run; the first three set the common targets.
STRATEGIES = ("ftte", "fedbuff", "fedavg", "fedavg_fit")
TARGET_SETTERS = ("ftte", "fedbuff", "fedavg")
#: Config overrides that turn a name into a run.
STRATEGY_OVERRIDES: dict[str, dict[str, Any]] = {
    "ftte": {"run.strategy": "ftte"},
    "fedbuff": {"run.strategy": "fedbuff"},
    "fedavg": {"run.strategy": "fedavg"},
    "fedavg_fit": {"run.strategy": "fedavg", "server.fedavg_fit_only": True},
}

#: The goals of issue 12, checked on every comparison.
GOAL_TIME_RATIO = 0.19
GOAL_MEMORY_RATIO = 0.20
GOAL_UPLOAD_RATIO = 0.31


@dataclass(frozen=True)
class CompareSettings:
    """How the comparison reads its runs (written into ``compare.json``)."""

    target_fractions: tuple[float, ...] = (0.5, 0.75, 0.9)
    smoothing: int = 3
    final_window: int = 10
    server_lrs: tuple[float, ...] = (1.0, 2.0)
    device_lrs: tuple[float, ...] = (0.5, 1.0)
    tune: bool = True
    tune_seed_offset: int = 1
    tune_horizon_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not self.target_fractions or any(not 0.0 < f <= 1.0 for f in self.target_fractions):
            raise ValueError(f"target fractions must be in (0, 1], got {self.target_fractions}")
        if self.smoothing < 1 or self.final_window < 1:
            raise ValueError("smoothing and final window must be >= 1")
        if not self.server_lrs or not self.device_lrs or any(lr <= 0 for lr in (*self.server_lrs, *self.device_lrs)):
            raise ValueError("learning-rate grids must be non-empty and positive")
        if self.tune_seed_offset == 0:
            raise ValueError("tuning must use another seed than the reported run (tune seed offset != 0)")
        if not 0.0 < self.tune_horizon_fraction <= 1.0:
            raise ValueError(f"tune horizon fraction must be in (0, 1], got {self.tune_horizon_fraction}")


# -- reading runs (pure) ---------------------------------------------------------------------------


def target_key(value: float) -> str:
    """A target accuracy as the string key of ``targets`` objects."""
    return f"{value:.4f}"


def common_targets(histories: Mapping[str, Sequence[Mapping[str, Any]]], fractions: Sequence[float], *,
                   window: int, horizon_s: float | None, among: Sequence[str] = TARGET_SETTERS) -> tuple[float | None, list[float]]:
    """(best accuracy all of ``among`` reach on their smoothed curves, the targets as fractions of it).

    Every strategy of ``among`` reaches every target by construction; ``(None, [])`` when one of
    them has no smoothed point at all."""
    from ftte.pipeline.report import smoothed_curve

    peaks = []
    for name in among:
        if name not in histories:
            continue
        curve = smoothed_curve(histories[name], window, horizon_s)
        if not curve:
            return None, []
        peaks.append(max(a for _, a in curve))
    if not peaks:
        return None, []
    best = min(peaks)
    # floor to the key's precision, so that the target written is never above what was reached
    return best, [math.floor(f * best * 1e4) / 1e4 for f in fractions]


def target_setter(histories: Mapping[str, Sequence[Mapping[str, Any]]], *, window: int, horizon_s: float | None,
                  among: Sequence[str] = TARGET_SETTERS) -> str | None:
    """The strategy whose smoothed peak is the common best (the lowest peak among ``among``)."""
    from ftte.pipeline.report import smoothed_curve

    peaks = {n: max((a for _, a in smoothed_curve(histories[n], window, horizon_s)), default=-1.0)
             for n in among if n in histories}
    return min(peaks, key=lambda n: peaks[n]) if peaks else None


def chance_warning(report: Mapping[str, Any]) -> str | None:
    """A line for targets a model reaches by predicting the most common class: times to them
    say that a strategy left chance, not that it converged."""
    low = report.get("targets_at_chance") or []
    if not low:
        return None
    return (f"warning: target(s) {', '.join(low)} are at or below the test set's majority-class rate "
            f"{report['majority_class_rate']:.4f}; the common best {report['best_common_accuracy']:.4f} is set by "
            f"{report['best_common_set_by']}, so the time ratios at those targets say little. "
            f"Raise --targets or drop the weakest strategy with --strategies.")


def memory_flags(peak_bytes: int | None, classes: Sequence[Any]) -> list[str]:
    """Names of the device classes whose memory is below ``peak_bytes`` (the strategy could not
    train there)."""
    if peak_bytes is None:
        return []
    return [c.name for c in classes if c.memory_bytes < peak_bytes]


def strategy_figures(summary: Mapping[str, Any], history: Sequence[Mapping[str, Any]], targets: Sequence[float],
                     settings: CompareSettings, horizon_s: float, classes: Sequence[Any]) -> dict[str, Any]:
    """The run's summary with the comparison's figures: times to each target on the smoothed
    curve, final accuracy as the mean of the last evaluations, and the memory flags."""
    from ftte.pipeline.report import final_accuracy_mean, smoothed_time_to_target

    times = {target_key(t): smoothed_time_to_target(history, t, settings.smoothing, horizon_s) for t in targets}
    out = dict(summary)
    out["last_accuracy"] = summary.get("final_accuracy")
    out["final_accuracy"] = final_accuracy_mean(history, settings.final_window, horizon_s)
    out["targets"] = times
    out["primary_target"] = targets[-1] if targets else None
    out["time_to_target_s"] = times[target_key(targets[-1])] if targets else None
    out["evaluations"] = sum(1 for h in history if h.get("accuracy") is not None)
    out["memory_exceeds_classes"] = memory_flags(summary.get("peak_client_memory_bytes"), classes)
    return out


def ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return a / b
    return None


def ratios_against(base: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    targets = {k: ratio(v, base.get("targets", {}).get(k)) for k, v in other.get("targets", {}).items()}
    return {
        "time_to_target": ratio(other.get("time_to_target_s"), base.get("time_to_target_s")),
        "time_to_targets": targets,
        "final_accuracy_diff": (other["final_accuracy"] - base["final_accuracy"])
        if other.get("final_accuracy") is not None and base.get("final_accuracy") is not None else None,
        "peak_client_memory": ratio(other.get("peak_client_memory_bytes"), base.get("peak_client_memory_bytes")),
        "bytes_up_per_update": ratio(other.get("bytes_up_per_update"), base.get("bytes_up_per_update")),
        "bytes_up_vs_float32_full_model": ratio(other.get("bytes_up_per_update"), other.get("float32_full_update_bytes")),
        "bytes_down_per_update": ratio(other.get("bytes_down_per_update"), base.get("bytes_down_per_update")),
    }


@dataclass(frozen=True)
class Verdict:
    goal: str
    met: bool | None  # None: not measurable (a strategy missing or a figure absent)
    detail: str

    def line(self) -> str:
        mark = {True: "MET", False: "MISSED", None: "N/A"}[self.met]
        return f"{mark:>6}  {self.goal}: {self.detail}"


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def verdicts(strategies: Mapping[str, Mapping[str, Any]], horizon_s: float) -> list[Verdict]:
    """One verdict per goal of issue 12, from the figures of :func:`strategy_figures`."""
    out: list[Verdict] = []
    f, base, buff = strategies.get("ftte"), strategies.get("fedavg"), strategies.get("fedbuff")
    goal = f"ftte time to every target <= {GOAL_TIME_RATIO}x fedavg"
    if f is None or base is None or not f.get("targets"):
        out.append(Verdict(goal, None, "needs ftte, fedavg and at least one target"))
    else:
        parts, met = [], True
        for key, t in f["targets"].items():
            b = base["targets"].get(key)
            if t is None:
                met = False
                parts.append(f"{key}: ftte never")
            elif b is None:  # fedavg missed it within the horizon: the ratio is below t / horizon
                bound = t / horizon_s
                met = met and bound <= GOAL_TIME_RATIO
                parts.append(f"{key}: <{bound:.2f}x (fedavg never)")
            else:
                r = t / b
                met = met and r <= GOAL_TIME_RATIO
                parts.append(f"{key}: {r:.2f}x")
        out.append(Verdict(goal, met, ", ".join(parts)))
    goal = "ftte final accuracy >= fedavg and >= fedbuff"
    accs = {n: s.get("final_accuracy") for n, s in (("ftte", f), ("fedavg", base), ("fedbuff", buff)) if s is not None}
    if len(accs) < 3 or any(a is None for a in accs.values()):
        out.append(Verdict(goal, None, "needs final accuracies of ftte, fedavg and fedbuff"))
    else:
        met = accs["ftte"] >= accs["fedavg"] and accs["ftte"] >= accs["fedbuff"]
        out.append(Verdict(goal, met, ", ".join(f"{n} {a:.4f}" for n, a in accs.items())))
    goal = f"ftte client peak memory <= {GOAL_MEMORY_RATIO}x fedavg (measured)"
    r = ratio((f or {}).get("peak_client_memory_bytes"), (base or {}).get("peak_client_memory_bytes"))
    out.append(Verdict(goal, None if r is None else r <= GOAL_MEMORY_RATIO,
                       "needs ftte and fedavg" if r is None else
                       f"{r:.3f}x ({f['peak_client_memory_bytes']} / {base['peak_client_memory_bytes']} bytes)"))
    goal = f"ftte upload per update <= {GOAL_UPLOAD_RATIO}x a float32 full update"
    r = ratio((f or {}).get("bytes_up_per_update"), (f or {}).get("float32_full_update_bytes"))
    out.append(Verdict(goal, None if r is None else r <= GOAL_UPLOAD_RATIO,
                       "needs ftte" if r is None else
                       f"{r:.3f}x ({f['bytes_up_per_update']:.0f} / {f['float32_full_update_bytes']} bytes)"))
    return out


def format_table(strategies: Mapping[str, Mapping[str, Any]], targets: Sequence[float]) -> str:
    """One row per strategy: time to each target, final accuracy, peak memory, upload, devices out of budget."""
    head = ["strategy"] + [f"t@{t:.3f} (s)" for t in targets] + [
        "final acc", "peak mem (MB)", "up/update (kB)", "out of budget", "lr srv/dev", "too big for"]
    rows = [head]
    for name, s in strategies.items():
        lrs = s.get("learning_rates") or {}
        rows.append([name] + [_fmt(s["targets"].get(target_key(t)), ".0f") for t in targets] + [
            _fmt(s.get("final_accuracy"), ".4f"),
            _fmt(None if s.get("peak_client_memory_bytes") is None else s["peak_client_memory_bytes"] / 1e6, ".2f"),
            _fmt(None if s.get("bytes_up_per_update") is None else s["bytes_up_per_update"] / 1e3, ".1f"),
            str(s.get("devices_out_of_budget", "—")),
            f"{lrs.get('server', '—')}/{lrs.get('device', '—')}",
            ",".join(s.get("memory_exceeds_classes") or [])
            or ("(skips " + ",".join(s["excluded_classes"]) + ")" if s.get("excluded_classes") else "—"),
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- running ---------------------------------------------------------------------------------------


def strategy_config(base_cfg: Any, name: str, *, server_lr: float | None = None, device_lr: float | None = None) -> Any:
    """``base_cfg`` for strategy ``name``, run to the horizon (no version limit)."""
    overrides: dict[str, Any] = {**STRATEGY_OVERRIDES[name], "run.max_versions": 0}
    if server_lr is not None:
        overrides["server.lr"] = server_lr
    if device_lr is not None:
        overrides["train.lr"] = device_lr
    return base_cfg.with_overrides(**overrides)


def tune_learning_rates(base_cfg: Any, name: str, settings: CompareSettings, *, quiet: bool = True) -> dict[str, Any]:
    """Each (server, device) learning rate of the grid, run in memory on seed + offset for a
    fraction of the horizon, scored by its mean accuracy over the last evaluations; returns the
    best pair (ties: the first in grid order) and every score."""
    from ftte.pipeline.report import final_accuracy_mean

    seed = base_cfg.run.seed + settings.tune_seed_offset
    horizon = base_cfg.run.max_virtual_time_s * settings.tune_horizon_fraction
    scores = []
    for s_lr in settings.server_lrs:
        for d_lr in settings.device_lrs:
            cfg = strategy_config(base_cfg, name, server_lr=s_lr, device_lr=d_lr).with_overrides(
                **{"run.seed": seed, "run.max_virtual_time_s": horizon})
            result = run_one(cfg, None, quiet=quiet, label=f"tune {name} lr {s_lr:g}/{d_lr:g}")
            scores.append({"server": s_lr, "device": d_lr,
                           "score": final_accuracy_mean(result.history, settings.final_window, horizon)})
    best = max(scores, key=lambda r: -1.0 if r["score"] is None else r["score"])  # max keeps the first of ties
    return {"server": best["server"], "device": best["device"], "tuning_seed": seed, "tuning_horizon_s": horizon,
            "grid": scores}


def learning_rates_from(path: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The learning rates an earlier comparison chose (its ``compare.json``), for reuse without
    tuning again; the source is recorded with them."""
    try:
        earlier = json.loads(Path(path).read_text(encoding="utf-8"))
        chosen = {n: earlier["strategies"][n]["learning_rates"] for n in names}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--lrs-from {path}: no learning rates for {list(names)} there ({exc!r})") from None
    out = {}
    for n, lr in chosen.items():
        if not isinstance(lr, dict) or not all(isinstance(lr.get(k), (int, float)) and lr[k] > 0
                                               for k in ("server", "device")):
            raise ValueError(f"--lrs-from {path}: strategy {n} has no positive server/device learning rates")
        out[n] = {**lr, "reused_from": str(path)}
    return out


def compare(base_cfg: Any, out: Path | None, names: list[str], *, quiet: bool = True, fresh: bool = False,
            on_summary: Any = None, settings: CompareSettings | None = None,
            learning_rates: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Run each strategy of ``names`` on ``base_cfg`` into ``out/<strategy>`` and return the
    comparison (also written to ``out/compare.json`` with ``compare.png``). Every strategy's
    folder is checked before any runs, so a refused resume writes nothing. ``learning_rates``
    (per strategy, ``{"server": .., "device": ..}``) skips the tuning."""
    return _compare(base_cfg, out, names, quiet=quiet, fresh=fresh, on_summary=on_summary,
                    settings=settings or CompareSettings(), given_lrs=learning_rates)


def _compare(base_cfg: Any, out: Path | None, names: list[str], *, quiet: bool, fresh: bool, on_summary: Any,
             settings: CompareSettings, given_lrs: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    from ftte.pipeline.report import plot_accuracy, write_summary_json

    horizon = base_cfg.run.max_virtual_time_s
    lrs: dict[str, dict[str, Any]] = {}
    for name in names:
        if given_lrs is not None:
            lrs[name] = dict(given_lrs[name])
        elif settings.tune:
            lrs[name] = tune_learning_rates(base_cfg, name, settings, quiet=quiet)
        else:
            lrs[name] = {"server": base_cfg.server.lr, "device": base_cfg.train.lr, "grid": None}
    configs = {n: strategy_config(base_cfg, n, server_lr=lrs[n]["server"], device_lr=lrs[n]["device"]) for n in names}
    if out is not None and not fresh:
        for name in names:
            check_resumable(configs[name], out / name)
    summaries: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        folder = None if out is None else out / name
        result = run_one(configs[name], folder, quiet=quiet, label=name, fresh=fresh, checked=True)
        summaries[name], histories[name] = result.summary, result.history
        if on_summary is not None:
            on_summary(name, result.summary, folder)
    best, targets = common_targets(histories, settings.target_fractions, window=settings.smoothing, horizon_s=horizon,
                                   among=[n for n in TARGET_SETTERS if n in names])
    classes = base_cfg.fleet.device_classes()
    strategies = {}
    for name in names:
        strategies[name] = strategy_figures(summaries[name], histories[name], targets, settings, horizon, classes)
        strategies[name]["learning_rates"] = lrs[name]
        if STRATEGY_OVERRIDES[name].get("server.fedavg_fit_only"):  # it never selects where the model does not fit
            strategies[name]["excluded_classes"] = strategies[name]["memory_exceeds_classes"]
            strategies[name]["memory_exceeds_classes"] = []
    rate = max((float(s["majority_class_rate"]) for s in summaries.values() if s.get("majority_class_rate") is not None),
               default=None)
    report: dict[str, Any] = {
        "horizon_s": horizon,
        "best_common_accuracy": best,
        "best_common_set_by": target_setter(histories, window=settings.smoothing, horizon_s=horizon,
                                            among=[n for n in TARGET_SETTERS if n in names]),
        "majority_class_rate": rate,
        "targets_at_chance": [target_key(t) for t in targets if rate is not None and t <= rate],
        "target_fractions": list(settings.target_fractions),
        "targets": [target_key(t) for t in targets],
        "primary_target": target_key(targets[-1]) if targets else None,
        "settings": asdict(settings),
        "config": base_cfg.to_dict(),
        "device_classes": {c.name: {"fraction": c.fraction, "memory_bytes": c.memory_bytes} for c in classes},
        "strategies": strategies,
    }
    if "fedavg" in strategies:
        report["ratios_vs_fedavg"] = {n: ratios_against(strategies["fedavg"], s) for n, s in strategies.items()
                                      if n != "fedavg"}
    if "fedbuff" in strategies and "ftte" in strategies:
        report["ftte_vs_fedbuff"] = ratios_against(strategies["fedbuff"], strategies["ftte"])
    report["verdicts"] = [asdict(v) for v in verdicts(strategies, horizon)]
    report["table"] = format_table(strategies, targets)
    if out is not None:
        write_summary_json(out / "compare.json", report)
        labels = [(f"target {f:.0%} of {best:.3f} = {t:.3f}", t) for f, t in zip(settings.target_fractions, targets)]
        plot_accuracy(histories, out / "compare.png", targets=labels, smoothing=settings.smoothing,
                      title="Test accuracy against virtual time: " + ", ".join(names))
    return report


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def configure(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, fresh=True)
    d = CompareSettings()
    parser.add_argument("--strategies", default="ftte,fedbuff,fedavg,fedavg_fit",
                        help="comma-separated subset of ftte,fedbuff,fedavg,fedavg_fit (default: all four; "
                             "fedavg_fit is FedAvg on the devices that hold the full model)")
    parser.add_argument("--targets", type=_floats, default=d.target_fractions, metavar="F,F,...",
                        help="targets as fractions of the best accuracy every strategy reaches (default 0.5,0.75,0.9;"
                             " the last is the primary target)")
    parser.add_argument("--server-lrs", type=_floats, default=d.server_lrs, metavar="LR,...",
                        help="server learning rates to tune over (default 1,2)")
    parser.add_argument("--device-lrs", type=_floats, default=d.device_lrs, metavar="LR,...",
                        help="device learning rates to tune over (default 0.5,1)")
    parser.add_argument("--tune-horizon-fraction", type=float, default=d.tune_horizon_fraction, metavar="F",
                        help="tuning runs stop at this fraction of the horizon (default 0.5)")
    parser.add_argument("--no-tune", action="store_true",
                        help="skip tuning: every strategy uses [server] lr and [train] lr of the config")
    parser.add_argument("--lrs-from", metavar="COMPARE.json",
                        help="skip tuning: reuse the learning rates an earlier comparison chose (its compare.json)")


def run(args: argparse.Namespace) -> int:
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        return fail("ftte compare", ValueError(f"unknown strategies {unknown}; choose from {STRATEGIES}"))
    try:
        base_cfg = config_from_args(args.config, args.set, preset=args.preset)
        settings = CompareSettings(target_fractions=tuple(args.targets), server_lrs=tuple(args.server_lrs),
                                   device_lrs=tuple(args.device_lrs), tune=not (args.no_tune or args.lrs_from),
                                   tune_horizon_fraction=args.tune_horizon_fraction)
        given = learning_rates_from(Path(args.lrs_from), names) if args.lrs_from else None
    except (ConfigError, OSError, ValueError) as exc:
        return fail("ftte compare", exc)

    out = Path(args.out or "runs/compare")

    def show(name: str, summary: dict[str, Any], folder: Path | None) -> None:
        print(f"{name}:")
        print_summary(summary, folder, warn=False)

    try:
        report = compare(base_cfg, out, names, quiet=args.quiet, fresh=args.fresh, on_summary=show, settings=settings,
                         learning_rates=given)
    except (ConfigError, ValueError) as exc:
        return fail("ftte compare", exc)
    except BaseException as exc:
        if not caused_by_interrupt(exc):
            raise
        return interrupted("ftte compare", exc)
    print()
    print(f"horizon {report['horizon_s']:g} s of virtual time; targets {', '.join(report['targets'])} "
          f"({', '.join(f'{f:.0%}' for f in settings.target_fractions)} of {_fmt(report['best_common_accuracy'], '.4f')}, "
          f"the best accuracy every strategy reaches on its mean-of-{settings.smoothing} curve)")
    print(report["table"])
    print()
    if (warning := chance_warning(report)) is not None:
        print(warning)
    for v in report["verdicts"]:
        print(Verdict(**v).line())
    print(f"compare.json and compare.png in {out}")
    return 0
