"""Flower 1.41.0's SecAgg+ building blocks on the cohort of ``ftte bench secagg``: the ``--compare flower`` side.

This is our code driving Flower's own functions, in the same process, on the same cohort
(size, float updates, dropped members, masking graph, share threshold, ring size and
quantization scale) that :func:`ftte.bench.secagg_run.run` just measured:

* key agreement and encryption: ``generate_key_pairs`` (ECDH on SECP384R1, PEM bytes),
  ``generate_shared_key`` (ECDH + HKDF, base64 key), ``encrypt``/``decrypt`` (Fernet);
* Shamir: ``create_shares`` / ``combine_shares`` (PyCryptodome, 16-byte chunks over GF(2^128));
* quantization: ``quantize`` / ``dequantize`` (stochastic rounding into [0, target_range]);
* masks: ``pseudo_rand_gen`` (int64 draws of NumPy's Mersenne Twister), and the
  ``parameters_*`` helpers for the ring arithmetic;
* bytes: ``ndarray_to_bytes`` and Flower's protobuf serialisation of each reply's ConfigRecord.

Each side does the work of Flower's SecAgg+ client mod (``secaggplus_mod``) and server
workflow (``SecAggPlusWorkflow``) stage by stage, without the Grid/Message machinery:

client  setup        two SECP384R1 key pairs (sk1/pk1 for masks, sk2/pk2 for share encryption)
        share keys   a fresh 32-byte seed; Shamir shares of the seed and of sk1 (PEM) for every
                     neighbour (itself included); each pair of shares Fernet-encrypted under the
                     ECDH(sk2, pk2) key, which the client keeps for the next stage
        masking      [timed] decrypt the shares it received; weight and quantize its update;
                     prepend the weight factor; add the self mask; for every neighbour that
                     shared keys: ECDH(sk1, pk1) + HKDF, a pairwise mask, added or subtracted
                     by node-id order; reduce mod the ring
        unmask       seed shares of surviving neighbours, sk1 shares of dropped ones
server  masking      [timed] sum the masked vectors, reduce mod the ring
        unmask       [timed] for every member: combine_shares over all the shares collected; a
                     survivor's seed -> remove its self mask; a dropped member's sk1 -> for every
                     neighbour, ECDH + HKDF + pairwise mask, removed; reduce mod the ring;
                     then dequantize (split the weight factor, map back to floats)

Only the masking stage of a client and the unmasking of the server are timed, to match
``client_mask_s`` (our ``SecAggClient.masked_input``) and ``server_unmask_s`` (our
``SecAggServer.finish``); :data:`TIMING_NOTES` says exactly what each region holds.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from ftte import wire
from ftte.bench.secagg_run import SecAggBenchConfig, make_cohort
from ftte.crypto.prg import ring_dtype
from ftte.crypto.quantize import Quantizer, levels
from ftte.crypto.secagg_session import SessionParams
from ftte.secagg_messages import MaskedInput

FLOWER_VERSION = "1.41.0"
INSTALL_HINT = "install Flower with `make compare-flower` or `pip install 'ftte[flower]'` (flwr==1.41.0)"

TIMING_NOTES = (
    "Both sides run in one process on the same cohort, floats, dropped members, graph, share threshold, "
    "ring (mod 2^ring_bits) and quantization scale (Flower target_range = 2*(2^(value_bits-1)-1) over "
    "[-clip, clip], i.e. the same levels per unit as ours). "
    "client_mask_s (ours) = SecAggClient.masked_input: X25519 + HKDF per sender to derive the share key, "
    "AEAD-decrypt the shares, self mask and one X25519 + HKDF + AES-CTR pairwise mask per neighbour on the "
    "already quantized input, Ed25519 signature over the encoded message; median over survivors. "
    "ours_client_quantize_s = Quantizer.quantize of one survivor's float update (median over survivors), "
    "timed separately. "
    "flower_client_mask_s = Flower's masking stage: Fernet-decrypt the shares (keys cached from the "
    "share-keys stage, as Flower does), weight + quantize + prepend the factor, self mask, one ECDH(P-384, "
    "PEM) + HKDF + pseudo_rand_gen pairwise mask per neighbour, mod; median over survivors; its quantize "
    "part is flower_client_quantize_s. No serialisation on either side. "
    "mask_speedup = flower_client_mask_s / (client_mask_s + ours_client_quantize_s); "
    "mask_speedup_excl_quantize = Flower's stage without its quantize part / client_mask_s. "
    "server_unmask_s (ours) = SecAggServer.finish: sum of masked vectors, one Lagrange interpolation per "
    "secret (threshold shares, cached coefficients) checked against its commitment, self masks of survivors "
    "and pairwise masks of dropped members regenerated and removed. ours_server_dequantize_s = "
    "Quantizer.dequantize_sum of the ring sum, timed separately. "
    "flower_server_unmask_s = sum of the (already deserialised) int64 masked vectors + mod, combine_shares "
    "over all collected shares per member, self masks removed, pairwise masks of each dropped member with "
    "every neighbour regenerated and removed, mod, then factor split + dequantize "
    "(flower_server_dequantize_s, part of it). "
    "unmask_speedup = flower_server_unmask_s / (server_unmask_s + ours_server_dequantize_s); "
    "unmask_speedup_excl_dequantize leaves dequantization out of both. "
    "Bytes: flower_bytes_up_per_client = sum over a survivor's four replies of the protobuf size of the "
    "reply ConfigRecord (flwr.common.serde.config_record_to_proto(...).ByteSize()), the masked vector "
    "inside as flwr's ndarray_to_bytes (np.save of int64); Flower's Message envelope is not counted, so "
    "it is a lower bound. Ours counts every encoded message a survivor sends (wire.encode). "
    "*_masked_upload_bytes_per_coordinate: the masking-stage message alone (ours: encoded MaskedInput; "
    "Flower: its stage-2 reply record), per coordinate. "
    "flower_exact: Flower's unmasked ring sum equals the plain sum of its own quantized vectors mod the ring."
)


def load_flower() -> SimpleNamespace:
    """Flower's SecAgg+ building blocks, or an ImportError that says how to install them."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        import flwr
        from flwr.app import ConfigRecord
        from flwr.common import bytes_to_ndarray, ndarray_to_bytes
        from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
        from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
        from flwr.common.secure_aggregation.ndarrays_arithmetic import (
            factor_combine,
            factor_extract,
            get_parameters_shape,
            parameters_addition,
            parameters_mod,
            parameters_multiply,
            parameters_subtraction,
        )
        from flwr.common.secure_aggregation.quantization import dequantize, quantize
        from flwr.common.secure_aggregation.secaggplus_utils import (
            pseudo_rand_gen,
            share_keys_plaintext_concat,
            share_keys_plaintext_separate,
        )
        from flwr.common.serde import config_record_to_proto
        from flwr.supercore.primitives.asymmetric import (
            bytes_to_private_key,
            bytes_to_public_key,
            generate_key_pairs,
            private_key_to_bytes,
            public_key_to_bytes,
        )
    except ImportError as exc:
        raise ImportError(f"--compare flower needs Flower's SecAgg+ modules ({exc}); {INSTALL_HINT}") from exc
    return SimpleNamespace(**{k: v for k, v in locals().items() if k != "exc"})


