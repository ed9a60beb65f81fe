"""User-level DP utility study (issue 13): accuracy against user-level epsilon, subset vs full model.

On the default task (5,000 MNIST digits, cnn28, 90% stragglers), with a large fleet and large
cohorts on the SecAgg+ ring, every run shares the seed, the fleet and the virtual-time horizon.
The grid, per variant:

* non-private (``[privacy] enabled = false``; secure aggregation and the update clip stay on);
* user-level DP at each epsilon (delta ``--delta``), noise ``distributed`` (each device's
  discrete Gaussian inside the masked sum) and ``server`` (a trusted server's central noise,
  the baseline the distributed noise is measured against).

Variants: ``ftte`` (its subset plan; under user-level DP the plan rule of
:func:`ftte.pipeline.strategies.user_coordinate_cap` caps it at ``[privacy] user_noise_ratio``,
so each private run's plan is the one its own noise admits) and ``fedbuff`` (the full model).
ftte's non-private run trains the *same* plan as its distributed run at epsilon 8 (the goal's
comparison; ``[train] max_coordinates`` = that run's cap gives the same search the same cap), and
``ftte-memory`` is ftte's non-private run with the plan chosen by memory alone (what ftte trains
without user-level DP), its only run. Under user-level DP ``[server] variance_penalty`` must be 0,
and then ftte's weight rule, ``(1+tau)^-0.5`` with ``r_min``, is exactly fedbuff's: the runs
differ in the trained plan only.

The fleet is the default shorthand's two classes with no dropout at the share stage: a ring
session aborts when an advertised member does not share (its nonce is needed to derive the
ring order), and at 100 members the default 2% per straggler would abort most cohorts. Every
other dropout stays as the default.

The ring has 10 neighbours per member (``--neighbors``): with the default 4, a member's
self-mask seed needs all 4 neighbours' shares, so one neighbour dropping after the share stage
aborts the cohort (a 5-version probe at 1,000 devices aborted 21 cohorts of 26).

    .venv/bin/python -m ftte.bench.user_dp_study [--devices 1000] [--buffer 100] [--horizon 36000]
        [--versions 0] [--eps 2 4 8] [--variants ftte fedbuff ftte-memory] [--device-lr LR | NAME=LR ...]
        [--noise-ratio R] [--server-lr LR] [--momentum B] [--clip C] [--threshold T] [--participations P]
        [--out runs/user_dp_study]

Writes ``study.json`` (after every run, so a stopped study keeps what it finished),
``accuracy_vs_epsilon.png`` and ``table.md`` into ``--out``; each run's own folder is
``--out/runs/NAME`` and is resumed (or read, when finished) by the same command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

#: The issue's targets.
GOAL_NONPRIVATE_GAP = 0.10  # ftte at epsilon 8 within 10 points of non-private
GOAL_DISTRIBUTED_GAP = 0.01  # distributed within 1 point of central at the same epsilon
GOAL_EPSILON = 8.0

VARIANTS: dict[str, dict[str, str]] = {
    "ftte": {"strategy": "ftte", "plan": "subset"},
    "fedbuff": {"strategy": "fedbuff", "plan": "full model"},
    "ftte-memory": {"strategy": "ftte", "plan": "memory-only subset"},  # non-private only
}
NONPRIVATE_ONLY = ("ftte-memory",)
NOISES = ("distributed", "server")


@dataclass(frozen=True)
class StudySettings:
    """What the study runs; the defaults are the issue's."""

    devices: int = 1000
    buffer: int = 100
    horizon_s: float = 36000.0
    versions: int = 0
    epsilons: tuple[float, ...] = (2.0, 4.0, 8.0)
    noises: tuple[str, ...] = NOISES
    variants: tuple[str, ...] = ("ftte", "fedbuff", "ftte-memory")
    delta: float = 1e-6
    participations: int = 8
    seed: int = 0
    neighbors: int = 10
    device_lr: float | None = None  # None: the config's
    # per-run device learning rates: "VARIANT-private", "VARIANT-nonprivate" or "VARIANT" -> lr (before device_lr)
    device_lrs: dict[str, float] = field(default_factory=dict)
    # non-private runs at each of these device lrs (empty: one run at device_lr_of); the goals judge
    # against each variant's best, so a private run is never compared with a badly tuned reference
    nonprivate_lrs: tuple[float, ...] = ()
    clip: float | None = None  # [secagg] clip, the user-level sensitivity; None: the config's
    noise_ratio: float | None = None  # [privacy] user_noise_ratio (the plan rule); None: the config's
    server_lr: float | None = None  # [server] lr; None: the config's
    momentum: float | None = None  # [server] momentum (FedAvgM); None: the config's
    threshold: int = 0  # [secagg] threshold T; 0: the config's (a majority of the cohort)
    # a cap on ftte's plan in every ftte run, private or not (the rule's cap still applies below it):
    # holds the plan fixed across noises and thresholds, so they compete like for like; 0: the rule alone
    max_coordinates: int = 0
    preset: str | None = None  # None: the default task
    model: str | None = None  # None: the preset's
    final_window: int = 10
    extra: dict[str, Any] = field(default_factory=dict)  # further config overrides (tests)

    def __post_init__(self) -> None:
        if self.devices < 2 or self.buffer < 2 or self.buffer > self.devices:
            raise ValueError(f"need 2 <= buffer ({self.buffer}) <= devices ({self.devices})")
        if not self.horizon_s > 0 or self.versions < 0:
            raise ValueError("horizon must be > 0 and versions >= 0")
        if any(not e > 0 for e in self.epsilons):
            raise ValueError(f"epsilons must be > 0, got {self.epsilons}")
        if unknown := set(self.noises) - set(NOISES):
            raise ValueError(f"unknown noise {sorted(unknown)}; choose from {NOISES}")
        if unknown := set(self.variants) - set(VARIANTS):
            raise ValueError(f"unknown variant {sorted(unknown)}; choose from {tuple(VARIANTS)}")
        if any(not lr > 0 for lr in self.nonprivate_lrs):
            raise ValueError(f"non-private learning rates must be > 0, got {self.nonprivate_lrs}")
        if self.participations < 1 or not 0 <= self.threshold <= self.buffer:
            raise ValueError(f"need participations >= 1 and 0 <= threshold <= buffer, got {self.participations}, "
                             f"{self.threshold}")


