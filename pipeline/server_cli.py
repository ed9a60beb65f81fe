"""``ftte server --config FILE.toml``: serve the coordinator over HTTPS until stopped.

Start-up reads the configuration, the allow-list and the state file, replays the journal
of in-flight cohorts, then listens. While it runs it prints one line per finished cohort on
stderr (version, test accuracy when ``[deploy] test_data`` is set, cohorts applied and
aborted, devices active); ``--quiet`` turns that off. ``SIGTERM``/``SIGINT`` stop it gracefully; ``SIGKILL``
loses nothing acknowledged (see :mod:`ftte.pipeline.journal`). ``--port-file`` receives the
bound port (useful with ``port = 0``). Imports of the web stack happen in :func:`run`, so
``ftte --help`` stays fast and works without the ``http`` extra.
"""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE.toml", help="deployment configuration")
    parser.add_argument("--port", type=int, default=None, help="override [http] port")
    parser.add_argument("--port-file", metavar="FILE", help="write the bound port to FILE once listening")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress line per finished cohort on stderr (errors are still printed)")


def run(args: argparse.Namespace) -> int:
    import os
    import signal
    import socket

    import numpy as np
    import torch
    import uvicorn
    from ftte.pipeline.config import ConfigError
    from ftte.pipeline.coordinator import Coordinator
    from ftte.pipeline.deploy_config import load_allow_list, load_server_config
    from ftte.pipeline.deploy_task import build_task
    from ftte.pipeline.http_server import Gate, build_app
    from ftte.pipeline.journal import Database
    from ftte.protocol.features import standardise

    from ftte.http_auth import member_id

    torch.set_num_threads(1)
    try:
        settings = load_server_config(args.config)
        allow = load_allow_list(settings.path(settings.deploy.allow_list))
        task = build_task(settings)
    except (ConfigError, ValueError) as exc:
        print(f"ftte server: {exc}", file=sys.stderr)
        print("ftte server: `ftte deploy init DIR --devices N` writes a documented server.toml that runs as it is",
              file=sys.stderr)
        return 2
    http = settings.http
    db = Database(settings.path(settings.deploy.state), settings.path(settings.deploy.ledger_key),
                  settings.deploy.synchronous, keep_versions=settings.deploy.versions_kept)
    db.open()
    identities = {member_id(k): k for k in allow}
    coordinator = Coordinator(task, db, identities)
    try:
        coordinator.check_sessions()
    except ValueError as exc:
        print(f"ftte server: {exc}", file=sys.stderr)
        db.close()
        return 2
    if settings.deploy.test_data:
        with np.load(settings.path(settings.deploy.test_data)) as data:
            # the test data is raw like the devices' records: standardise it as the task says
            coordinator.load_test_data(standardise(data["x"], task.feature_mean, task.feature_std), data["y"])
    gate = Gate(http, allow)
    app, _ = build_app(coordinator, gate, http, progress=None if args.quiet else sys.stderr)

    port = http.port if args.port is None else args.port
    sock = socket.socket(socket.AF_INET6 if ":" in http.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((http.host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    bound = sock.getsockname()[1]
    kwargs = {}
    if not http.plaintext:
        kwargs = {"ssl_certfile": str(settings.path(http.tls_cert)), "ssl_keyfile": str(settings.path(http.tls_key))}
    config = uvicorn.Config(app, log_level=args.log_level, lifespan="on", access_log=False,
                            timeout_keep_alive=max(30, int(http.poll_wait_s) + 10), backlog=1024,
                            timeout_graceful_shutdown=5, **kwargs)
    server = uvicorn.Server(config)
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(str(bound))
        os.replace(tmp, args.port_file)
    scheme = "http" if http.plaintext else "https"
    print(f"ftte server: plan {task.plan.plan_id}, {len(allow)} devices allowed, listening on "
          f"{scheme}://{http.host}:{bound}", file=sys.stderr, flush=True)
    # uvicorn handles SIGTERM/SIGINT itself (graceful shutdown), then re-raises the signal
    # under the previous handler: make that one an ordinary exit, so the database closes.
    def _exit(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _exit)
    try:
        server.run(sockets=[sock])
    except SystemExit:
        pass
    finally:
        db.close()
    return 0
