"""Single runs of the user-level study's setting, for tuning on a seed the study does not report.

Each argument ``VARIANT:RATIO:LR:EPS[:THRESHOLD[:NOISE]]`` is one run of
:func:`ftte.bench.user_dp_study.run_config` (1,000 devices, cohorts of 100 on the ring) with
``[privacy] user_noise_ratio`` RATIO, device lr LR, user-level epsilon EPS (``none``: the variant's
non-private run, which for ``ftte`` trains the plan of its private run at epsilon 8 under the same
ratio and participations, as in the study), ``[secagg] threshold`` THRESHOLD (0: the default
majority) and noise NOISE (``distributed``); one JSON line per run.

    .venv/bin/python -m ftte.bench.user_dp_tune OUT HORIZON_S [--seed 1] [--buffer K] [--clip C] [--server-lr LR]
        [--momentum B] [--participations P] [--max-coordinates N] ftte:1:3:8 ftte:2:3:8 fedbuff:1:1:8 ftte-memory:3.5:0.3:none
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    import torch

    from ftte.bench.user_dp_study import GOAL_EPSILON, RunSpec, StudySettings, run_config, run_record
    from ftte.pipeline.run_outputs import run_one

    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("horizon", type=float)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--buffer", type=int, default=100, help="cohort size K (the study's 100)")
    ap.add_argument("--clip", type=float, default=None, help="[secagg] clip (default: the config's)")
    ap.add_argument("--server-lr", type=float, default=None, help="[server] lr (default: the config's)")
    ap.add_argument("--momentum", type=float, default=None, help="[server] momentum (default: the config's)")
    ap.add_argument("--participations", type=int, default=8, help="[privacy] user_participations (the study's 8)")
    ap.add_argument("--max-coordinates", type=int, default=0,
                    help="cap ftte's plan at this many coordinates (see user_dp_study; 0: the rule alone)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for arg in args.runs:
        parts = arg.split(":")
        variant, ratio, lr, eps, thr, noise = parts + ["0", "distributed"][len(parts) - 4:]
        private = eps != "none"
        epsilon = float(eps) if private else None
        s = StudySettings(horizon_s=args.horizon, buffer=args.buffer, device_lr=float(lr), seed=args.seed,
                          noise_ratio=float(ratio),
                          clip=args.clip, server_lr=args.server_lr, momentum=args.momentum,
                          participations=args.participations, threshold=int(thr),
                          max_coordinates=args.max_coordinates,
                          epsilons=(epsilon if private else GOAL_EPSILON,))
        spec = RunSpec(variant, noise if private else "none", epsilon)
        cfg = run_config(s, spec)
        t = time.time()
        name = f"{variant}-{spec.noise}-ratio{ratio}-lr{lr}-eps{eps}-t{thr}-h{args.horizon:g}-p{args.participations}"
        name += f"-k{args.buffer}" if args.buffer != 100 else ""
        name += "".join(f"-{tag}{v:g}" for tag, v in (("clip", args.clip), ("slr", args.server_lr),
                                                     ("mom", args.momentum), ("seed", args.seed)) if v is not None)
        res = run_one(cfg, args.out / name, quiet=True)
        r = run_record(spec, res.summary, res.history, s, cfg)
        keep = ("trainable_coordinates", "predicted_noise_ratio", "final_accuracy", "best_accuracy", "versions",
                "aborted_cohorts", "devices_out_of_budget")
        print(json.dumps({"variant": variant, "noise": spec.noise, "buffer": args.buffer,
                          "threshold": cfg.secagg.threshold,
                          "ratio": float(ratio), "lr": float(lr), "eps": epsilon,
                          "participations": args.participations, "clip": cfg.secagg.clip, "server_lr": cfg.server.lr,
                          "momentum": cfg.server.momentum, "seed": args.seed, **{k: r[k] for k in keep},
                          "wall": round(time.time() - t)}), flush=True)


if __name__ == "__main__":
    main()
