"""Run outputs: per-version history CSV, summary JSON, accuracy plot, Markdown report.

A *history* is a list of rows, one per global model version, each a mapping with at
least the :data:`HISTORY_FIELDS`::

    version, virtual_time_s, accuracy, loss, cohort_size, mean_staleness

Extra keys are kept as extra CSV columns (after the standard ones, in first-seen
order). ``accuracy``/``loss`` may be None (or NaN) for versions that were not evaluated.
Plots use matplotlib's Agg canvas directly and never touch pyplot's global state.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "HISTORY_FIELDS",
    "write_history_csv",
    "read_history_csv",
    "write_summary_json",
    "plot_accuracy",
    "write_markdown_report",
    "time_to_target",
    "evaluated_points",
    "smoothed_curve",
    "smoothed_time_to_target",
    "final_accuracy_mean",
    "jsonable",
]

HISTORY_FIELDS: tuple[str, ...] = ("version", "virtual_time_s", "accuracy", "loss", "cohort_size", "mean_staleness")

Row = Mapping[str, Any]


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _columns(rows: Sequence[Row]) -> list[str]:
    cols = list(HISTORY_FIELDS)
    for i, row in enumerate(rows):
        missing = [f for f in HISTORY_FIELDS if f not in row]
        if missing:
            raise ValueError(f"history row {i} lacks field(s) {', '.join(missing)}")
        for key in row:
            if key not in cols:
                cols.append(key)
    return cols


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return "" if math.isnan(v) else repr(v)
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def write_history_csv(path: str | Path, rows: Sequence[Row]) -> Path:
    """Write the per-version history; returns the path."""
    path = Path(path)
    cols = _columns(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(cols)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in cols])
    os.replace(tmp, path)
    return path


def _parse_cell(text: str) -> Any:
    if text == "":
        return None
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def read_history_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read a history CSV back (numbers parsed; empty cells become None)."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return [{k: _parse_cell(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def jsonable(value: Any) -> Any:
    """Plain JSON-compatible data: numpy scalars/arrays, dataclasses, paths, tuples and
    sets converted; non-finite floats written as the strings "inf", "-inf", "nan"."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [jsonable(v) for v in sorted(value, key=repr)]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(value, Path):
        return str(value)
    return value


def write_summary_json(path: str | Path, summary: Mapping[str, Any]) -> Path:
    """Write ``summary`` as indented, strict JSON (see :func:`jsonable`)."""
    path = Path(path)
    _atomic_write_text(path, json.dumps(jsonable(summary), indent=2, allow_nan=False) + "\n")
    return path


