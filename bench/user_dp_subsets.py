"""Where subsets help user-level DP: noise on the cohort mean per trained coordinate, subset vs full model.

The noise a user-level mechanism adds to the mean of ``n`` clipped updates has, per trained
coordinate, a standard deviation of about ``z C / n`` (times the survivor calibration factor),
while a clipped update's signal per coordinate is about ``C / sqrt(d)``. Their ratio grows as
``sqrt(d) / n``: fewer trained coordinates, less relative noise. This script computes it for
the default task's (digits, cnn8) ftte subset plan and for the full model, at a cohort of 100,
for user-level epsilon in {2, 4, 8} at delta 1e-6, from the real planner and the real accountant.

    .venv/bin/python -m ftte.bench.user_dp_subsets [--participations 8] [--members 100]

Two figures per setting, both "noise std per coordinate on the mean / C / sqrt(d)":

* ``distributed``: every device's discrete Gaussian, calibrated so ``T - max_corrupt`` honest
  survivors carry the target; measured with all ``n`` survivors (the expected case), so the
  noise is ``sqrt(n / m)`` times the target;
* ``central``: a trusted server adding ``N(0, (z C)^2)`` to the sum once.
"""

from __future__ import annotations

import argparse

from ftte.privacy.distributed_dp import (max_coordinates_for_ratio, mean_noise_ratio, multiplier_for_budget,
                                         plan_user_dp)


def plan_sizes() -> dict[str, int]:
    """Trained coordinates of the default config's ftte plan and of the full model."""
    import torch

    from ftte.edge.plan import SubsetPlan
    from ftte.pipeline.config import load_config
    from ftte.pipeline.datasets import load_dataset
    from ftte.pipeline.fleet import build_fleet
    from ftte.pipeline.model_builder import build_global_model
    from ftte.pipeline.strategies import strategy_for

    torch.set_num_threads(1)
    cfg = load_config(None, preset="digits")
    seed = cfg.run.seed
    data = load_dataset(cfg.data, seed, cfg.fleet.devices)
    fleet = build_fleet(cfg.fleet, cfg.fleet.devices, seed)
    model = build_global_model(cfg.model.name, seed, data.input_shape, data.n_classes)
    plan, _ = strategy_for(cfg).choose_plan(model, data, fleet)
    return {"subset": plan.num_coordinates, "full": SubsetPlan.full(model).num_coordinates,
            "model": cfg.model.name, "data": cfg.data.name}  # type: ignore[dict-item]


def noise_ratios(dim: int, epsilon: float, delta: float, participations: int, members: int, threshold: int,
                 max_corrupt: int = 0, clip: float = 1.0) -> dict[str, float]:
    """Both ratios of :func:`~ftte.privacy.distributed_dp.mean_noise_ratio` (the one definition, which the
    user-level plan rule caps too) at the multiplier ``participations`` cohorts within (epsilon, delta) need."""
    z = multiplier_for_budget(epsilon, delta, participations)
    params = plan_user_dp(dim=dim, clip=clip, noise_multiplier=z, members=members, threshold=threshold,
                          max_corrupt=max_corrupt)
    kw = dict(noise_multiplier=z, members=members, threshold=threshold, max_corrupt=max_corrupt)
    return {"z": z, "distributed": mean_noise_ratio(dim, **kw), "central": mean_noise_ratio(dim, central=True, **kw),
            "wrap": params.wrap_probability(), "scale": params.scale}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--members", type=int, default=100)
    ap.add_argument("--threshold", type=int, default=0, help="0: a strict majority")
    ap.add_argument("--participations", type=int, default=8,
                    help="cohorts each device joins over the run (composition; default 8 = 80 versions x 100 / 1000)")
    ap.add_argument("--delta", type=float, default=1e-6)
    ap.add_argument("--max-corrupt", type=int, default=0, help="colluders the noise calibration discounts")
    ap.add_argument("--dims", type=int, nargs="+", default=None,
                    help="plan sizes (coordinates) to evaluate instead of the digits preset's subset and full model")
    ap.add_argument("--ratio", type=float, default=None,
                    help="also print the user-level plan rule's cap (most coordinates) at this user_noise_ratio")
    args = ap.parse_args(argv)
    threshold = args.threshold or (args.members + args.max_corrupt) // 2 + 1
    if args.dims:
        sizes: dict = {f"d{i}": d for i, d in enumerate(args.dims)}
        names = list(sizes)
        print(f"given plan sizes {args.dims}", end="; ")
    else:
        sizes, names = plan_sizes(), ["subset", "full"]
        print(f"task {sizes['data']}/{sizes['model']}: subset plan trains {sizes['subset']} coordinates, "
              f"full model {sizes['full']}", end="; ")
    print(f"cohort {args.members}, T = {threshold}, max_corrupt {args.max_corrupt}, "
          f"{args.participations} participations per device, delta {args.delta:g}")
    print("epsilon  z       plan     d       noise/signal per coord: distributed  central")
    for eps in (2.0, 4.0, 8.0):
        for name in names:
            r = noise_ratios(sizes[name], eps, args.delta, args.participations, args.members, threshold,
                             max_corrupt=args.max_corrupt)
            print(f"{eps:<8g} {r['z']:<7.3f} {name:<8} {sizes[name]:<7d} {r['distributed']:>32.3f}  {r['central']:.3f}")
        if args.ratio is not None:
            z = multiplier_for_budget(eps, args.delta, args.participations)
            caps = [max_coordinates_for_ratio(args.ratio, noise_multiplier=z, members=args.members, threshold=threshold,
                                              max_corrupt=args.max_corrupt, central=c) for c in (False, True)]
            print(f"{eps:<8g} cap at ratio {args.ratio:g}: distributed {caps[0]} coordinates, central {caps[1]}")

if __name__ == "__main__":
    main()