@dataclass(frozen=True)
class RunSpec:
    variant: str
    noise: str  # "none" for the non-private run
    epsilon: float | None
    lr: float | None = None  # this run's device lr (a non-private sweep); None: device_lr_of

    @property
    def name(self) -> str:
        name = f"{self.variant}-nonprivate" if self.epsilon is None else f"{self.variant}-{self.noise}-eps{self.epsilon:g}"
        return name if self.lr is None else f"{name}-lr{self.lr:g}"


def grid(settings: StudySettings) -> list[RunSpec]:
    """In the order a cut-short study loses least: every variant's non-private run, then each noise
    (distributed first) at each epsilon in the order given, both variants side by side."""
    lrs: tuple[float | None, ...] = settings.nonprivate_lrs or (None,)
    specs = [RunSpec(v, "none", None, lr) for v in settings.variants for lr in lrs]
    specs += [RunSpec(v, noise, eps) for noise in settings.noises for eps in settings.epsilons for v in settings.variants
              if v not in NONPRIVATE_ONLY]
    return specs


def same_plan_spec(settings: StudySettings) -> RunSpec:
    """The private run whose plan ftte's non-private run trains: distributed noise at epsilon 8 (the
    goal's), or the nearest the grid has."""
    noise = "distributed" if "distributed" in settings.noises else settings.noises[0]
    eps = GOAL_EPSILON if GOAL_EPSILON in settings.epsilons else max(settings.epsilons)
    return RunSpec("ftte", noise, eps)