@dataclass(frozen=True)
class FlowerSettings:
    """Flower's SecAgg+ configuration chosen to match one of our cohorts."""

    num_shares: int  # holders of each member's shares, the member itself included
    threshold: int  # shares needed to reconstruct
    clipping_range: float
    target_range: int  # quantized values lie in [0, target_range]
    mod_range: int  # the ring, 2^ring_bits
    max_weight: float = 1.0
    num_examples: int = 1  # weight ratio 1: the weight factor is target_range

    @staticmethod
    def matching(cfg: SecAggBenchConfig, params: SessionParams) -> "FlowerSettings":
        n = len(params.members)
        holders = n if params.graph == "full" else params.neighbors + 1
        settings = FlowerSettings(
            num_shares=holders,
            threshold=params.t,
            clipping_range=float(cfg.clip),
            # [-clip, clip] -> [0, 2L]: the same L/clip levels per unit as our Quantizer.
            target_range=2 * levels(cfg.value_bits),
            mod_range=2**params.ring_bits,
        )
        if n * settings.target_range >= settings.mod_range:
            raise ValueError(
                f"Flower's sum of {n} values in [0, {settings.target_range}] would wrap a {params.ring_bits}-bit ring"
            )
        return settings


@dataclass
class FlowerMember:
    nid: int
    sk1: bytes = b""
    pk1: bytes = b""
    sk2: bytes = b""
    pk2: bytes = b""
    seed: bytes = b""
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # neighbour -> (pk1, pk2), self included
    ss2: dict[int, bytes] = field(default_factory=dict)  # neighbour -> Fernet key
    seed_shares: dict[int, bytes] = field(default_factory=dict)  # owner -> share I hold
    sk1_shares: dict[int, bytes] = field(default_factory=dict)


