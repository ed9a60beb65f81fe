"""ftte: privacy-hardened federated learning for small, uneven edge devices.

The top-level package stays light (numpy and msgpack only) so that ``import ftte`` on a
device never drags in the server's stack; heavier parts live in ``ftte.crypto``,
``ftte.privacy``, ``ftte.edge``, ``ftte.pipeline`` and ``ftte.bench`` and are imported
only when one of the functions below (or ``ftte.EdgeClient``) is first used.

Python API (the same work as the ``ftte`` commands, returning results instead of printing):

* :func:`load_config` - the configuration in force, from defaults, a file, a mapping, plus overrides
* :func:`simulate` - one strategy over a simulated fleet; returns its summary dict
* :func:`compare` - ftte, fedbuff and fedavg on the same fleet; returns the comparison dict
* :func:`audit` - verify a privacy ledger; returns an ``AuditResult``
* ``EdgeClient`` - the HTTP client of an edge device (``ftte.edge.http_client.EdgeClient``)
* ``ConfigError``, ``RunFolderMismatch`` (a ``ConfigError``), ``RunInterrupted`` (a ``KeyboardInterrupt``)

Overrides are keyword arguments in either of two forms, which may be mixed:
``fleet={"devices": 20, "stragglers": 0.5}`` (one keyword per section, a partial table)
or ``**{"fleet.devices": 20}`` (dotted keys, as with ``--set`` on the command line).
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any, Iterable, Mapping

__version__ = "0.1.0"

__all__ = ["ConfigError", "EdgeClient", "RunFolderMismatch", "RunInterrupted", "__version__", "audit", "compare",
           "load_config", "simulate"]

# name -> module of the names resolved on first use (importing them here would load the stack)
_LAZY = {
    "EdgeClient": "ftte.edge.http_client",  # needs the edge stack (torch, opacus)
    "ConfigError": "ftte.pipeline.config",  # a configuration is malformed; names the key
    "RunFolderMismatch": "ftte.pipeline.run_outputs",  # out= holds a run of another configuration
    "RunInterrupted": "ftte.pipeline.run_outputs",  # Ctrl-C; the run is saved and resumable
}

if TYPE_CHECKING:
    from ftte.edge.http_client import EdgeClient
    from ftte.pipeline.config import Config
    from ftte.privacy.audit import AuditResult


def _api() -> Any:
    return importlib.import_module("ftte.pipeline.api")


def load_config(config: "Config | str | os.PathLike[str] | Mapping[str, Any] | None" = None,
                **overrides: Any) -> "Config":
    """The configuration a run would use: ``config`` (None = the packaged defaults, a TOML
    path, a ``Config``, or a mapping of partial tables applied over the defaults) with
    ``overrides`` applied; validated, so a bad key raises ``ConfigError`` naming it."""
    return _api().load_config(config, **overrides)


def simulate(config: Any = None, out: "str | os.PathLike[str] | None" = None, *, fresh: bool = False,
             progress: bool = False, **overrides: Any) -> dict[str, Any]:
    """Run one strategy (``run.strategy``) over a simulated fleet; return its summary.

    ``config`` as for :func:`load_config`. With ``out``, the run folder gets the same
    files as ``ftte simulate --out`` and an earlier run there of the same configuration is
    resumed (``run.max_versions``/``run.max_virtual_time_s`` may grow); an earlier run of
    another configuration raises ``RunFolderMismatch`` (a ``ConfigError``) before anything
    is written, unless ``fresh=True`` discards it. ``out=None`` runs in memory and writes
    nothing. ``progress=True`` draws the progress bar on stderr.
    """
    return _api().simulate(config, out, fresh=fresh, progress=progress, **overrides)


def compare(config: Any = None, out: "str | os.PathLike[str] | None" = None, *,
            strategies: Iterable[str] = ("ftte", "fedbuff", "fedavg"), fresh: bool = False,
            progress: bool = False, **overrides: Any) -> dict[str, Any]:
    """Run each of ``strategies`` on the same fleet, data and seeds; return
    ``{"strategies": {name: summary}, "ratios_vs_fedavg": ..., "ftte_vs_fedbuff": ...}``
    (the content of ``compare.json``). Folders ``out/<strategy>`` follow the rules of
    :func:`simulate`; every one is checked before any strategy runs."""
    return _api().compare(config, out, strategies=strategies, fresh=fresh, progress=progress, **overrides)


def audit(path: "str | os.PathLike[str]", *, report: "str | os.PathLike[str] | None" = None,
          rtol: float = 1e-6, atol: float = 1e-9, expect_public_key: str | None = None,
          expect_head: str | None = None) -> "AuditResult":
    """Verify the privacy ledger at ``path`` (a ``ledger.db`` or a run folder holding one):
    hash chain, signatures, every epsilon recomputed, budgets. ``result.ok`` is the verdict;
    ``report=DIR`` also writes ``audit.md`` and ``epsilon.png`` there."""
    return _api().audit(path, report=report, rtol=rtol, atol=atol, expect_public_key=expect_public_key,
                        expect_head=expect_head)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ftte' has no attribute {name!r}")