def study_fleet_classes(stragglers: float = 0.9, straggler_memory_bytes: int = 8 << 20) -> list[dict[str, Any]]:
    """The default shorthand's classes with the share-stage dropout set to 0 (see the module doc)."""
    from ftte.pipeline.config import shorthand_classes

    out = []
    for c in shorthand_classes(stragglers, straggler_memory_bytes):
        d = dataclasses.asdict(c)
        d["dropout"] = {**d["dropout"], "share": 0.0}
        out.append(d)
    return out


def device_lr_of(settings: StudySettings, spec: RunSpec) -> float | None:
    """The device lr of one run: the most specific of ``device_lrs`` ("ftte-private", then "ftte"), else
    ``device_lr`` (None: the config's)."""
    kind = "nonprivate" if spec.epsilon is None else "private"
    for key in (f"{spec.variant}-{kind}", spec.variant):
        if key in settings.device_lrs:
            return settings.device_lrs[key]
    return settings.device_lr


def parse_lrs(items: Sequence[str]) -> tuple[float | None, dict[str, float]]:
    """``--device-lr`` values: one plain number (every run) and/or NAME=LR items (see :func:`device_lr_of`)."""
    plain: float | None = None
    named: dict[str, float] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        if not sep:
            plain = float(value)
        else:
            base = name.removesuffix("-private").removesuffix("-nonprivate")
            if base not in VARIANTS:
                raise ValueError(f"--device-lr {item!r}: {base!r} is not a variant ({', '.join(VARIANTS)})")
            named[name] = float(value)
    return plain, named


def run_config(settings: StudySettings, spec: RunSpec) -> Any:
    from ftte.pipeline.config import load_config
    from ftte.pipeline.strategies import user_coordinate_cap

    base = load_config(None, preset=settings.preset)
    overrides: dict[str, Any] = {
        "run.strategy": VARIANTS[spec.variant]["strategy"],
        "run.seed": settings.seed,
        "run.max_versions": settings.versions,
        "run.max_virtual_time_s": settings.horizon_s,
        "fleet.devices": settings.devices,
        "fleet.classes": study_fleet_classes(base.fleet.stragglers, base.fleet.straggler_memory_bytes),
        "server.buffer_size": settings.buffer,
        "server.variance_penalty": 0.0,  # required by user-level DP; the same for every run
        "secagg.graph": "ring",
        "secagg.neighbors": settings.neighbors,
        "privacy.enabled": spec.epsilon is not None,
    }
    if settings.model is not None:
        overrides["model.name"] = settings.model
    lr = spec.lr if spec.lr is not None else device_lr_of(settings, spec)
    if lr is not None:
        overrides["train.lr"] = lr
    if settings.clip is not None:
        overrides["secagg.clip"] = settings.clip
    if settings.noise_ratio is not None:
        overrides["privacy.user_noise_ratio"] = settings.noise_ratio
    if settings.server_lr is not None:
        overrides["server.lr"] = settings.server_lr
    if settings.momentum is not None:
        overrides["server.momentum"] = settings.momentum
    if settings.threshold:
        overrides["secagg.threshold"] = settings.threshold
    if settings.max_coordinates and spec.variant == "ftte":
        overrides["train.max_coordinates"] = settings.max_coordinates
    if spec.epsilon is not None:
        overrides.update({"privacy.unit": "user", "privacy.user_noise": spec.noise,
                          "privacy.user_epsilon": spec.epsilon, "privacy.user_delta": settings.delta,
                          "privacy.user_participations": settings.participations})
    overrides.update(settings.extra)
    cfg = base.with_overrides(**overrides)
    if spec.variant == "ftte" and spec.epsilon is None:  # the same plan as ftte's private run at epsilon 8
        cap = user_coordinate_cap(run_config(settings, same_plan_spec(settings)))
        assert cap is not None
        cfg = cfg.with_overrides(**{"train.max_coordinates": min(cap, settings.max_coordinates or cap)})
    return cfg