@dataclass
class FlowerRun:
    exact: bool
    client_mask_s: list[float]
    client_quantize_s: list[float]
    server_unmask_s: float
    server_dequantize_s: float
    bytes_up: list[int]
    masked_upload_bytes: int  # the masking-stage reply alone (protobuf ConfigRecord)
    vector_bytes: int  # ndarray_to_bytes of the masked vector alone
    survivors: int
    dropped: int


def _record_bytes(fl: SimpleNamespace, reply: dict) -> int:
    """Bytes of one client reply as Flower serialises it (ConfigRecord protobuf, envelope excluded)."""
    return fl.config_record_to_proto(fl.ConfigRecord(reply, False)).ByteSize()


def _ring(n: int, num_shares: int, rng: random.Random) -> dict[int, set[int]]:
    """SecAgg+ neighbourhoods as Flower's workflow draws them: a shuffled ring, num_shares//2 each side, self included."""
    nids = list(range(1, n + 1))
    rng.shuffle(nids)
    half = num_shares >> 1
    return {nid: {nids[(i + d) % n] for d in range(-half, half + 1)} for i, nid in enumerate(nids)}


def _share_keys(fl: SimpleNamespace, me: FlowerMember, s: FlowerSettings) -> dict[int, bytes]:
    """Stage 1 of a Flower client: shares of the seed and of sk1, encrypted to each neighbour."""
    me.seed = os.urandom(32)
    seed_shares = fl.create_shares(me.seed, s.threshold, s.num_shares)
    sk1_shares = fl.create_shares(me.sk1, s.threshold, s.num_shares)
    sk2 = fl.bytes_to_private_key(me.sk2)
    out: dict[int, bytes] = {}
    for i, (nid, (_, pk2)) in enumerate(me.keys.items()):
        if nid == me.nid:
            me.seed_shares[nid], me.sk1_shares[nid] = seed_shares[i], sk1_shares[i]
            continue
        key = fl.generate_shared_key(sk2, fl.bytes_to_public_key(pk2))
        me.ss2[nid] = key
        out[nid] = fl.encrypt(key, fl.share_keys_plaintext_concat(me.nid, nid, seed_shares[i], sk1_shares[i]))
    return out


