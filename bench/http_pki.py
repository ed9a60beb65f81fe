"""A throwaway certificate authority and a server certificate for loopback HTTPS.

Used by the HTTP load benchmark, the device benchmark and the deployment tests, so that they
exercise real TLS (certificate verification included) without anything installed system-wide.
The certificates are made by the deployment's own :func:`~ftte.pipeline.deploy_pki.make_deployment_pki`,
valid for a day; a directory reused by a benchmark run gets fresh ones.
"""

from __future__ import annotations

from pathlib import Path

from ftte.pipeline.deploy_pki import DeploymentPki as Pki
from ftte.pipeline.deploy_pki import make_deployment_pki

__all__ = ["Pki", "make_pki"]

_FILES = ("ca.pem", "ca-key.pem", "server.pem", "server-key.pem")


def make_pki(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 1) -> Pki:
    """A fresh CA and a server certificate for ``hosts`` signed by it (PEM files in ``directory``)."""
    directory = Path(directory)
    for name in _FILES:  # throwaway: an earlier run's files in a kept directory are replaced
        (directory / name).unlink(missing_ok=True)
    return make_deployment_pki(directory, hosts, days)