def predicted_noise(cfg: Any, coordinates: int | None) -> dict[str, Any]:
    """A private run's plan cap and the predicted noise/signal ratio of its plan (the rule's formula)."""
    from ftte.pipeline.strategies import user_coordinate_cap, user_noise_terms
    from ftte.privacy.distributed_dp import mean_noise_ratio

    if not cfg.privacy.user_level or not coordinates:
        return {"coordinate_cap": None, "predicted_noise_ratio": None}
    return {"coordinate_cap": user_coordinate_cap(cfg),
            "predicted_noise_ratio": mean_noise_ratio(coordinates, **user_noise_terms(cfg))}


def run_record(spec: RunSpec, summary: dict[str, Any], history: Sequence[dict[str, Any]],
               settings: StudySettings, cfg: Any = None) -> dict[str, Any]:
    """One run's figures: final accuracy = mean of the last ``final_window`` evaluations up to the horizon."""
    from ftte.pipeline.report import evaluated_points, final_accuracy_mean

    points = evaluated_points(history, settings.horizon_s)
    return {
        "name": spec.name,
        "variant": spec.variant,
        "strategy": summary.get("strategy"),
        "plan": VARIANTS[spec.variant]["plan"],
        "trainable_coordinates": summary.get("trainable_coordinates"),
        "noise": spec.noise,
        "epsilon_target": spec.epsilon,
        "device_lr": cfg.train.lr if cfg is not None else spec.lr,
        "final_accuracy": final_accuracy_mean(history, settings.final_window, settings.horizon_s),
        "best_accuracy": max((a for _, a in points), default=None),
        "evaluations": len(points),
        "versions": summary.get("versions"),
        "epsilon_reached": summary.get("epsilon_max") if spec.epsilon is not None else None,
        "delta": summary.get("delta") if spec.epsilon is not None else None,
        "noise_multiplier": summary.get("noise_multiplier") if spec.epsilon is not None else None,
        "virtual_time_s": summary.get("virtual_time_s"),
        "updates_applied": summary.get("updates_applied"),
        "aborted_cohorts": summary.get("aborted_cohorts"),
        "devices_out_of_budget": summary.get("devices_out_of_budget"),
        "wall_time_s": summary.get("wall_time_s"),
        **(predicted_noise(cfg, summary.get("trainable_coordinates")) if cfg is not None else {}),
    }


def _find(runs: Sequence[dict[str, Any]], variant: str, noise: str, eps: float | None) -> dict[str, Any] | None:
    for r in runs:
        if r["variant"] == variant and r["noise"] == noise and r["epsilon_target"] == eps:
            return r
    return None


def _acc(r: dict[str, Any] | None) -> float | None:
    return None if r is None else r.get("final_accuracy")


def _best_nonprivate(runs: Sequence[dict[str, Any]], variant: str | None = None) -> dict[str, Any] | None:
    """The non-private run (of ``variant``; None: of any) with the highest final accuracy: with a
    learning-rate sweep, the reference the private runs are judged against."""
    pool = [r for r in runs if r["noise"] == "none" and (variant is None or r["variant"] == variant)
            and r.get("final_accuracy") is not None]
    return max(pool, key=lambda r: r["final_accuracy"], default=None)