def _mask(fl: SimpleNamespace, me: FlowerMember, inbox: list[tuple[int, bytes]], update: np.ndarray, s: FlowerSettings):
    """Stage 2 of a Flower client; returns (masked arrays, plain quantized arrays, stage seconds, quantize seconds)."""
    t0 = time.perf_counter()
    senders = []
    for src, token in inbox:
        got_src, dst, seed_share, sk1_share = fl.share_keys_plaintext_separate(fl.decrypt(me.ss2[src], token))
        if got_src != src or dst != me.nid:
            raise RuntimeError(f"Flower side: node {me.nid} got shares meant for {dst} from {got_src}")
        me.seed_shares[src], me.sk1_shares[src] = seed_share, sk1_share
        senders.append(src)
    t1 = time.perf_counter()
    q_ratio = round(s.num_examples / s.max_weight * s.target_range)
    weighted = fl.parameters_multiply([update], q_ratio / s.target_range)
    quantized = fl.factor_combine(q_ratio, fl.quantize(weighted, s.clipping_range, s.target_range))
    t2 = time.perf_counter()
    shapes = fl.get_parameters_shape(quantized)
    masked = fl.parameters_addition(quantized, fl.pseudo_rand_gen(me.seed, s.mod_range, shapes))
    sk1 = fl.bytes_to_private_key(me.sk1)
    for nid in senders:
        key = fl.generate_shared_key(sk1, fl.bytes_to_public_key(me.keys[nid][0]))
        mask = fl.pseudo_rand_gen(key, s.mod_range, shapes)
        masked = fl.parameters_addition(masked, mask) if me.nid > nid else fl.parameters_subtraction(masked, mask)
    masked = fl.parameters_mod(masked, s.mod_range)
    t3 = time.perf_counter()
    return masked, quantized, t3 - t0, t2 - t1


def _server_unmask(
    fl: SimpleNamespace,
    masked: list[list[np.ndarray]],
    shares: dict[int, list[bytes]],
    active: set[int],
    neighbours: dict[int, set[int]],
    pk1: dict[int, bytes],
    s: FlowerSettings,
):
    """Flower's server: sum + mod, then per member combine_shares and mask removal, mod; then dequantize."""
    t0 = time.perf_counter()
    total = masked[0]
    for vec in masked[1:]:
        total = fl.parameters_addition(total, vec)
    total = fl.parameters_mod(total, s.mod_range)
    shapes = fl.get_parameters_shape(total)
    for nid, owner_shares in shares.items():
        if len(owner_shares) < s.threshold:
            raise RuntimeError(f"Flower side: only {len(owner_shares)} shares of node {nid}, need {s.threshold}")
        secret = fl.combine_shares(owner_shares)
        if nid in active:
            total = fl.parameters_subtraction(total, fl.pseudo_rand_gen(secret, s.mod_range, shapes))
            continue
        sk1 = fl.bytes_to_private_key(secret)
        for other in sorted(neighbours[nid] - {nid}):
            key = fl.generate_shared_key(sk1, fl.bytes_to_public_key(pk1[other]))
            mask = fl.pseudo_rand_gen(key, s.mod_range, shapes)
            total = fl.parameters_addition(total, mask) if nid > other else fl.parameters_subtraction(total, mask)
    total = fl.parameters_mod(total, s.mod_range)
    t1 = time.perf_counter()
    q_total, recon = fl.factor_extract(total)
    average = fl.dequantize(recon, s.clipping_range, s.target_range)
    offset = -(len(active) - 1) * s.clipping_range
    for vec in average:
        vec += offset
        vec *= s.target_range / q_total
    t2 = time.perf_counter()
    return total, average, t1 - t0, t2 - t1


