"""`ftte bench ray`'s flags reach the configuration it measures (no Ray needed)."""

from __future__ import annotations

import argparse

from ftte.bench.ray_scaling import _config, configure


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure(parser)
    return parser.parse_args(list(argv))


def test_flags_reach_the_measured_config():
    default = _config(_args())
    assert default.secagg.enabled and default.fleet.devices == 100 and default.model.name == "cnn8"
    cfg = _config(_args("--secagg", "off", "--local-steps", "20", "--buffer", "5", "--versions", "7"))
    assert not cfg.secagg.enabled
    assert (cfg.train.local_steps, cfg.server.buffer_size, cfg.run.max_versions) == (20, 5, 7)
    assert cfg.privacy.enabled == default.privacy.enabled  # only the named setting changes