def goals(runs: Sequence[dict[str, Any]], settings: StudySettings) -> dict[str, Any]:
    """The issue's three goals on final accuracy, each ``met`` True/False, or None when a run it needs is missing."""
    out: dict[str, Any] = {}
    at8 = _acc(_find(runs, "ftte", "distributed", GOAL_EPSILON))
    refs = {"": _best_nonprivate(runs, "ftte"), "_memory_plan": _best_nonprivate(runs, "ftte-memory"),
            "_any": _best_nonprivate(runs)}
    within: dict[str, Any] = {}
    for suffix, ref in refs.items():
        gap = None if ref is None or at8 is None else ref["final_accuracy"] - at8
        within["gap" + suffix] = gap
        within["met" + suffix] = None if gap is None else gap <= GOAL_NONPRIVATE_GAP
        within["reference" + suffix] = None if ref is None else {k: ref.get(k) for k in ("variant", "device_lr")}
    out["ftte_eps8_within_10_points_of_nonprivate"] = within
    ahead: dict[str, Any] = {}
    for eps in settings.epsilons:
        for noise in settings.noises:
            a, b = _acc(_find(runs, "ftte", noise, eps)), _acc(_find(runs, "fedbuff", noise, eps))
            ahead[f"{noise}-eps{eps:g}"] = {"ftte_minus_full": None if a is None or b is None else a - b}
    diffs = [v["ftte_minus_full"] for v in ahead.values()]
    out["ftte_ahead_of_full_model_at_every_epsilon"] = {
        "by_setting": ahead, "met": None if not diffs or None in diffs else all(d > 0 for d in diffs)}
    close: dict[str, Any] = {}
    for variant in (v for v in settings.variants if v not in NONPRIVATE_ONLY):
        for eps in settings.epsilons:
            a, b = _acc(_find(runs, variant, "distributed", eps)), _acc(_find(runs, variant, "server", eps))
            close[f"{variant}-eps{eps:g}"] = {"central_minus_distributed": None if a is None or b is None else b - a}
    diffs = [v["central_minus_distributed"] for v in close.values()]
    out["distributed_within_1_point_of_central"] = {
        "by_setting": close, "met": None if not diffs or None in diffs else all(d <= GOAL_DISTRIBUTED_GAP for d in diffs)}
    return out


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "—" if x is None else format(x, spec)


def markdown_table(runs: Sequence[dict[str, Any]], settings: StudySettings) -> str:
    """One row per run: final and best accuracy, versions, epsilon reached."""
    lines = ["| variant | plan (coordinates) | predicted noise/signal | noise | epsilon target | device lr | final acc "
             f"(mean of last {settings.final_window}) | best acc | versions | epsilon reached | aborted cohorts | devices "
             "out of budget | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['variant']} | {r['plan']} ({_fmt(r['trainable_coordinates'], ',')}) | "
                     f"{_fmt(r.get('predicted_noise_ratio'), '.2f')} | {r['noise']} | "
                     f"{_fmt(r.get('epsilon_target'), 'g')} | {_fmt(r.get('device_lr'), 'g')} | "
                     f"{_fmt(r['final_accuracy'])} | {_fmt(r['best_accuracy'])} | "
                     f"{_fmt(r['versions'], 'd')} | {_fmt(r['epsilon_reached'], '.3f')} | "
                     f"{_fmt(r['aborted_cohorts'], 'd')} | {_fmt(r.get('devices_out_of_budget'), 'd')} | "
                     f"{_fmt(r['wall_time_s'], '.0f')} |")
    return "\n".join(lines) + "\n"


