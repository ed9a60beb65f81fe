"""Micro-batching the frozen prefix: same training step, lower peak, chosen by the plan search.

The prefix is frozen, in eval mode and normalises per sample (GroupNorm), so running it
over chunks of the batch must give the suffix the same input, and so the same DP-SGD
update, as running it over the whole batch; only its working set shrinks. These tests
run real Opacus steps (both clipping modes), the device's own round
(:class:`ftte.edge.runtime.LocalTrainer`), and the profiler-based measurement.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ftte.edge.memory import (
    MemoryEstimator,
    TrainingSetup,
    estimate_training_memory,
    measure_training_memory,
    relative_error,
)
from ftte.edge.models import build_model
from ftte.edge.plan import SubsetPlan, subset_vector
from ftte.edge.plan_search import cheapest_estimate, prefix_chunk_options, search_plan
from ftte.edge.runtime import LocalTrainer, TrainSettings
from ftte.edge.step import StepConfig, SubsetStep
from ftte.privacy.accountant import AccountantStore
from ftte.privacy.dpsgd import DPConfig

SHAPE = (1, 28, 28)
#: the plan ftte's search picks on the default MNIST task (GroupNorm 9 and both Linear layers)
DEFAULT_HEAD = ("9", "13", "15")


def _cnn28() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return build_model("cnn28")


def _step_update(model, plan, clipping: str, chunk: int | None, x, y, noise_seed: int = 7):
    work = copy.deepcopy(model)
    cfg = StepConfig(dp=True, optimizer="momentum", lr=0.5, noise_multiplier=1.0, max_grad_norm=0.1,
                     clipping=clipping, prefix_chunk=chunk)  # type: ignore[arg-type]
    step = SubsetStep(work, plan, cfg, expected_batch_size=len(y), generator=torch.Generator().manual_seed(noise_seed))
    losses = [step(x, y) for _ in range(2)]  # the second step also uses the momentum buffer
    before = dict(model.named_parameters())
    delta = torch.cat([(p - before[n]).detach().reshape(-1) for n, p in work.named_parameters() if n in plan.trainable])
    return delta, losses


@pytest.mark.parametrize("clipping", ["per_sample", "ghost"])
@pytest.mark.parametrize("layers", [DEFAULT_HEAD, ("8", "9", "13", "15")])
def test_chunked_prefix_gives_the_same_dp_step(clipping: str, layers: tuple[str, ...]) -> None:
    model = _cnn28()
    plan = SubsetPlan.from_layers(model, list(layers))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn((16,) + SHAPE, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    whole, loss_whole = _step_update(model, plan, clipping, None, x, y)
    assert float(whole.abs().max()) > 1e-3  # the step really moved the plan's parameters
    for chunk in (4, 3, 1):  # 3 does not divide the batch: the last chunk is short
        chunked, loss_chunked = _step_update(model, plan, clipping, chunk, x, y)
        assert loss_chunked == pytest.approx(loss_whole, rel=1e-5, abs=1e-6)
        assert torch.allclose(chunked, whole, atol=1e-5, rtol=1e-4), (chunk, float((chunked - whole).abs().max()))
    # and the comparison can fail: different noise gives a different update
    other, _ = _step_update(model, plan, clipping, 4, x, y, noise_seed=8)
    assert not torch.allclose(other, whole, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("clipping", ["per_sample", "ghost"])
def test_device_round_with_a_chunked_prefix_gives_the_same_update(clipping: str) -> None:
    """The device's real round (Poisson batches, accountant, DP noise) runs the chunk it is given."""
    model = _cnn28()
    plan = SubsetPlan.from_layers(model, list(DEFAULT_HEAD))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40,) + SHAPE).astype(np.float32)
    y = rng.integers(0, 10, size=40).astype(np.int64)
    weights = subset_vector(model, plan)
    deltas = {}
    for chunk in (None, 4):
        store = AccountantStore(":memory:")
        dp = DPConfig(noise_multiplier=1.0, max_grad_norm=0.5, accountant="rdp", epsilon_max=1e6)
        trainer = LocalTrainer(model, plan, dp, TrainSettings(3, 16, 0.5, clipping, prefix_chunk=chunk), store)
        assert trainer._trainer.prefix.chunk_size == chunk  # the device step runs the planned chunk
        deltas[chunk] = trainer.train(5, 0, weights, x, y, seed=11).delta
        trainer.close()
        store.close()
    assert np.abs(deltas[None]).max() > 1e-3
    np.testing.assert_allclose(deltas[4], deltas[None], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="prefix_chunk"):
        TrainSettings(1, 16, 0.5, clipping, prefix_chunk=0)


