"""pytest-benchmark: a device's per-round costs by phase, for the plan ``ftte bench device`` deploys.

Run with timings: ``pytest bench/test_bench_device.py --benchmark-enable --benchmark-json=FILE``.
Without ``--benchmark-enable`` each body runs once, as a smoke test.

Two kinds of case:

* in-process phases (this process, not confined): one local round of the default plan
  with and without DP and of the full model with and without DP, the update's encoding
  (clip, weight, quantize), one member's share of a whole secure-aggregation session
  (``run_session``, three members, the plan's size) and the signature of one request;
* ``test_confined_device_round`` (slow): one whole ``ftte bench device`` run, a real
  server and a device process confined to a quarter of one core; its per-phase medians,
  overhead ratio and memory figures go to ``extra_info`` in the JSON.

Each in-process case runs for both tasks of ``ftte bench device`` (``--task``): ``mnist``, the
default configuration's task (cnn28 on 28x28 MNIST, its [train] steps, the simulator's plan
and clipping mode for its weakest default class), and ``digits`` (the mlp on 8x8 digits, 5
steps, the straggler class's plan), with the plan :func:`ftte.bench.device_bench.task_plan`
gives, as in ``ftte bench device``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest

from ftte.bench.device_bench import bench_task, task_plan

GROUP = "device-phase"


@pytest.fixture(scope="module", params=["mnist", "digits"])
def setting(request, tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    task = bench_task(request.param)
    if task.name == "mnist":
        from ftte.pipeline.datasets import load_mnist

        x, y = load_mnist()
    else:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
    x = ((x - x.mean()) / x.std()).astype(np.float32).reshape((len(x),) + task.input_shape)
    y = y.astype(np.int64)
    chosen = task_plan(task, x, y)
    return task, chosen, x[:480], y[:480], tmp_path_factory.mktemp(f"device-bench-{task.name}")


def _trainer(model, plan, dp: bool, directory: Path, task, chosen):
    from ftte.edge.runtime import LocalTrainer, TrainSettings
    from ftte.privacy.accountant import AccountantStore
    from ftte.privacy.dpsgd import DPConfig

    cfg = (DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", epsilon_max=1e12)
           if dp else DPConfig(enabled=False))
    store = AccountantStore(directory / f"{plan.plan_id}-{dp}.db")
    subset = plan is chosen.plan  # the full model has no frozen prefix
    settings = TrainSettings(task.local_steps, task.batch_size, task.lr, chosen.clipping,
                             chosen.prefix_chunk if subset else None)
    return LocalTrainer(model, plan, cfg, settings, store), store


@pytest.mark.parametrize("dp", [True, False], ids=["dp", "plain"])
@pytest.mark.parametrize("which", ["subset", "full"])
def test_local_round(benchmark, setting, which: str, dp: bool) -> None:
    from ftte.edge.plan import SubsetPlan, subset_vector

    task, chosen, x, y, directory = setting
    model = chosen.model
    pl = chosen.plan if which == "subset" else SubsetPlan.full(model)
    trainer, store = _trainer(model, pl, dp, directory, task, chosen)
    weights = subset_vector(model, pl)
    trainer.train(1, 0, weights, x, y)  # warm-up: Opacus's first step
    benchmark.group = f"{GROUP}-{task.name}-train"
    benchmark.extra_info.update(task=task.name, plan=which, coordinates=pl.num_coordinates, dp=dp,
                                local_steps=task.local_steps, clipping=chosen.clipping)
    update = benchmark.pedantic(trainer.train, args=(1, 0, weights, x, y), rounds=10, iterations=1, warmup_rounds=1)
    trainer.close()
    store.close()
    assert update.delta.shape == (pl.num_coordinates,) and np.all(np.isfinite(update.delta))


def test_encoding(benchmark, setting) -> None:
    from ftte.crypto.quantize import choose_ring_bits
    from ftte.protocol.encoding import UpdateCodec, weigh_update
    from ftte.protocol.weighting import WeightRule

    task, chosen, _, _, _ = setting
    plan = chosen.plan
    codec = UpdateCodec(plan.num_coordinates, 2.0, 12, choose_ring_bits(3, 12))
    rng = np.random.default_rng(0)
    delta = rng.normal(0, 0.05, plan.num_coordinates).astype(np.float32)
    rule = WeightRule(0.5, 0.0, 0.1)

    def encode():
        w = weigh_update(delta, 0, 1, None, rule, codec.clip)
        return codec.encode(w.weighted, w.weight, w.variance, rng)

    benchmark.group = f"{GROUP}-{task.name}-protocol"
    out = benchmark.pedantic(encode, rounds=50, iterations=1, warmup_rounds=2)
    assert out.shape == (plan.num_coordinates + 2,)


def test_secagg_member_share(benchmark, setting) -> None:
    """A whole three-member session in-process; one member's share is the total over three minus the server."""
    from ftte.bench.secagg_run import SecAggBenchConfig, make_cohort
    from ftte.crypto.secagg_local import run_session

    task, chosen, _, _, _ = setting
    plan = chosen.plan
    params, identities, inputs, _, _ = make_cohort(SecAggBenchConfig(clients=3, dim=plan.num_coordinates + 2,
                                                                     dropout=0.0))
    benchmark.group = f"{GROUP}-{task.name}-protocol"
    result, stats = benchmark.pedantic(run_session, args=(params, identities, inputs), rounds=10, iterations=1,
                                       warmup_rounds=1)
    assert result is not None
    expected = sum(inputs[m].astype(object) for m in params.members)
    assert np.array_equal(result.total.astype(object) % (1 << params.ring_bits),
                          expected % (1 << params.ring_bits))
    benchmark.extra_info.update(members=3, dim=params.dim, server_seconds_last=stats.server_seconds)