def goals_text(g: dict[str, Any]) -> str:
    def word(met: bool | None) -> str:
        return "not measured" if met is None else ("met" if met else "MISSED")

    a = g["ftte_eps8_within_10_points_of_nonprivate"]
    b = g["ftte_ahead_of_full_model_at_every_epsilon"]
    c = g["distributed_within_1_point_of_central"]
    def ref(suffix: str) -> str:
        r = a.get("reference" + suffix)
        return "" if not r or r.get("device_lr") is None else f", its best run at device lr {r['device_lr']:g}"

    anyone = a.get("reference_any") or {}
    lines = [f"- ftte at epsilon 8 (distributed) within 10 points of non-private ftte with the same plan: "
             f"{word(a['met'])} (gap {_fmt(a['gap'], '+.4f')}{ref('')}); of non-private ftte with the memory-only "
             f"plan: {word(a.get('met_memory_plan'))} (gap {_fmt(a.get('gap_memory_plan'), '+.4f')}{ref('_memory_plan')}); "
             f"of the best non-private run of any variant ({anyone.get('variant', '—')}): {word(a.get('met_any'))} "
             f"(gap {_fmt(a.get('gap_any'), '+.4f')}{ref('_any')})",
             f"- ftte ahead of the full model at every epsilon: {word(b['met'])} ("
             + ", ".join(f"{k} {_fmt(v['ftte_minus_full'], '+.4f')}" for k, v in b["by_setting"].items()) + ")",
             f"- distributed within 1 point of central: {word(c['met'])} ("
             + ", ".join(f"{k} {_fmt(v['central_minus_distributed'], '+.4f')}" for k, v in c["by_setting"].items())
             + "; central minus distributed)"]
    return "\n".join(lines) + "\n"