def _finite(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def time_to_target(history: Iterable[Row], target: float) -> float | None:
    """Virtual time of the first evaluated version whose accuracy reaches ``target``
    (rows taken in time order), or None if it never does."""
    rows = sorted(history, key=lambda r: (float(r["virtual_time_s"]), r.get("version", 0)))
    for row in rows:
        acc = _finite(row.get("accuracy"))
        if acc is not None and acc >= target:
            return float(row["virtual_time_s"])
    return None


def evaluated_points(history: Iterable[Row], horizon_s: float | None = None) -> list[tuple[float, float]]:
    """(virtual time, accuracy) of every evaluated version up to ``horizon_s``, in time order."""
    rows = sorted(history, key=lambda r: (float(r["virtual_time_s"]), r.get("version", 0)))
    pts = [(float(r["virtual_time_s"]), _finite(r.get("accuracy"))) for r in rows]
    return [(t, a) for t, a in pts if a is not None and (horizon_s is None or t <= horizon_s)]


def smoothed_curve(history: Iterable[Row], window: int = 3, horizon_s: float | None = None) -> list[tuple[float, float]]:
    """Trailing moving average of ``window`` evaluations: the point at evaluation i (i >= window-1)
    is the mean accuracy of evaluations i-window+1..i, at evaluation i's time. One lucky
    evaluation then cannot make a curve cross a target; fewer than ``window`` evaluations
    give no point at all."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    pts = evaluated_points(history, horizon_s)
    accs = [a for _, a in pts]
    return [(pts[i][0], math.fsum(accs[i - window + 1:i + 1]) / window) for i in range(window - 1, len(pts))]


def smoothed_time_to_target(history: Iterable[Row], target: float, window: int = 3,
                            horizon_s: float | None = None) -> float | None:
    """First virtual time at which the smoothed curve (see :func:`smoothed_curve`) reaches ``target``."""
    for t, a in smoothed_curve(history, window, horizon_s):
        if a >= target:
            return t
    return None


def final_accuracy_mean(history: Iterable[Row], last: int = 10, horizon_s: float | None = None) -> float | None:
    """Mean accuracy of the last ``last`` evaluations up to ``horizon_s`` (all of them if fewer)."""
    accs = [a for _, a in evaluated_points(history, horizon_s)][-last:]
    return math.fsum(accs) / len(accs) if accs else None


def _curve(rows: Sequence[Row]) -> tuple[list[float], list[float]]:
    pts = [(float(r["virtual_time_s"]), _finite(r.get("accuracy"))) for r in rows]
    pts = sorted((t, a) for t, a in pts if a is not None)
    return [t for t, _ in pts], [a for _, a in pts]


def plot_accuracy(
    histories: Mapping[str, Sequence[Row]],
    path_png: str | Path,
    target: float | None = None,
    *,
    title: str = "Test accuracy against virtual time",
    targets: Sequence[tuple[str, float]] = (),
    smoothing: int = 0,
) -> Path:
    """One accuracy-vs-virtual-time curve per strategy; an optional dashed target line
    with a dotted marker where each curve first reaches it. ``targets`` adds one labelled
    horizontal line per (label, accuracy), named in the legend; ``smoothing`` > 1 draws
    each strategy's moving average of that many evaluations over its raw curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path_png = Path(path_png)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7.0, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, rows in histories.items():
        ts, accs = _curve(rows)
        (line,) = ax.plot(ts, accs, label=name, linewidth=1.6 if smoothing <= 1 else 0.8, drawstyle="steps-post",
                          alpha=1.0 if smoothing <= 1 else 0.35)
        if smoothing > 1:
            sm = smoothed_curve(rows, smoothing)
            ax.plot([t for t, _ in sm], [a for _, a in sm], color=line.get_color(), linewidth=1.6,
                    label=f"{name} (mean of {smoothing})")
        if target is not None:
            hit = time_to_target(rows, target)
            if hit is not None:
                ax.axvline(hit, color=line.get_color(), linestyle=":", linewidth=1.0)
    if target is not None:
        ax.axhline(target, color="0.4", linestyle="--", linewidth=1.0, label=f"target {target:g}")
    styles = ("--", "-.", ":", (0, (5, 1, 1, 1)))
    for i, (label, value) in enumerate(targets):
        ax.axhline(value, color="0.3", linestyle=styles[i % len(styles)], linewidth=0.9, label=label)
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    if histories or target is not None or targets:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path_png, metadata={"Title": title})
    return path_png


def _flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out.append((prefix, value))


def _md(value: Any) -> str:
    v = jsonable(value)
    if isinstance(v, float):
        text = f"{v:.6g}"
    elif isinstance(v, list):
        text = json.dumps(v)
    elif v is None:
        text = "—"
    else:
        text = str(v)
    return text.replace("|", "\\|").replace("\n", " ")


def write_markdown_report(
    dir: str | Path,
    summary: Mapping[str, Any],
    history: Sequence[Row],
    plots: Sequence[str | Path] = (),
    *,
    name: str = "report.md",
    max_history_rows: int = 40,
) -> Path:
    """Write ``dir/report.md``: summary table, embedded plots (linked relative to
    ``dir``) and the history (evenly thinned to ``max_history_rows``, last row kept)."""
    out_dir = Path(dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = summary.get("title") or summary.get("strategy") or "run"
    lines = [f"# ftte report: {_md(title)}", "", "## Summary", "", "| key | value |", "|---|---|"]
    flat: list[tuple[str, Any]] = []
    _flatten("", {k: v for k, v in summary.items() if k != "title"}, flat)
    lines += [f"| {_md(k)} | {_md(v)} |" for k, v in flat]
    lines.append("")
    if plots:
        lines += ["## Plots", ""]
        for p in plots:
            p = Path(p)
            try:
                rel = p.resolve().relative_to(out_dir.resolve())
            except ValueError:
                rel = Path(os.path.relpath(p.resolve(), out_dir.resolve()))
            lines += [f"![{p.stem}]({rel.as_posix()})", ""]
    lines += ["## History", ""]
    if not history:
        lines += ["(no versions recorded)", ""]
    else:
        cols = _columns(history)
        n = len(history)
        if n > max_history_rows:
            keep = sorted(set(np.linspace(0, n - 1, max_history_rows).round().astype(int).tolist()))
            lines.append(f"{n} versions; {len(keep)} shown, evenly spaced.")
            lines.append("")
        else:
            keep = list(range(n))
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for i in keep:
            lines.append("| " + " | ".join(_md(history[i].get(c)) for c in cols) + " |")
        lines.append("")
    path = out_dir / name
    _atomic_write_text(path, "\n".join(lines))
    return path