def test_request_signature(benchmark) -> None:
    from ftte.crypto.primitives import Signer
    from ftte.http_auth import signed_headers

    signer = Signer()
    body = bytes(3000)
    benchmark.group = f"{GROUP}-protocol"
    headers = benchmark.pedantic(signed_headers, args=(signer.sign, signer.public_key.hex(), "/v1/submit", body),
                                 kwargs={"time_ms": 1}, rounds=200, iterations=1)
    assert headers


@pytest.mark.slow
@pytest.mark.parametrize("task", ["mnist", "digits"])
def test_confined_device_round(benchmark, tmp_path, task: str) -> None:
    """One ``ftte bench device`` run (2 rounds, a quarter core): its figures go to ``extra_info``."""
    from ftte.bench.device_bench import measure, summarize

    args = argparse.Namespace(cpu=0.25, memory=768 << 20, rounds=2, devices=3, task=task, model=None,
                              local_steps=None, batch_size=None, lr=None, noise_multiplier=1.0, side_reps=3,
                              mechanism="auto", out=str(tmp_path), timeout=540.0, json=True, throttle=False)
    doc = benchmark.pedantic(measure, args=(args,), rounds=1, iterations=1)
    s = summarize(doc)
    benchmark.group = f"{GROUP}-{task}-confined"
    benchmark.extra_info.update(
        mechanism=s["device"]["mechanism"], cpu_share=s["device"]["measured_cpu_share"],
        phases_cpu_s={k: v["cpu_s"] for k, v in s["phases_per_round"].items()},
        phases_wall_s={k: v["wall_s"] for k, v in s["phases_per_round"].items()},
        overhead_ratio_cpu=s["overhead_ratio_cpu"], startup_wall_s=s["startup"]["total_wall_s"],
        peak_rss_bytes=s["memory"]["peak_rss_rounds_bytes"],
        training_memory_bytes=s["memory"]["training_memory"]["subset"]["measured_bytes"])
    assert all(r == "applied" for r in s["rounds"]["statuses"])
    assert math.isfinite(s["overhead_ratio_cpu"])
