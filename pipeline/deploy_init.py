"""``ftte deploy init DIR --devices N``: everything a first deployment needs, in one folder.

It writes a documented ``server.toml`` whose defaults run as they are, a private CA and a
server certificate (:mod:`ftte.pipeline.deploy_pki`), one identity key per device (the
``ftte keygen`` format) and the allow-list naming them, and, unless ``--no-data``, a
sample of scikit-learn's bundled digits split over the devices (raw pixel values, as an
app would hold them; the task carries the statistics that standardise them). It then
prints the exact commands that start the server and each device and audit the ledger.

Layout of ``DIR``::

    server.toml            the configuration (every key commented)
    pki/ca.pem             what devices verify the server against (--ca)
    pki/ca-key.pem         the CA's key, 0600: signs later server certificates; keep it offline
    pki/server.pem, pki/server-key.pem
    devices.txt            the allow-list: one public key and label per device
    devices/deviceI.key    device I's Ed25519 identity (0600); copy it to that device only
    data/deviceI.csv       device I's sample records (header row, column "label")
    data/test.npz          held-out records the server evaluates every version on
    data/stats.npz         per-feature mean and std the model expects ([deploy] feature_stats)
    keys/                  the ledger key is created here at the first start (0700 directory),
                           outside state/: whoever holds both could re-sign a rewritten ledger
    state/                 the server's SQLite state file and privacy ledger (server.db)

Nothing is overwritten: a ``DIR`` that exists and is not empty is refused.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

DEFAULT_PORT = 8443
MAX_BUFFER = 10


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="folder to create (must not exist or be empty)")
    parser.add_argument("--devices", type=int, required=True, metavar="N", help="number of device identities (>= 2)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the server listens on and devices connect to; also the certificate's name")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"listening port (default: {DEFAULT_PORT})")
    parser.add_argument("--rounds", type=int, default=3, help="rounds each printed device command runs (default: 3)")
    parser.add_argument("--no-data", action="store_true",
                        help="write no sample data: bring your own CSVs (64 features, 10 classes unless you edit "
                             "[deploy]) and set [deploy] standardize yourself")
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates in days (default: 365)")


def server_toml(*, host: str, port: int, buffer_size: int, sample_data: bool) -> str:
    """The documented configuration ``deploy init`` writes (paths relative to the file)."""
    data_keys = ('test_data = "data/test.npz"\n'
                 '# The task carries these statistics and every device standardises its raw records with\n'
                 '# them: "none" (records used as given), "file" (feature_stats: .npz with mean and std)\n'
                 '# or "test_data" (computed from test_data\'s x).\n'
                 'standardize = "file"\n'
                 'feature_stats = "data/stats.npz"\n') if sample_data else (
                 '# Optional: .npz with x (raw records) and y the server evaluates every version on.\n'
                 'test_data = ""\n'
                 '# Who standardises features: "none" (devices use records as given: the app must\n'
                 '# preprocess exactly as the model expects), "file" (feature_stats = .npz with mean\n'
                 '# and std) or "test_data" (statistics of test_data\'s x). The task carries them.\n'
                 'standardize = "none"\n'
                 'feature_stats = ""\n')
    return f"""\
# ftte deployment, written by `ftte deploy init`. Every key is documented in
# pipeline/deploy_config.py ([http], [deploy]) and pipeline/default.toml (the other sections).
# Relative paths are resolved against this file's folder.

[run]
# "ftte" (staleness- and variance-weighted buffers) or "fedbuff"; deployments are buffered.
strategy = "ftte"
# Seeds the initial model: a restarted server must rebuild the same one.
seed = 0

[model]
# A bundled architecture: "logistic" or "mlp" take flat records (input_shape = [features]),
# "cnn8" takes [channels, 8, 8]. Devices build it from the bundled registry only.
name = "logistic"

[train]
# Each device's round: local DP-SGD steps, batch size and learning rate.
local_steps = 5
batch_size = 32
lr = 0.5

[privacy]
enabled = true
# Each device derives its noise multiplier so that planned_rounds rounds spend at most
# target_epsilon, never below min_noise_multiplier; epsilon_max is the server's cap per device.
target_epsilon = 8.0
planned_rounds = 10
min_noise_multiplier = 0.5
max_grad_norm = 1.0
epsilon_max = 10.0
# 0 = each device uses min(1e-5, 1/(10 n)) for its n records.
delta = 0.0
accountant = "rdp"

[secagg]
# Every update is masked; the server only sees a cohort's sum.
enabled = true
# Members assumed to collude with the server; devices refuse cohorts that do not tolerate it.
max_corrupt = 1
clip = 2.0
value_bits = 12

[server]
# A cohort closes at buffer_size members, or after deadline_s with at least the threshold.
buffer_size = {buffer_size}
deadline_s = 60.0
lr = 1.0

[http]
host = "{host}"
port = {port}
tls_cert = "pki/server.pem"
tls_key = "pki/server-key.pem"
# GET /v1/metrics in the Prometheus text format; it reveals load and timing, so expose the
# port only where scrapers (not the public) can reach it, or set false.
metrics = true