def run_flower(cfg: SecAggBenchConfig, fl: SimpleNamespace | None = None) -> FlowerRun:
    """One Flower SecAgg+ round on the cohort ``make_cohort(cfg)`` describes (same floats, same dropped members)."""
    fl = fl or load_flower()
    params, _, _, drop, floats = make_cohort(cfg)
    s = FlowerSettings.matching(cfg, params)
    n = len(params.members)
    neighbours = _ring(n, s.num_shares, random.Random(cfg.seed))
    member_of = {m + 1: m for m in params.members}  # Flower node id -> our member id
    dropped = {m + 1 for m in drop}
    members = {nid: FlowerMember(nid) for nid in member_of}
    bytes_up = {nid: 0 for nid in members}

    # Stage 0: key pairs.
    for me in members.values():
        sk1, pk1 = fl.generate_key_pairs()
        sk2, pk2 = fl.generate_key_pairs()
        me.sk1, me.pk1 = fl.private_key_to_bytes(sk1), fl.public_key_to_bytes(pk1)
        me.sk2, me.pk2 = fl.private_key_to_bytes(sk2), fl.public_key_to_bytes(pk2)
        bytes_up[me.nid] += _record_bytes(fl, {"pk1": me.pk1, "pk2": me.pk2})
    # Stage 1: shares, forwarded by the server to their recipients.
    inbox: dict[int, list[tuple[int, bytes]]] = {nid: [] for nid in members}
    for me in members.values():
        me.keys = {nid: (members[nid].pk1, members[nid].pk2) for nid in neighbours[me.nid]}
        sent = _share_keys(fl, me, s)
        bytes_up[me.nid] += _record_bytes(fl, {"dsts": list(sent), "ctxts": list(sent.values())})
        for dst, token in sent.items():
            inbox[dst].append((me.nid, token))
    # Stage 2: survivors mask (timed); dropped members vanish here, after sharing keys.
    active = {nid for nid in members if nid not in dropped}
    mask_s, quant_s, plain, uploads = [], [], {}, {}
    rng_state = np.random.get_state()
    np.random.seed(cfg.seed)  # Flower's stochastic rounding draws from NumPy's global generator
    try:
        for nid in sorted(active):
            masked, quantized, t_stage, t_quant = _mask(fl, members[nid], inbox[nid], floats[member_of[nid]], s)
            mask_s.append(t_stage)
            quant_s.append(t_quant)
            plain[nid] = quantized
            uploads[nid] = [fl.ndarray_to_bytes(a) for a in masked]
            masked_reply = _record_bytes(fl, {"masked": uploads[nid]})
            bytes_up[nid] += masked_reply
    finally:
        np.random.set_state(rng_state)
    received = [[fl.bytes_to_ndarray(b) for b in uploads[nid]] for nid in sorted(active)]
    # Stage 3: each survivor releases seed shares of live neighbours and sk1 shares of dropped ones.
    collected: dict[int, list[bytes]] = {nid: [] for nid in members}
    for nid in sorted(active):
        me = members[nid]
        live = sorted(neighbours[nid] & active)
        dead = sorted(neighbours[nid] - active)
        released = [me.seed_shares[o] for o in live] + [me.sk1_shares[o] for o in dead]
        for owner, share in zip(live + dead, released):
            collected[owner].append(share)
        bytes_up[nid] += _record_bytes(fl, {"nids": live + dead, "shares": released})
    total, _, unmask_s, dequant_s = _server_unmask(
        fl, received, collected, active, neighbours, {nid: m.pk1 for nid, m in members.items()}, s
    )
    # Flower's quantize returns int32; its masked arithmetic runs in int64, and so does this check.
    expected = [a.astype(np.int64) for a in plain[min(active)]]
    for nid in sorted(active)[1:]:
        expected = fl.parameters_addition(expected, plain[nid])
    expected = fl.parameters_mod(expected, s.mod_range)
    exact = len(total) == len(expected) and all(np.array_equal(a, b) for a, b in zip(total, expected))
    return FlowerRun(
        exact=bool(exact),
        client_mask_s=mask_s,
        client_quantize_s=quant_s,
        server_unmask_s=unmask_s,
        server_dequantize_s=dequant_s,
        bytes_up=[bytes_up[nid] for nid in sorted(active)],
        masked_upload_bytes=masked_reply,
        vector_bytes=len(uploads[min(active)][1]),
        survivors=len(active),
        dropped=len(dropped),
    )


