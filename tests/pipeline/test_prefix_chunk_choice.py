"""The simulated device trains, and the run's memory figure measures, the prefix chunk ftte's search chose.

On the default MNIST task ftte's plan is a small head behind a frozen convolutional
prefix; the whole-batch prefix set its peak. The strategy now picks the prefix's
micro-batch size with the plan, and the simulation hands it to the device's trainer and
to ``peak_client_memory`` (the figure ``ftte compare`` reports), so the figure is the
step the device runs. The full-model baselines have no prefix and stay unchunked.
"""

from __future__ import annotations

from ftte.edge.memory import TrainingSetup, measure_training_memory
from ftte.pipeline.config import load_config
from ftte.pipeline.simulator import Simulation


def test_default_task_runs_and_measures_the_chosen_prefix_chunk():
    sim = Simulation(load_config(None))
    chunk = sim.settings.prefix_chunk
    assert chunk is not None and 1 <= chunk < sim.settings.batch_size
    assert sim.trainer._trainer.prefix.chunk_size == chunk  # the device's real step
    peak = sim.peak_client_memory()
    setup = TrainingSetup(sim.settings.batch_size, sim.data.input_shape, dp=True, optimizer="sgd",
                          num_classes=sim.data.n_classes, clipping=sim.settings.clipping)
    unchunked = measure_training_memory(sim.model, sim.plan, setup)
    assert peak < unchunked.peak_bytes


def test_full_model_baseline_has_no_prefix_to_chunk():
    sim = Simulation(load_config(None).with_overrides(**{"run.strategy": "fedavg"}))
    assert sim.settings.prefix_chunk is None
    assert len(sim.trainer._trainer.prefix) == 0


def test_a_deployed_device_works_out_the_same_chunk_the_plan_was_costed_with():
    """A device is not told its chunk (it changes the device's memory, not its update): it
    applies the search's own rule to the plan the task names, and must land on the chunk
    the server's search costed the plan with."""
    import torch

    from ftte.edge.plan_search import device_prefix_chunk

    sim = Simulation(load_config(None))
    got = device_prefix_chunk(sim.model, sim.plan, sim.data.input_shape, sim.settings.batch_size, dp=True,
                              clipping=sim.settings.clipping)
    assert got == sim.settings.prefix_chunk
    not_sequential = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2)})
    assert device_prefix_chunk(not_sequential, sim.plan, (2,), 16, dp=True, clipping="ghost") is None
