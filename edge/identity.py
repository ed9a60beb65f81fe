"""A device's long-term Ed25519 identity on disk: 32 raw bytes (or 64 hex digits) in a 0600 file.

The public half is what an operator puts on the server's allow-list; the member id the
server knows the device by is derived from it (:func:`ftte.http_auth.member_id`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ftte.crypto.primitives import Signer


def load_identity(path: str | os.PathLike[str]) -> Signer:
    raw = Path(path).read_bytes()
    if len(raw) != 32:
        try:
            raw = bytes.fromhex(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raw = b""
    if len(raw) != 32:
        raise ValueError(f"{path}: expected a 32-byte Ed25519 private key (raw or 64 hex digits)")
    return Signer(raw)


def create_identity(path: str | os.PathLike[str]) -> Signer:
    """Create a fresh key file (``O_EXCL``, mode 0600); refuses to overwrite."""
    signer = Signer()
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(signer.private_bytes())
    return signer
