"""ftte: privacy-hardened federated learning for small, uneven edge devices.

The top-level package stays light (numpy and msgpack only) so that ``import ftte`` on a
device never drags in the server's stack; heavier parts live in ``ftte.crypto``,
``ftte.privacy``, ``ftte.edge``, ``ftte.pipeline`` and ``ftte.bench``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