[deploy]
state = "state/server.db"
# Created at the first start; keep it away from state/ (see README, "Where the ledger key lives").
ledger_key = "keys/ledger.key"
allow_list = "devices.txt"
# One record (without the batch dimension) and the number of classes.
input_shape = [64]
num_classes = 10
{data_keys}# Model versions kept in the state file (0 = all); never fewer than max_staleness + 1.
keep_versions = 100
max_staleness = 50
stage_timeout_s = 30.0
"""


def device_commands(directory: str, *, host: str, port: int, devices: int, rounds: int, min_cohort: int,
                    sample_data: bool) -> list[str]:
    """The commands ``deploy init`` prints, in the order to run them (the README quotes them)."""
    d = directory.rstrip("/") or "."
    url_host = f"[{host}]" if ":" in host else host
    q = shlex.quote
    cmds = [f"ftte server --config {q(d + '/server.toml')}"]
    for i in range(devices):
        data = q(f"{d}/data/device{i}.csv") if sample_data else "YOUR_RECORDS.csv"
        extra = f" --min-cohort {min_cohort}" if min_cohort < 3 else ""
        cmds.append(f"ftte edge --server https://{url_host}:{port} --ca {q(d + '/pki/ca.pem')} "
                    f"--key {q(f'{d}/devices/device{i}.key')} --data {data} --target label --rounds {rounds}{extra}")
    cmds.append(f"ftte audit {q(d + '/state/server.db')}")
    return cmds


def write_sample_data(data_dir: Path, devices: int, seed: int = 0) -> None:
    """Digits (1,797 8x8 images, bundled with scikit-learn: nothing is downloaded), raw values
    0..16, shuffled and split evenly; 20% held out for the server's evaluation."""
    import numpy as np
    from sklearn.datasets import load_digits

    from ftte.pipeline.feature_stats import compute_stats

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = len(y) // 5
    test, train = order[:n_test], order[n_test:]
    data_dir.mkdir(parents=True)
    np.savez(data_dir / "test.npz", x=x[test].astype(np.float32), y=y[test].astype(np.int64))
    mean, std = compute_stats(x[train])
    np.savez(data_dir / "stats.npz", mean=mean, std=std)
    header = ",".join([f"pixel{j}" for j in range(x.shape[1])] + ["label"]) + "\n"
    for i, part in enumerate(np.array_split(train, devices)):
        with open(data_dir / f"device{i}.csv", "w", encoding="utf-8") as fh:
            fh.write(header)
            fh.writelines(",".join(str(int(v)) for v in x[r]) + f",{int(y[r])}\n" for r in part)


def init_deployment(directory: Path, *, devices: int, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                    sample_data: bool = True, days: int = 365) -> None:
    """Write the folder described in the module docstring."""
    from ftte.edge.identity import create_identity
    from ftte.pipeline.deploy_pki import make_deployment_pki

    from ftte.http_auth import member_id

    if devices < 2:
        raise ValueError("--devices must be >= 2 (a secure-aggregation cohort needs two members)")
    if not 0 < port < 65536:
        raise ValueError("--port must be in [1, 65535]")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ValueError(f"{directory} exists and is not an empty folder; choose a new one")
    directory.mkdir(parents=True, exist_ok=True)
    hosts = tuple(dict.fromkeys([host, "localhost"] if host in ("127.0.0.1", "::1") else [host]))
    make_deployment_pki(directory / "pki", hosts, days=days)
    (directory / "devices").mkdir()
    lines = ["# allow-list: one hex Ed25519 public key and a label per line (ftte keygen prints them)"]
    for i in range(devices):
        signer = create_identity(directory / "devices" / f"device{i}.key")
        lines.append(f"{signer.public_key.hex()} device{i}  # member {member_id(signer.public_key)}")
    (directory / "devices.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.makedirs(directory / "keys", mode=0o700)
    (directory / "state").mkdir()
    if sample_data:
        write_sample_data(directory / "data", devices)
    (directory / "server.toml").write_text(
        server_toml(host=host, port=port, buffer_size=min(devices, MAX_BUFFER), sample_data=sample_data),
        encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    from ftte.pipeline.config import ConfigError
    from ftte.pipeline.deploy_config import load_server_config

    directory = Path(args.dir)
    try:
        init_deployment(directory, devices=args.devices, host=args.host, port=args.port,
                        sample_data=not args.no_data, days=args.days)
        load_server_config(directory / "server.toml")  # what was written must load
    except (OSError, ValueError, ConfigError) as exc:
        print(f"ftte deploy init: {exc}", file=sys.stderr)
        return 2
    buffer_size = min(args.devices, MAX_BUFFER)
    cmds = device_commands(args.dir, host=args.host, port=args.port, devices=args.devices, rounds=args.rounds,
                           min_cohort=min(3, buffer_size), sample_data=not args.no_data)
    print(f"# wrote {args.dir}: server.toml, pki/, devices.txt and {args.devices} device keys"
          + ("" if args.no_data else ", data/"), file=sys.stderr)
    print("# 1. start the server (it prints one line per finished cohort):")
    print(cmds[0])
    print(f"# 2. start each device, each in its own terminal (or end the line with &); a cohort needs "
          f"{buffer_size} of them:")
    for c in cmds[1:-1]:
        print(c)
    print("# 3. when the devices are done, verify the privacy ledger:")
    print(cmds[-1])
    return 0