def plot(runs: Sequence[dict[str, Any]], settings: StudySettings, path: Path) -> None:
    """Final accuracy against epsilon, one line per (variant, noise); non-private as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = {"ftte": "tab:blue", "fedbuff": "tab:red", "ftte-memory": "tab:gray"}
    for variant in settings.variants:
        color = colors.get(variant)
        label = f"{variant} ({VARIANTS[variant]['plan']})"
        for noise, style in (("distributed", "-o"), ("server", "--s")):
            pts = [(r["epsilon_target"], r["final_accuracy"]) for r in runs
                   if r["variant"] == variant and r["noise"] == noise and r["final_accuracy"] is not None]
            if pts:
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=f"{label}, {noise} noise")
        base = _acc(_best_nonprivate(runs, variant))
        if base is not None:
            ax.axhline(base, color=color, linestyle=":", label=f"{label}, non-private")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(settings.epsilons))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel(f"user-level epsilon (delta {settings.delta:g}, {settings.participations} participations)")
    ax.set_ylabel(f"final test accuracy (mean of last {settings.final_window})")
    ax.set_title(f"{settings.devices} devices, cohorts of {settings.buffer} (ring), horizon {settings.horizon_s:g} s")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: Path, settings: StudySettings, runs: list[dict[str, Any]], *, figures: bool = True,
                  complete: bool = False) -> dict[str, Any]:
    doc = {"settings": {**dataclasses.asdict(settings), "epsilons": list(settings.epsilons)},
           "complete": complete, "runs": runs, "goals": goals(runs, settings)}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "study.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(out / "study.json")
    (out / "table.md").write_text(markdown_table(runs, settings) + "\n" + goals_text(doc["goals"]))
    if figures and runs:
        plot(runs, settings, out / "accuracy_vs_epsilon.png")
    return doc


def run_study(settings: StudySettings, out: Path, *, quiet: bool = False, figures: bool = True) -> dict[str, Any]:
    """Run the grid one run at a time, writing the outputs after each."""
    import torch

    from ftte.pipeline.run_outputs import run_one

    torch.set_num_threads(1)
    specs = grid(settings)
    runs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        cfg = run_config(settings, spec)
        if not quiet:
            print(f"[{i}/{len(specs)}] {spec.name} (elapsed {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        result = run_one(cfg, out / "runs" / spec.name, quiet=quiet, label=spec.name)
        runs.append(run_record(spec, result.summary, result.history, settings, cfg))
        r = runs[-1]
        if not quiet:
            print(f"    final {_fmt(r['final_accuracy'])}  best {_fmt(r['best_accuracy'])}  versions {r['versions']}  "
                  f"epsilon {_fmt(r['epsilon_reached'], '.3f')}  aborted {r['aborted_cohorts']}", file=sys.stderr,
                  flush=True)
        write_outputs(out, settings, runs, figures=figures, complete=i == len(specs))
    return write_outputs(out, settings, runs, figures=figures, complete=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--buffer", type=int, default=100, help="cohort size K (the buffer)")
    ap.add_argument("--horizon", type=float, default=36000.0, help="virtual seconds, the same for every run")
    ap.add_argument("--versions", type=int, default=0, help="cap on versions per run, 0 = none (the horizon only)")
    ap.add_argument("--eps", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    ap.add_argument("--noise", nargs="+", default=list(NOISES), choices=NOISES)
    ap.add_argument("--variants", nargs="+", default=["ftte", "fedbuff", "ftte-memory"], choices=list(VARIANTS),
                    help="ftte-memory: non-private ftte with the plan memory alone picks (its only run)")
    ap.add_argument("--noise-ratio", type=float, default=None,
                    help="[privacy] user_noise_ratio, the user-level plan rule's cap (default: the config's)")
    ap.add_argument("--server-lr", type=float, default=None, help="server learning rate (default: the config's)")
    ap.add_argument("--momentum", type=float, default=None,
                    help="[server] momentum, FedAvgM-style, in [0, 1) (default: the config's)")
    ap.add_argument("--threshold", type=int, default=0,
                    help="[secagg] threshold T of each cohort (0: the config's, a majority); distributed noise is "
                         "calibrated for T - max_corrupt survivors, so a higher T means less noise with every member "
                         "surviving and more aborted cohorts")
    ap.add_argument("--max-coordinates", type=int, default=0,
                    help="cap ftte's plan at this many coordinates in every ftte run (the rule's cap still applies "
                         "below it), so that noises and thresholds compete on the same plan (0: the rule alone)")
    ap.add_argument("--delta", type=float, default=1e-6)
    ap.add_argument("--participations", type=int, default=8, help="cohorts each device may join ([privacy] user_participations)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--neighbors", type=int, default=10,
                    help="ring neighbours per member (10: with 4, one of a member's 4 neighbours dropping after the "
                         "share stage aborts the cohort, most cohorts of 100 abort)")
    ap.add_argument("--device-lr", nargs="+", default=[],
                    help="device learning rate: LR for every run and/or NAME=LR, NAME a variant, optionally with "
                         "-private or -nonprivate (e.g. ftte=3 ftte-memory=0.1 fedbuff-private=1); default: the config's")
    ap.add_argument("--nonprivate-lrs", type=float, nargs="+", default=[], metavar="LR",
                    help="run each non-private variant at each of these device lrs; the goals judge against each "
                         "variant's best (default: one run at the --device-lr rate)")
    ap.add_argument("--clip", type=float, default=None,
                    help="[secagg] clip: each update's L2 bound, the user-level sensitivity (default: the config's)")
    ap.add_argument("--preset", default=None, help="a packaged preset instead of the default task")
    ap.add_argument("--out", type=Path, default=Path("runs/user_dp_study"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    device_lr, device_lrs = parse_lrs(args.device_lr)
    settings = StudySettings(devices=args.devices, buffer=args.buffer, horizon_s=args.horizon, versions=args.versions,
                             epsilons=tuple(args.eps), noises=tuple(args.noise), variants=tuple(args.variants),
                             delta=args.delta, participations=args.participations, seed=args.seed,
                             neighbors=args.neighbors, device_lr=device_lr, device_lrs=device_lrs, clip=args.clip,
                             preset=args.preset, noise_ratio=args.noise_ratio, server_lr=args.server_lr,
                             momentum=args.momentum, threshold=args.threshold, max_coordinates=args.max_coordinates,
                             nonprivate_lrs=tuple(args.nonprivate_lrs))
    doc = run_study(settings, args.out, quiet=args.quiet)
    print(markdown_table(doc["runs"], settings))
    print(goals_text(doc["goals"]))
    print(f"wrote {args.out / 'study.json'}, {args.out / 'table.md'}, {args.out / 'accuracy_vs_epsilon.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
