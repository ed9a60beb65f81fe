"""How much of the clip a cohort's mean update keeps on the default task (issue 13).

The user-level plan rule (``[privacy] user_noise_ratio``) predicts noise against ``C / sqrt(d)``
per coordinate, the signal of one update of norm ``C``. The mean of a cohort's clipped updates
is shorter when devices disagree (non-IID data: about 3.75 records of one to three classes per
device on the default task), and its norm over ``C`` is the factor by which the real signal falls
short of the prediction. This measures it for the last-Linear plan of the default model at the
initial weights: ``--members`` random devices each take the run's local SGD steps (plain SGD on
all their records, as under user-level DP), clip to ``C`` and average.

    .venv/bin/python -m ftte.bench.user_dp_agreement [--seed 1] [--members 100] [--lr 1 3 10] [--clip 10 3 1]
"""

from __future__ import annotations

import argparse

import numpy as np


def clipped_mean_fraction(updates: np.ndarray, clip: float) -> float:
    """``||mean_i clip(u_i, C)|| / C`` for the rows ``u_i`` of ``updates``."""
    norms = np.linalg.norm(updates, axis=1)
    clipped = updates * np.minimum(1.0, clip / np.maximum(norms, 1e-300))[:, None]
    return float(np.linalg.norm(clipped.mean(axis=0)) / clip)


def head_updates(seed: int, members: int, lr: float, steps: int) -> np.ndarray:
    """One update of the model's last layer per sampled device (rows), from the initial weights."""
    import torch
    from torch import nn

    from ftte.pipeline.config import load_config
    from ftte.pipeline.datasets import load_dataset
    from ftte.pipeline.model_builder import build_global_model

    torch.set_num_threads(1)
    cfg = load_config(None)
    data = load_dataset(cfg.data, seed, cfg.fleet.devices)
    model = build_global_model(cfg.model.name, seed, data.input_shape, data.n_classes).eval()
    prefix, head = model[:-1], model[-1]
    rng = np.random.default_rng(seed)
    rows = []
    for dev in rng.choice(data.n_devices, members, replace=False):
        x, y = data.device_arrays(int(dev))
        if len(y) == 0:
            continue
        with torch.no_grad():
            h = prefix(torch.as_tensor(x, dtype=torch.float32).reshape(-1, *data.input_shape))
        w = head.weight.detach().clone().requires_grad_()
        b = head.bias.detach().clone().requires_grad_()
        w0, b0 = w.detach().clone(), b.detach().clone()
        for _ in range(steps):
            loss = nn.functional.cross_entropy(h @ w.T + b, torch.as_tensor(y).long())
            gw, gb = torch.autograd.grad(loss, [w, b])
            with torch.no_grad():
                w -= lr * gw
                b -= lr * gb
        rows.append(torch.cat([(w - w0).flatten(), b - b0]).detach().numpy())
    return np.array(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--members", type=int, default=100)
    ap.add_argument("--steps", type=int, default=2, help="local steps ([train] local_steps)")
    ap.add_argument("--lr", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    ap.add_argument("--clip", type=float, nargs="+", default=[10.0, 3.0, 1.0])
    args = ap.parse_args(argv)
    for lr in args.lr:
        u = head_updates(args.seed, args.members, lr, args.steps)
        for c in args.clip:
            print(f"lr {lr:g} clip {c:g}: {len(u)} devices, median update norm {np.median(np.linalg.norm(u, axis=1)):.3f}, "
                  f"|mean of clipped| / clip {clipped_mean_fraction(u, c):.3f}")


if __name__ == "__main__":
    main()