@pytest.mark.parametrize("clipping", ["per_sample", "ghost"])
def test_estimate_within_15_percent_of_measurement_for_chunked_plans(clipping: str) -> None:
    model = _cnn28()
    plans = [SubsetPlan.from_layers(model, list(DEFAULT_HEAD)), SubsetPlan.from_layers(model, ["15"])]
    for plan in plans:
        for chunk in (8, 4, 1):
            setup = TrainingSetup(16, SHAPE, dp=True, optimizer="sgd", clipping=clipping, prefix_chunk=chunk)
            measured = measure_training_memory(model, plan, setup)
            estimated = estimate_training_memory(model, plan, setup)
            assert measured.prefix_chunk == estimated.prefix_chunk == chunk
            err = relative_error(estimated.peak_bytes, measured.peak_bytes)
            assert abs(err) <= 0.15, (plan.trainable_layers, chunk, err)


def test_chunking_lowers_the_measured_peak_of_the_default_head() -> None:
    model = _cnn28()
    plan = SubsetPlan.from_layers(model, list(DEFAULT_HEAD))
    whole = measure_training_memory(model, plan, TrainingSetup(16, SHAPE, optimizer="sgd", clipping="ghost"))
    chunked = measure_training_memory(model, plan, TrainingSetup(16, SHAPE, optimizer="sgd", clipping="ghost",
                                                                 prefix_chunk=4))
    assert whole.peak_phase == "prefix"  # the whole-batch prefix sets the peak ...
    assert chunked.peak_phase != "prefix"  # ... and chunked it no longer does
    assert chunked.phase_peaks["prefix"] < 0.5 * whole.phase_peaks["prefix"]
    assert chunked.peak_bytes < 0.7 * whole.peak_bytes
    for phase in ("forward", "backward", "step"):  # the suffix's step is untouched
        assert chunked.phase_peaks[phase] == pytest.approx(whole.phase_peaks[phase], rel=0.01)


def test_chunk_options_halve_down_to_one() -> None:
    assert prefix_chunk_options(16) == (None, 8, 4, 2, 1)
    assert prefix_chunk_options(5) == (None, 3, 2, 1)
    assert prefix_chunk_options(1) == (None,)
    assert prefix_chunk_options(16, 4) == (4,)
    assert prefix_chunk_options(16, None) == (None,)
    with pytest.raises(ValueError):
        prefix_chunk_options(16, 0)


def test_search_takes_the_largest_chunk_with_the_lowest_estimated_peak() -> None:
    model = _cnn28()
    est = MemoryEstimator(model, SHAPE)
    head = SubsetPlan.from_layers(model, list(DEFAULT_HEAD))
    peaks = {c: est.estimate(head, 16, dp=True, optimizer="sgd", prefix_chunk=c, clipping="ghost").peak_bytes
             for c in prefix_chunk_options(16)}
    best = cheapest_estimate(est, head, 16, dp=True, optimizer="sgd", modes=("ghost",), prefix_chunk="auto")
    low = min(peaks.values())
    assert best.peak_bytes == low < peaks[None]
    assert best.prefix_chunk == max(c for c, p in peaks.items() if c is not None and p == low)
    # a full-model plan has no prefix: nothing to chunk, and the estimate says so
    full = cheapest_estimate(est, SubsetPlan.full(model), 16, dp=True, optimizer="sgd", modes=("ghost",),
                             prefix_chunk="auto")
    assert full.prefix_chunk is None
    # the search reports the chunk its estimate assumed; "auto" never costs more than the whole batch
    setup = TrainingSetup(16, SHAPE, dp=True, optimizer="sgd")
    auto = search_plan(model, 4 * 2**20, setup, clipping="auto", prefix_chunk="auto", verify=True)
    plain = search_plan(model, 4 * 2**20, setup, clipping="auto")
    assert auto.prefix_chunk == auto.estimate.prefix_chunk
    assert auto.measured is not None and auto.measured.prefix_chunk == auto.prefix_chunk
    assert auto.fits
    if auto.plan.plan_id == plain.plan.plan_id:
        assert auto.estimate.peak_bytes <= plain.estimate.peak_bytes