def _time_ours_conversions(cfg: SecAggBenchConfig, ring_bits: int, survivors: int) -> tuple[float, float]:
    """Our Quantizer.quantize of each survivor-sized update (median) and dequantize_sum of a ring sum."""
    _, _, inputs, drop, floats = make_cohort(cfg)
    quantizer = Quantizer(cfg.clip, cfg.value_bits, ring_bits)
    rng = np.random.default_rng(cfg.seed + 1)
    live = [m for m in sorted(inputs) if m not in drop]
    quant = []
    for m in live:
        t0 = time.perf_counter()
        quantizer.quantize(floats[m], rng)
        quant.append(time.perf_counter() - t0)
    ring_sum = np.zeros(cfg.dim, dtype=inputs[live[0]].dtype)
    for m in live:
        np.add(ring_sum, inputs[m], out=ring_sum)
    t0 = time.perf_counter()
    quantizer.dequantize_sum(ring_sum, count=survivors)
    dequant = time.perf_counter() - t0
    return statistics.median(quant), dequant


def _our_masked_upload_bytes(dim: int, ring_bits: int) -> int:
    """Size of our encoded masking-stage message (MaskedInput, signed) for a ``dim``-long ring vector."""
    vector = np.zeros(dim, dtype=ring_dtype(ring_bits))
    return len(wire.encode(MaskedInput(bytes(32), 0, vector, bytes(64))))


def compare_with_flower(cfg: SecAggBenchConfig, ours: dict) -> dict:
    """Run Flower's side on ``cfg``'s cohort and return its figures and the ratios against ``ours``."""
    fl = load_flower()
    flower = run_flower(cfg, fl)
    if flower.survivors != ours["survivors"] or flower.dropped != ours["dropped"]:
        raise RuntimeError("Flower side saw a different cohort than ours")
    our_quant, our_dequant = _time_ours_conversions(cfg, ours["ring_bits"], ours["survivors"])
    f_mask = statistics.median(flower.client_mask_s)
    f_mask_only = statistics.median(a - b for a, b in zip(flower.client_mask_s, flower.client_quantize_s))
    f_unmask = flower.server_unmask_s + flower.server_dequantize_s
    ours_mask = ours["client_mask_s"] + our_quant
    ours_unmask = ours["server_unmask_s"] + our_dequant
    up = statistics.median(flower.bytes_up)
    version = fl.flwr.__version__
    notes = TIMING_NOTES
    if version != FLOWER_VERSION:
        notes = f"Flower {version} is installed, not the pinned {FLOWER_VERSION}. " + notes
    return {
        "flower_version": version,
        "flower_exact": flower.exact,
        "flower_client_mask_s": f_mask,
        "flower_client_quantize_s": statistics.median(flower.client_quantize_s),
        "flower_server_unmask_s": f_unmask,
        "flower_server_dequantize_s": flower.server_dequantize_s,
        "flower_bytes_up_per_client": int(up),
        "flower_upload_bytes_per_coordinate": up / cfg.dim,
        "flower_masked_upload_bytes_per_coordinate": flower.masked_upload_bytes / cfg.dim,
        "flower_vector_bytes_per_coordinate": flower.vector_bytes / cfg.dim,
        "ours_masked_upload_bytes_per_coordinate": _our_masked_upload_bytes(cfg.dim, ours["ring_bits"]) / cfg.dim,
        "ours_client_quantize_s": our_quant,
        "ours_server_dequantize_s": our_dequant,
        "ours_client_mask_with_quantize_s": ours_mask,
        "ours_server_unmask_with_dequantize_s": ours_unmask,
        "mask_speedup": f_mask / ours_mask,
        "mask_speedup_excl_quantize": f_mask_only / ours["client_mask_s"],
        "unmask_speedup": f_unmask / ours_unmask,
        "unmask_speedup_excl_dequantize": flower.server_unmask_s / ours["server_unmask_s"],
        "timing_notes": notes,
    }


__all__ = ["FLOWER_VERSION", "INSTALL_HINT", "TIMING_NOTES", "FlowerRun", "FlowerSettings", "compare_with_flower", "load_flower", "run_flower"]
