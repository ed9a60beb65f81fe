"""``ftte bench memory``: measured DP-SGD training memory, full model versus budgeted subset.

1. Measure the peak memory of one full-model DP-SGD step (``full_bytes``).
2. Budget = ``--budget-fraction`` x ``full_bytes``; search the best subset plan whose
   estimated peak fits, then measure it (``subset_bytes``; the search retries with a
   tighter limit if the measurement overshoots).
3. Print ``ratio = subset_bytes / full_bytes`` and how far the estimator was off.

What "memory" counts is defined in :mod:`ftte.edge.memory` (parameters, optimizer state
and batch, plus the allocator-level peak of everything the step allocates).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="cnn28", help="bundled model name or 'package.module:factory' (default cnn28)"
    )
    parser.add_argument(
        "--input-shape",
        default=None,
        help="per-sample input shape, comma separated (required for a 'module:factory' model), e.g. 1,28,28",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="samples per step (default 64)")
    parser.add_argument(
        "--budget-fraction", type=float, default=0.2, help="budget as a fraction of full_bytes (default 0.2)"
    )
    parser.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default="momentum")
    parser.add_argument("--non-private", action="store_true", help="measure plain SGD steps instead of DP-SGD")
    parser.add_argument(
        "--prefix-chunk",
        type=int,
        default=0,
        help="run the frozen prefix in micro-batches of this many samples (0: whole batch, the default)",
    )
    parser.add_argument(
        "--granularity", choices=("layer", "tensor"), default="layer", help="plan units (default layer)"
    )
    parser.add_argument(
        "--step-times",
        action="store_true",
        help="also time private vs non-private steps on the chosen subset and the full model, side by side",
    )
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds for --step-times (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _shape(args: argparse.Namespace) -> tuple[int, ...]:
    from ftte.edge.models import MODELS, model_input_shape

    if args.input_shape:
        return tuple(int(s) for s in args.input_shape.split(",") if s.strip())
    if args.model in MODELS:
        return model_input_shape(args.model)
    raise ValueError(f"--input-shape is required for model {args.model!r}")


def run(args: argparse.Namespace) -> int:
    import opacus
    import torch

    from ftte.edge.memory import MemoryEstimator, TrainingSetup, measure_training_memory, relative_error
    from ftte.edge.models import MODELS, build_model, make_dp_compatible
    from ftte.edge.plan import SubsetPlan
    from ftte.edge.plan_search import BudgetTooSmallError, search_plan

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    try:
        if args.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        if not 0.0 < args.budget_fraction <= 1.0:
            raise ValueError("--budget-fraction must be in (0, 1]")
        if args.prefix_chunk < 0:
            raise ValueError("--prefix-chunk must be >= 0")
        shape = _shape(args)
        model = build_model(args.model)
        if not args.non_private:
            model = make_dp_compatible(model)
    except (ValueError, TypeError) as exc:
        print(f"ftte bench memory: {exc}", file=sys.stderr)
        return 2

    dp = not args.non_private
    setup = TrainingSetup(args.batch_size, shape, dp=dp, optimizer=args.optimizer)
    full_plan = SubsetPlan.full(model)
    estimator = MemoryEstimator(model, shape)
    full_meas = measure_training_memory(model, full_plan, setup, seed=args.seed)
    full_est = estimator.estimate(full_plan, args.batch_size, dp=dp, optimizer=args.optimizer)
    budget = int(args.budget_fraction * full_meas.peak_bytes)

    result: dict = {
        "model": args.model,
        "input_shape": list(shape),
        "batch_size": args.batch_size,
        "dp": dp,
        "optimizer": args.optimizer,
        "full_bytes": full_meas.peak_bytes,
        "full_estimate_bytes": full_est.peak_bytes,
        "full_estimate_error": round(relative_error(full_est.peak_bytes, full_meas.peak_bytes), 4),
        "full_peak_phase": full_meas.peak_phase,
        "prefix_chunk": args.prefix_chunk or None,
        "budget_fraction": args.budget_fraction,
        "budget_bytes": budget,
    }
    try:
        choice = search_plan(
            model,
            budget,
            batch_size=args.batch_size,
            input_shape=shape,
            dp=dp,
            optimizer=args.optimizer,
            granularity=args.granularity,
            prefix_chunk=args.prefix_chunk or None,
            verify=True,
        )
    except BudgetTooSmallError as exc:
        result.update({"error": str(exc), "seconds": round(time.perf_counter() - t0, 2)})
        _emit(result, args.json)
        return 1
    sub = choice.measured
    assert sub is not None
    result.update(
        {
            "subset_bytes": sub.peak_bytes,
            "subset_estimate_bytes": choice.estimate.peak_bytes,
            "estimate_error": round(relative_error(choice.estimate.peak_bytes, sub.peak_bytes), 4),
            "ratio": round(sub.peak_bytes / full_meas.peak_bytes, 4),
            "fits_budget": sub.peak_bytes <= budget,
            "subset_peak_phase": sub.peak_phase,
            "plan_id": choice.plan.plan_id,
            "plan_hash": choice.plan.content_hash,
            "trainable": list(choice.plan.trainable),
            "trainable_coordinates": choice.plan.num_coordinates,
            "total_coordinates": choice.plan.total_coordinates,
            "search": {
                "method": choice.method,
                "candidates": choice.candidates_evaluated,
                "score": "parameter count (no calibration data)",
                "score_fraction": round(choice.score_fraction, 4),
            },
            "full_breakdown": _breakdown(full_meas),
            "subset_breakdown": _breakdown(sub),
        }
    )
    if args.step_times:
        from ftte.bench.step_times import compare_step_times

        if args.model not in MODELS:
            result["step_times"] = {"error": "--step-times supports bundled models only"}
        else:
            result["step_times"] = compare_step_times(
                args.model,
                batch_size=args.batch_size,
                budget_fraction=args.budget_fraction,
                rounds=args.rounds,
                seed=args.seed,
                prefix_chunk=args.prefix_chunk or None,
            )
    result["versions"] = {"torch": torch.__version__, "opacus": opacus.__version__, "python": platform.python_version()}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    _emit(result, args.json)
    return 0


def _breakdown(m) -> dict:
    return {
        "baseline_bytes": m.baseline_bytes,
        "parameter_bytes": m.parameter_bytes,
        "optimizer_state_bytes": m.optimizer_state_bytes,
        "batch_bytes": m.batch_bytes,
        "saved_activation_bytes": m.saved_activation_bytes,
        "gradient_bytes": m.gradient_bytes,
        "per_sample_gradient_bytes": m.per_sample_gradient_bytes,
        "phase_peaks": m.phase_peaks,
    }


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=False))
        return
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
