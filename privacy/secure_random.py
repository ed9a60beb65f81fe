"""Randomness for DP-SGD from a cryptographic keystream: Poisson sampling and Gaussian noise.

Why not torch's generator: it is a Mersenne Twister seeded with (at most) 64 bits, and we
used to seed it with 31. Anyone who sees one noised update can enumerate the seeds,
regenerate the noise and subtract it: the DP guarantee is then void. Here every random
bit comes from a ChaCha20 keystream (the ``cryptography`` package, i.e. OpenSSL) under a
256-bit key. In deployment the key comes from ``os.urandom``; the simulator, which must
be reproducible, derives it from its run seed, and :attr:`SecureRandom.source` says which
so that the ledger's ``rng_source`` column never overstates the protection.

Why several Gaussian draws per coordinate: even with perfect uniform bits, a Gaussian
sampler built from floating-point arithmetic (Box-Muller, ratio of uniforms, ...) does
not output every double with the right probability; the pattern of low-order bits of a
published noisy value can reveal which input it came from (Mironov 2012, "On significance
of the least significant bits for differential privacy", and later attacks on DP-SGD
libraries). Opacus's ``secure_mode`` counters this by drawing ``2n`` Gaussians (n = 2) and
returning their sum divided by ``sqrt(2n)``: the sum of independent draws has the same
distribution as one draw with the scaled variance, but the set of values an attacker must
consider to invert it grows from about 2^53 to 2^(53 (2n-1)). We do the same, in float64,
and round to the parameter dtype only at the end. This raises the attack's cost; it is not
an exact sampler (a discrete Gaussian would be), and the docstring of
:meth:`SecureRandom.gaussian` says so.

Streams: :meth:`SecureRandom.child` derives an independent generator for a label with
HKDF-SHA256, so the sampling stream and the noise stream of one round never share
keystream and a change in how much one consumes cannot shift the other.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

if TYPE_CHECKING:  # torch is imported only by gaussian_tensor, so this module stays light
    import torch

KEY_BYTES = 32
SECURE_GAUSSIAN_DRAWS = 4  # 2n with n = 2, as Opacus's secure_mode
_NONCE = bytes(16)  # counter 0, nonce 0: every key is used for exactly one stream
_CHILD_SALT = b"ftte.secure_random.child/1"
_SEED_SALT = b"ftte.secure_random.simulation-seed/1"
_UNIT = 2.0 ** -53
_ZERO_PIECE = 1 << 20  # keystream is produced by encrypting zeros, at most this many bytes per call
_ZEROS = memoryview(bytes(_ZERO_PIECE))

SOURCE_OS = "chacha20:os"
SOURCE_SEED = "chacha20:derived-from-run-seed (simulation)"
SOURCE_KEY = "chacha20:caller-key"


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(key)


class SecureRandom:
    """A deterministic function of a 256-bit key: the same key gives the same draws.

    Not thread-safe (one stream position); build one per round and device.
    """

    def __init__(self, key: bytes, *, source: str) -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            raise ValueError(f"SecureRandom needs a {KEY_BYTES}-byte key")
        self._key = bytes(key)
        self.source = source
        self._stream = Cipher(algorithms.ChaCha20(self._key, _NONCE), mode=None).encryptor()
        self.bytes_drawn = 0  # stream position: lets a caller check that nothing was drawn

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_os(cls) -> "SecureRandom":
        """Deployment: a fresh key from the operating system's CSPRNG."""
        return cls(os.urandom(KEY_BYTES), source=SOURCE_OS)

    @classmethod
    def from_key(cls, key: bytes, *, source: str = SOURCE_KEY) -> "SecureRandom":
        """A caller-supplied 32-byte key (the caller answers for where it came from)."""
        return cls(key, source=source)

    @classmethod
    def from_seed(cls, seed: int, *context: str) -> "SecureRandom":
        """Simulation only: a key derived (HKDF-SHA256) from an integer run seed and a context.

        The key is 256 bits long but has only as much entropy as the seed, which is why
        :attr:`source` says so; never use this on a real device.
        """
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        info = "\x1f".join(context).encode("utf-8")
        return cls(_hkdf(str(seed).encode("ascii"), _SEED_SALT, info), source=SOURCE_SEED)

    def __reduce__(self):
        """Picklable while unused, so a simulation can hand a member's generator to the worker
        process that plays it (the Ray backend): the copy starts where the original stands, at
        the stream's start. A generator that has drawn cannot be copied, or two parties would
        share keystream."""
        if self.bytes_drawn:
            raise TypeError("a SecureRandom that has drawn cannot be pickled (its copy would repeat the draws)")
        return (_rebuild, (self._key, self.source))

    def child(self, label: str) -> "SecureRandom":
        """An independent generator for ``label`` (same source); does not advance this one."""
        return SecureRandom(_hkdf(self._key, _CHILD_SALT, label.encode("utf-8")), source=self.source)

    # -- draws -----------------------------------------------------------------------------
    def random_bytes(self, n: int) -> bytes:
        if n < 0:
            raise ValueError("n must be >= 0")
        if n > _ZERO_PIECE:
            return self.words(n, np.uint8).tobytes()
        self.bytes_drawn += n
        return self._stream.update(_ZEROS[:n])

    def words(self, n: int, dtype: "np.typing.DTypeLike" = "<u4") -> np.ndarray:
        """The next ``n * itemsize`` keystream bytes as a fresh array of ``n`` values of ``dtype``: the
        same values as ``np.frombuffer(random_bytes(...), dtype)``, written in place.

        Why not ``random_bytes`` for large draws: encrypting a fresh ``bytes(n)`` reads
        lazily-zeroed pages (one page fault per 4 kB) and returns a second large object; here a
        shared 1 MB block of zeros is encrypted piece by piece into the array (5 ms against 1 ms for
        8 MB on the bench machine)."""
        if n < 0:
            raise ValueError("n must be >= 0")
        out = np.empty(n, dtype=dtype)
        view = memoryview(out).cast("B")
        size = len(view)
        for start in range(0, size, _ZERO_PIECE):
            stop = min(size, start + _ZERO_PIECE)
            self._stream.update_into(_ZEROS[:stop - start], view[start:stop])
        self.bytes_drawn += size
        return out

    def uniform(self, n: int) -> np.ndarray:
        """``n`` float64 values uniform on [0, 1), each from 53 fresh keystream bits."""
        out = (self.words(n, "<u8") >> np.uint64(11)).astype(np.float64)
        out *= _UNIT
        return out

    def bernoulli(self, n: int, p: float) -> np.ndarray:
        """``n`` independent booleans, each True with probability ``p``."""
        if not (0.0 <= p <= 1.0):
            raise ValueError(f"p must lie in [0, 1], got {p}")
        return self.uniform(n) < p

    def _standard_normal_t(self, n: int) -> "torch.Tensor":
        # Box-Muller in float64; torch's vectorised log/sin/cos are several times faster
        # than numpy's here, which matters at a million coordinates per step.
        import torch

        pairs = (n + 1) // 2
        u = torch.from_numpy(self.uniform(2 * pairs))
        radius = torch.log1p(-u[:pairs]).mul_(-2.0).sqrt_()  # 1 - u lies in (0, 1]: log is finite
        angle = u[pairs:].mul(2.0 * math.pi)
        out = torch.empty(2 * pairs, dtype=torch.float64)
        torch.mul(radius, torch.cos(angle), out=out[:pairs])
        torch.mul(radius, torch.sin(angle), out=out[pairs:])
        return out[:n]

    def standard_normal(self, n: int) -> np.ndarray:
        """``n`` float64 N(0, 1) draws by Box-Muller (one draw per uniform)."""
        return self._standard_normal_t(n).numpy()

    def _gaussian_t(self, n: int, std: float) -> "torch.Tensor":
        import torch

        if not (std >= 0.0 and math.isfinite(std)):
            raise ValueError(f"std must be finite and >= 0, got {std}")
        if std == 0.0:
            return torch.zeros(n, dtype=torch.float64)
        draws = self._standard_normal_t(SECURE_GAUSSIAN_DRAWS * n).view(SECURE_GAUSSIAN_DRAWS, n)
        return draws.sum(dim=0).mul_(std / math.sqrt(SECURE_GAUSSIAN_DRAWS))

    def gaussian(self, n: int, std: float) -> np.ndarray:
        """``n`` float64 N(0, std²) draws, each the sum of :data:`SECURE_GAUSSIAN_DRAWS`
        independent standard normals divided by the square root of their count (the draws
        for coordinate ``i`` are entries ``i, n + i, 2n + i, ...`` of one
        :meth:`standard_normal` call of ``SECURE_GAUSSIAN_DRAWS * n`` values).

        The sum is exactly N(0, 1) in distribution; the point is that the low-order bits of
        the result no longer pin down the uniform inputs (see the module docstring). A
        mitigation of the floating-point attack, not an exact sampler.
        """
        return self._gaussian_t(n, std).numpy()

    def gaussian_tensor(self, shape: "torch.Size | tuple[int, ...]", std: float, *,
                        dtype: "torch.dtype | None" = None, device: "torch.device | str | None" = None
                        ) -> "torch.Tensor":
        """:meth:`gaussian` as a torch tensor of ``shape`` (rounded to ``dtype`` last)."""
        import torch

        count = 1
        for d in shape:
            count *= int(d)
        values = self._gaussian_t(count, std).reshape(tuple(shape))
        return values.to(dtype=dtype or torch.get_default_dtype(), device=device)


def _rebuild(key: bytes, source: str) -> SecureRandom:
    return SecureRandom(key, source=source)


def poisson_batches(rng: SecureRandom, n_records: int, sample_rate: float, steps: int) -> list[list[int]]:
    """``steps`` Poisson batches: record ``i`` joins each batch independently with
    probability ``sample_rate`` (what both accountants assume). Batches can be empty."""
    if n_records < 1 or steps < 0:
        raise ValueError("n_records must be >= 1 and steps >= 0")
    return [np.flatnonzero(rng.bernoulli(n_records, sample_rate)).tolist() for _ in range(steps)]
