"""``ftte bench clipping``: peak memory of one DP-SGD step, per-sample versus ghost clipping.

For the full model and for heads of growing depth (the last one, two, ... parameter
layers), measure one real step in each clipping mode (:func:`ftte.edge.memory.measure_training_memory`)
and put the estimator's prediction next to it. Optionally (``--budget``) run the plan
search with ``clipping="auto"`` and with per-sample clipping only, and report what each
buys under that budget.

Run as ``python -m ftte.bench.clipping_memory --model cnn28 --json`` (or through the
``ftte`` command once registered as ``bench clipping``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

__all__ = ["configure", "run", "clipping_table"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="cnn28", help="bundled model name (default cnn28)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per step (default 64)")
    parser.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default="momentum")
    parser.add_argument("--prefix-chunk", type=int, default=0,
                        help="run the frozen prefix in micro-batches of this many samples (0: whole batch)")
    parser.add_argument("--heads", type=int, default=3, help="heads of 1..N parameter layers to measure (default 3)")
    parser.add_argument("--budget", type=int, default=0, help="also search plans under this many bytes (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def clipping_table(model_name: str, batch_size: int, *, optimizer: str = "momentum", heads: int = 3,
                   seed: int = 0, prefix_chunk: int | None = None) -> list[dict]:
    """One row per (plan, clipping mode): measured and estimated peak bytes and the error."""
    from ftte.edge.memory import MemoryEstimator, TrainingSetup, measure_training_memory, relative_error
    from ftte.edge.models import build_model, make_dp_compatible, model_input_shape
    from ftte.edge.plan import SubsetPlan

    model = make_dp_compatible(build_model(model_name))
    shape = model_input_shape(model_name)
    layers = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    plans = {"full": SubsetPlan.full(model)}
    for k in range(1, min(heads, len(layers) - 1) + 1):
        plans[f"head{k}"] = SubsetPlan.from_layers(model, layers[-k:])
    estimator = MemoryEstimator(model, shape)
    rows = []
    for plan_name, plan in plans.items():
        for mode in ("per_sample", "ghost"):
            setup = TrainingSetup(batch_size, shape, dp=True, optimizer=optimizer,  # type: ignore[arg-type]
                                  prefix_chunk=prefix_chunk, clipping=mode)  # type: ignore[arg-type]
            measured = measure_training_memory(model, plan, setup, seed=seed)
            est = estimator.estimate(plan, batch_size, optimizer=optimizer,  # type: ignore[arg-type]
                                     prefix_chunk=prefix_chunk, clipping=mode)  # type: ignore[arg-type]
            rows.append({
                "plan": plan_name,
                "trainable_layers": list(plan.trainable_layers),
                "trainable_coordinates": plan.num_coordinates,
                "clipping": mode,
                "measured_bytes": measured.peak_bytes,
                "estimate_bytes": est.peak_bytes,
                "estimate_error": round(relative_error(est.peak_bytes, measured.peak_bytes), 4),
                "peak_phase": measured.peak_phase,
                "per_sample_gradient_bytes": measured.per_sample_gradient_bytes,
            })
    return rows


def run(args: argparse.Namespace) -> int:
    import opacus
    import torch

    from ftte.edge.models import MODELS, build_model, make_dp_compatible, model_input_shape
    from ftte.edge.plan_search import BudgetTooSmallError, search_plan

    if args.model not in MODELS:
        print(f"ftte bench clipping: unknown bundled model {args.model!r}", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.heads < 1 or args.budget < 0 or args.prefix_chunk < 0:
        print("ftte bench clipping: --batch-size and --heads must be >= 1, --budget and --prefix-chunk >= 0",
              file=sys.stderr)
        return 2
    chunk = args.prefix_chunk or None
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    rows = clipping_table(args.model, args.batch_size, optimizer=args.optimizer, heads=args.heads, seed=args.seed,
                          prefix_chunk=chunk)
    result: dict = {"model": args.model, "batch_size": args.batch_size, "optimizer": args.optimizer,
                    "prefix_chunk": chunk, "rows": rows}
    result["max_abs_estimate_error"] = {
        mode: max(abs(r["estimate_error"]) for r in rows if r["clipping"] == mode) for mode in ("per_sample", "ghost")
    }
    if args.budget:
        model = make_dp_compatible(build_model(args.model))
        searches = {}
        for mode in ("per_sample", "auto"):
            try:
                c = search_plan(model, args.budget, batch_size=args.batch_size, input_shape=model_input_shape(args.model),
                                optimizer=args.optimizer, clipping=mode, verify=True,  # type: ignore[arg-type]
                                prefix_chunk=chunk)
            except BudgetTooSmallError as exc:
                searches[mode] = {"error": str(exc)}
                continue
            assert c.measured is not None
            searches[mode] = {
                "clipping": c.clipping,
                "trainable": list(c.plan.trainable),
                "trainable_coordinates": c.plan.num_coordinates,
                "measured_bytes": c.measured.peak_bytes,
                "estimate_bytes": c.estimate.peak_bytes,
                "score_fraction": round(c.score_fraction, 4),
            }
        result["budget_bytes"] = args.budget
        result["search"] = searches
    result["versions"] = {"torch": torch.__version__, "opacus": opacus.__version__, "python": platform.python_version()}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model} batch {args.batch_size} ({args.optimizer}, prefix chunk {chunk})")
        print(f"{'plan':8s} {'coords':>8s} {'clipping':10s} {'measured':>11s} {'estimate':>11s} {'error':>7s}  phase")
        for r in rows:
            print(f"{r['plan']:8s} {r['trainable_coordinates']:>8d} {r['clipping']:10s} {r['measured_bytes']:>11d} "
                  f"{r['estimate_bytes']:>11d} {r['estimate_error']:>+7.1%}  {r['peak_phase']}")
        for mode, s in result.get("search", {}).items():
            print(f"search[{mode}] under {args.budget} bytes: {s}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftte.bench.clipping_memory", description=__doc__.splitlines()[0])
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
