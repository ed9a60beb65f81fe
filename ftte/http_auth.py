"""What a device signs for every HTTP request, shared by ``ftte.edge`` and ``ftte.pipeline``.

A request is authenticated by four headers: the device's Ed25519 public key, a random
nonce, the device's timestamp (milliseconds, corrected by the server clock it last saw)
and a signature over :func:`request_signing_bytes`. The signed bytes bind the method, the
path, the SHA-256 of the exact body, the nonce, the timestamp and the key, so a captured
request cannot be re-aimed at another endpoint, re-sent with another body, or replayed
once the server has seen its nonce or once its timestamp leaves the accepted window.

This module only builds bytes (hashlib); signing and verifying stay with
``ftte.crypto.primitives`` on each side, so the top-level package keeps its light imports.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Callable

PROTOCOL_LABEL = b"ftte/http/request/v1"
API_PREFIX = "/v1"
CONTENT_TYPE = "application/msgpack"

HEADER_DEVICE = "x-ftte-device"  # 64 hex digits: the Ed25519 public key
HEADER_NONCE = "x-ftte-nonce"  # 32 hex digits: 16 random bytes
HEADER_TIME = "x-ftte-time"  # decimal milliseconds since the Unix epoch
HEADER_SIGNATURE = "x-ftte-signature"  # 128 hex digits
HEADER_SERVER_TIME = "x-ftte-server-time"  # on every response: the server's clock, milliseconds

NONCE_BYTES = 16
_HEX = re.compile(r"^[0-9a-f]+$")


def body_digest(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def request_signing_bytes(method: str, path: str, digest: bytes, nonce_hex: str, time_ms: int, device_hex: str) -> bytes:
    """The exact bytes a device signs for one request."""
    return b"\n".join([
        PROTOCOL_LABEL,
        method.upper().encode("ascii"),
        path.encode("utf-8"),
        digest.hex().encode("ascii"),
        nonce_hex.encode("ascii"),
        str(int(time_ms)).encode("ascii"),
        device_hex.encode("ascii"),
    ])


def signed_headers(sign: Callable[[bytes], bytes], device_hex: str, path: str, body: bytes, *, time_ms: int,
                   nonce_hex: str | None = None, method: str = "POST") -> dict[str, str]:
    """The headers of one authenticated request; ``sign`` is the device's Ed25519 signing function."""
    nonce_hex = nonce_hex or os.urandom(NONCE_BYTES).hex()
    sig = sign(request_signing_bytes(method, path, body_digest(body), nonce_hex, time_ms, device_hex))
    return {
        "content-type": CONTENT_TYPE,
        HEADER_DEVICE: device_hex,
        HEADER_NONCE: nonce_hex,
        HEADER_TIME: str(int(time_ms)),
        HEADER_SIGNATURE: sig.hex(),
    }


def is_hex(value: str, length: int) -> bool:
    """Lower-case hex of exactly ``length`` digits (the only spelling the headers accept)."""
    return len(value) == length and bool(_HEX.match(value))


def member_id(public_key: bytes) -> int:
    """The member id a device is known by: 63 bits of SHA-256 of its identity key.

    Stable across restarts and allow-list edits (an index into the list would not be),
    and inside the ``[0, 2^63)`` range the secure-aggregation session requires.
    """
    return int.from_bytes(hashlib.sha256(b"ftte/member-id/v1" + public_key).digest()[:8], "big") >> 1
