"""A fork server for edge devices: import torch and ftte once, then fork one process per device.

On two busy cores, eight processes each importing torch and Opacus spend tens of seconds
before their first request. Forking from one process that already imported them gives
the same thing the tests need (separate processes, separate sockets and state, each
killable with SIGKILL) for one import. Every child runs exactly the ``ftte edge``
command-line path (:func:`ftte.edge.edge_cli.run`).

Protocol on stdin/stdout, one JSON object per line:
``{"id": ..., "argv": [...], "stdout": path, "stderr": path}`` forks a device and answers
``{"spawned": id, "pid": pid}``; a child's end is reported as ``{"exit": id, "code": c}``
(negative: killed by that signal).
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys

import torch

torch.set_num_threads(1)

import ftte.edge.http_client  # noqa: F401
from ftte.edge import edge_cli

from ftte.cli import build_parser


def _warm_up() -> None:
    """Run one tiny DP round so every lazy import (Opacus, accountants, optimizers) happens here, once."""
    import numpy as np
    from ftte.edge.models import build_model, make_dp_compatible
    from ftte.edge.plan import SubsetPlan
    from ftte.edge.runtime import LocalTrainer, TrainSettings
    from ftte.privacy.accountant import AccountantStore
    from ftte.privacy.dpsgd import DPConfig

    model = make_dp_compatible(build_model("logistic", in_features=4, num_classes=2))
    store = AccountantStore(":memory:")
    trainer = LocalTrainer(model, SubsetPlan.full(model), DPConfig(accountant="rdp", epsilon_max=1e6),
                           TrainSettings(1, 4, 0.1), store)
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    trainer.train(0, 0, np.zeros(10, dtype=np.float32), x, (x[:, 0] > 0).astype(np.int64), 0)
    trainer.close()
    store.close()


_warm_up()


def _child(cmd: dict) -> None:
    out = os.open(cmd["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    err = os.open(cmd["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    code = 1
    try:
        args = build_parser().parse_args(cmd["argv"])
        code = int(edge_cli.run(args) or 0)
    except BaseException as exc:  # report, never return into the server loop
        print(f"edge child failed: {exc!r}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    children: dict[int, str] = {}
    print(json.dumps({"ready": os.getpid()}), flush=True)
    stdin_open = True
    while stdin_open or children:
        ready = select.select([sys.stdin], [], [], 0.05)[0] if stdin_open else []
        if ready:
            line = sys.stdin.readline()
            if not line:
                stdin_open = False
            elif line.strip():
                cmd = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(cmd)
                children[pid] = cmd["id"]
                print(json.dumps({"spawned": cmd["id"], "pid": pid}), flush=True)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            code = os.waitstatus_to_exitcode(status)
            print(json.dumps({"exit": children.pop(pid, "?"), "code": code}), flush=True)
        if not stdin_open and not children:
            break
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    main()
