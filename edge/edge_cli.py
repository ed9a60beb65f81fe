"""``ftte edge --server URL --key FILE --data FILE.csv --target COLUMN``: run one device as a process.

The CSV has a header row; ``--target`` names the label column (integer class indices),
every other column is a numeric feature, in the column order the model expects. Give raw
values: when the server's task carries feature statistics (``[deploy] standardize``), the
device standardises its records with them itself; when it does not, records are used as
given and preprocessing is the app's business. The device keeps its accountant state in
``--state`` (default: next to the key) and runs until ``--rounds`` rounds are done or its
budget is spent.

It prints one line per stage on stderr (``--quiet`` turns that off) and a JSON summary on
stdout at the end; ``--events`` adds one JSON line per protocol event on stdout.
``--patience`` bounds every request's retries, the first contact and the pull included
(inside a cohort's stages a request retries for at least twice the server's stage timeout,
so a short outage does not drop the device from a cohort it is already in).

Exit status:

- 0: the rounds asked for are done;
- 1: any other failure (a malformed reply, a task or model this device refuses);
- 2: bad arguments, key or data file;
- 3: the privacy budget is spent (nothing more can be trained; the summary says how much);
- 4: the server refused this device (a 4xx such as an unknown key or a privacy-policy refusal);
- 5: the server was unreachable, or kept failing, for longer than ``--patience``;
- 6: the server's TLS certificate failed verification (wrong ``--ca`` or host name); never retried;
- 130: interrupted.

The server must be ``https://`` (certificate checked against ``--ca`` or the system CAs);
``http://`` is accepted only with ``--insecure-plaintext``, which is for local tests and is
refused together with an ``https://`` URL, so it can never switch certificate checks off.
The server decides *which bundled model* is trained, never which code runs: a custom
architecture comes only from this device's ``--model-factory``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_BUDGET, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_CERTIFICATE = 0, 1, 2, 3, 4, 5, 6
EXIT_INTERRUPTED = 130

STAGE_EVENTS = ("joined", "started", "advertised", "shared", "uploaded", "signed", "unmasked", "trained", "pulled")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", required=True, metavar="URL", help="https://host:port of `ftte server`")
    parser.add_argument("--key", required=True, metavar="FILE", help="this device's Ed25519 key (see `ftte keygen`)")
    parser.add_argument("--data", required=True, metavar="FILE.csv", help="local records, with a header row")
    parser.add_argument("--target", required=True, metavar="COLUMN", help="label column of the CSV")
    parser.add_argument("--ca", metavar="FILE", help="CA bundle that signed the server certificate (default: system CAs)")
    parser.add_argument("--insecure-plaintext", action="store_true",
                        help="allow an http:// server (local tests only); never affects https:// certificate checks")
    parser.add_argument("--state", metavar="DIR", help="accountant state directory (default: KEY.state)")
    parser.add_argument("--epsilon", type=float, default=10.0, help="this device's lifetime privacy budget")
    parser.add_argument("--peers", metavar="FILE",
                        help="pinned peer identity keys, one hex Ed25519 public key per line; cohorts with any other "
                             "member are refused (default: trust the server's member list)")
    parser.add_argument("--min-cohort", type=int, default=None,
                        help="refuse cohorts with fewer members than this (default: the device policy's, 3)")
    parser.add_argument("--max-corrupt", type=int, default=None,
                        help="members this device assumes may collude with the server; a cohort whose threshold "
                             "does not tolerate them is refused (default: the device policy's, 1)")
    parser.add_argument("--max-user-noise-ratio", type=float, default=None, metavar="R",
                        help="user-level tasks: refuse a plan whose predicted noise/signal on a cohort's mean is "
                             "above R (the participation would spend budget on noise; default: no ceiling)")
    parser.add_argument("--rounds", type=int, default=None, help="stop after this many rounds (default: until the budget is spent)")
    parser.add_argument("--model-factory", metavar="PKG.MOD:FN",
                        help="this device's own callable(TaskInfo) -> nn.Sequential (default: the bundled model the "
                             "task names; a server can never name code to run)")
    parser.add_argument("--seed", type=int, default=None, help="seed for training and rounding (default: fresh entropy)")
    parser.add_argument("--patience", type=float, default=60.0,
                        help="seconds one request keeps retrying before the device gives up (first contact "
                             "included); exit status 5 when the server stays unreachable that long")
    parser.add_argument("--join-patience", type=float, default=600.0,
                        help="seconds to wait for a cohort to fill before leaving it (default: 600)")
    parser.add_argument("--events", action="store_true", help="print one JSON line per protocol event on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.epilog = ("exit status: 0 done, 1 other failure, 2 bad arguments or files, 3 privacy budget spent, "
                     "4 refused by the server, 5 server unreachable within --patience, 6 TLS certificate "
                     "verification failed, 130 interrupted")
    # Test hook: SIGKILL this process right after the named event (a device dying mid-protocol).
    parser.add_argument("--exit-at", choices=STAGE_EVENTS, help=argparse.SUPPRESS)
    parser.add_argument("--exit-round", type=int, default=1, help=argparse.SUPPRESS)


# DevicePolicy field -> the argparse dest of the flag that sets it
POLICY_FLAGS = {"min_members": "min_cohort", "max_corrupt": "max_corrupt", "max_user_noise_ratio": "max_user_noise_ratio"}


def policy_floors(args: argparse.Namespace) -> dict[str, Any]:
    """The device-policy fields the flags set (unset flags keep the policy's defaults)."""
    return {field: getattr(args, dest) for field, dest in POLICY_FLAGS.items() if getattr(args, dest) is not None}


def check_policy_flags(args: argparse.Namespace) -> str | None:
    """The device policy's own checks (:class:`~ftte.protocol.cohort.DevicePolicy`) on the flags
    given, before anything starts; the message names the flag instead of the field."""
    from ftte.protocol.cohort import DevicePolicy

    try:
        DevicePolicy(**policy_floors(args))
    except ValueError as exc:
        field, _, rest = str(exc).partition(" ")
        return f"--{POLICY_FLAGS.get(field, field).replace('_', '-')} {rest}"
    return None


def load_csv(path: str, target: str):
    import csv

    import numpy as np

    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or target not in header:
            raise ValueError(f"{path}: no column {target!r} in the header")
        t = header.index(target)
        xs, ys = [], []
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{lineno}: expected {len(header)} fields, got {len(row)}")
            try:
                label = float(row[t])
                values = [float(v) for i, v in enumerate(row) if i != t]
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None
            if label != int(label):
                raise ValueError(f"{path}:{lineno}: label {row[t]!r} is not a class index")
            xs.append(values)
            ys.append(int(label))
    if not xs:
        raise ValueError(f"{path}: no records")
    return np.asarray(xs, dtype=np.float32), np.asarray(ys, dtype=np.int64)


def check_server(url: str, insecure_plaintext: bool) -> str | None:
    """Why ``url`` may not be used with these flags, or None.

    ``https://`` always verifies the certificate (``--ca`` or the system CAs);
    ``http://`` needs ``--insecure-plaintext``; and that flag is refused with an
    ``https://`` URL rather than quietly turning certificate checks off.
    """
    from urllib.parse import urlsplit

    scheme = urlsplit(url).scheme.lower()
    if scheme == "https":
        if insecure_plaintext:
            return "--insecure-plaintext applies only to http:// servers; https:// is always verified"
        return None
    if scheme == "http":
        if not insecure_plaintext:
            return (f"refusing plain HTTP server {url}: use https:// (add --insecure-plaintext only for a "
                    "local test server)")
        return None
    return f"the server URL must start with https://, got {url!r}"


def run(args: argparse.Namespace) -> int:
    import os
    import signal
    import time

    problem = check_server(args.server, args.insecure_plaintext) or check_policy_flags(args)
    if problem is not None:
        print(f"ftte edge: {problem}", file=sys.stderr)
        return 2

    import torch

    # Two busy cores: intra-op threads only oversubscribe them (~100x slower steps here).
    torch.set_num_threads(1)

    from ftte.edge.http_client import (
        CertificateError,
        EdgeClient,
        EdgeError,
        RetryPolicy,
        ServerRefused,
        ServerUnavailable,
    )
    from ftte.edge.identity import load_identity
    from ftte.edge.models import load_factory

    try:
        identity = load_identity(args.key)
        x, y = load_csv(args.data, args.target)
    except (OSError, ValueError) as exc:
        print(f"ftte edge: {exc}", file=sys.stderr)
        return 2
    try:  # the device's own configuration: the only place a custom model (code) can come from
        factory = load_factory(args.model_factory) if args.model_factory else None
    except ValueError as exc:
        print(f"ftte edge: --model-factory: {exc}", file=sys.stderr)
        return 2
    rounds_seen = {"n": 0}

    def on_event(name: str, info: dict) -> None:
        if name == "pulled":
            rounds_seen["pulling"] = rounds_seen["n"] + 1
        if name == "trained":
            rounds_seen["n"] += 1
        if not args.quiet:
            line = describe_event(name, info, rounds_seen.get("pulling", rounds_seen["n"]), args.join_patience)
            if line:
                print(f"ftte edge: {line}", file=sys.stderr, flush=True)
        if args.events:
            print(json.dumps({"event": name, "time": round(time.time(), 3), **info}), flush=True)
        if args.exit_at == name and rounds_seen["n"] >= args.exit_round:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    trusted = None
    if args.peers:
        try:
            lines = [ln.strip() for ln in Path(args.peers).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
            trusted = [bytes.fromhex(ln) for ln in lines]
        except (OSError, ValueError) as exc:
            print(f"ftte edge: cannot read --peers {args.peers}: {exc}", file=sys.stderr)
            return 2
        if any(len(k) != 32 for k in trusted):
            print(f"ftte edge: --peers {args.peers}: every line must be a 64-hex-digit Ed25519 public key", file=sys.stderr)
            return 2
    # verify=False is the plaintext opt-in for an http:// URL only (checked above and by Transport)
    verify = False if args.insecure_plaintext else (args.ca or True)
    client = EdgeClient(args.server, identity, x, y, state_dir=args.state or (args.key + ".state"),
                        epsilon_max=args.epsilon, model_factory=factory, verify=verify,
                        retry=RetryPolicy(patience_s=args.patience), on_event=on_event, seed=args.seed,
                        join_patience_s=args.join_patience, trusted_keys=trusted, **policy_floors(args))
    try:
        results = client.run(rounds=args.rounds)
    except CertificateError as exc:
        print(f"ftte edge: {exc} (check --ca and the host name in --server)", file=sys.stderr)
        return EXIT_CERTIFICATE
    except ServerRefused as exc:
        print(f"ftte edge: the server refused this device: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except ServerUnavailable as exc:
        print(f"ftte edge: server unreachable within --patience {args.patience:g} s: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except EdgeError as exc:
        print(f"ftte edge: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as exc:  # the records do not fit the task (labels outside its classes, say)
        print(f"ftte edge: {args.data}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        client.close()
    spent = results and results[-1].status == "budget_exhausted"
    summary = {
        "event": "summary",
        "member": client.member,
        "rounds": len(results),
        "statuses": [r.status for r in results],
        "applied_versions": [r.applied_version for r in results if r.status == "applied"],
        "epsilon": max((r.epsilon for r in results), default=0.0),
        "bytes_up": client.transport.bytes_up,
        "bytes_down": client.transport.bytes_down,
    }
    print(json.dumps(summary), flush=True)
    if spent:
        print(f"ftte edge: privacy budget spent (epsilon {summary['epsilon']:.3f} of {args.epsilon:g}); "
              "nothing more can be trained", file=sys.stderr, flush=True)
        return EXIT_BUDGET
    return EXIT_OK


def describe_event(name: str, info: dict, round_no: int, join_patience: float) -> str:
    """One human line per stage of a round (empty for events not worth a line)."""
    r = f"round {round_no}: "
    cohort = info.get("cohort", "")
    if name == "task":
        scaled = "standardised with the task's statistics" if info.get("standardised") else "used as given"
        return (f"task received: model {info.get('model')}, plan {info.get('plan_id')} "
                f"({info.get('coordinates')} trainable values); {info.get('records')} records, {scaled}")
    if name == "pulled":
        return r + f"pulled model version {info.get('version')}"
    if name == "trained":
        return r + f"trained locally (epsilon spent so far {info.get('epsilon', 0.0):.3f})"
    if name == "joined":
        return r + f"joined cohort {cohort}; waiting up to {join_patience:g} s for it to fill"
    if name == "started":
        return r + f"cohort {cohort} started with {info.get('members')} members"
    if name in ("advertised", "shared", "uploaded", "signed", "unmasked"):
        what = {"advertised": "sent keys", "shared": "sent key shares", "uploaded": "uploaded masked update",
                "signed": "signed the survivor list", "unmasked": "sent unmasking shares"}[name]
        return r + f"{what} ({cohort})"
    if name == "ended":
        status = info.get("status")
        if status == "applied":
            return r + f"cohort {cohort} applied: model version {info.get('applied_version')}"
        reason = str(info.get("reason") or "")[:200]
        return r + f"cohort {cohort or '-'} {status}" + (f": {reason}" if reason else "")
    if name == "budget_exhausted":
        return (r + f"privacy budget spent (epsilon {info.get('epsilon', 0.0):.3f} of "
                f"{info.get('epsilon_max', 0.0):g}); not training")
    return ""
