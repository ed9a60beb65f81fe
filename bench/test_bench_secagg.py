"""pytest-benchmark suite: one member's masking and the server's unmasking, over dim x cohort size x dropout.

Run with ``make bench`` (``pytest bench --benchmark-enable --benchmark-json=...``); without
``--benchmark-enable`` every case still runs once and checks its result. Heavy cases
(dim 1e6 with 50 or more members) are marked ``slow``: ``-m "not slow"`` leaves them out.

Timed regions, as in ``ftte bench secagg``:

* ``client``: ``SecAggClient.masked_input`` of one surviving member (decrypt the shares it
  holds, self mask, pairwise masks with every neighbour, sign), on an already quantized input;
* ``server``: ``SecAggServer.finish`` (sum of the masked vectors, reconstruction of the
  survivors' seeds and the dropped members' keys, mask removal).

A cohort is prepared once per parameter combination, outside the timed regions, by
driving a whole session in-process; each timed round then starts from a copy of the
member or server state taken just before the timed call, so every round does the same work.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest

from ftte.bench.secagg_run import SecAggBenchConfig, make_cohort
from ftte.crypto.secagg_client import ClientStage, SecAggClient
from ftte.crypto.secagg_server import SecAggServer, ServerStage

DIMS = (10_000, 100_000, 1_000_000)
COHORTS = (10, 50, 100)
DROPOUTS = (0.0, 0.1, 0.3)
ROUNDS = 3


def _case(dim: int, clients: int, dropout: float):
    marks = [pytest.mark.slow] if dim >= 1_000_000 and clients >= 50 else []
    return pytest.param((dim, clients, dropout), id=f"dim{dim}-n{clients}-drop{dropout}", marks=marks)


CASES = [_case(d, n, p) for d in DIMS for n in COHORTS for p in DROPOUTS]


@dataclass
class Prepared:
    cfg: SecAggBenchConfig
    ring_bits: int
    probe: int  # the surviving member whose masking is timed
    probe_client: SecAggClient  # its state just before masked_input
    probe_delivery: object
    probe_input: np.ndarray
    probe_masked: np.ndarray  # what it really sent in the session
    server: SecAggServer  # state just before finish
    expected: np.ndarray  # ring sum of the survivors' inputs
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


def _snapshot_client(client: SecAggClient) -> SecAggClient:
    snap = copy.copy(client)
    snap._held = dict(client._held)
    return snap


def _snapshot_server(server: SecAggServer) -> SecAggServer:
    snap = copy.copy(server)
    snap.masked = dict(server.masked)
    snap.unmask_msgs = dict(server.unmask_msgs)
    return snap


def prepare(dim: int, clients: int, dropout: float) -> Prepared:
    """Drive one session (members dropping before upload) up to the server's unmasking."""
    cfg = SecAggBenchConfig(clients=clients, dim=dim, dropout=dropout)
    params, identities, inputs, drop, _ = make_cohort(cfg)
    server = SecAggServer(params)
    members = {m: SecAggClient(params, m, identities[m]) for m in params.members}
    for m in params.members:
        server.receive(members[m].advertise())
    roster = server.close_advertise()
    for m in params.members:
        server.receive(members[m].share_keys(roster))
    deliveries = server.close_share()
    live = [m for m in params.members if m not in drop]
    probe = live[0]
    probe_client = _snapshot_client(members[probe])
    sent = {}
    for m in live:
        msg = members[m].masked_input(deliveries[m], inputs[m])
        sent[m] = msg.vector
        server.receive(msg)
    survivor_list = server.close_upload()
    for m in survivor_list.survivors:
        server.receive(members[m].consistency(survivor_list))
    bundle = server.close_consistency()
    for m in survivor_list.survivors:
        server.receive(members[m].unmask(bundle))
    expected = np.zeros(dim, dtype=inputs[probe].dtype)
    for m in survivor_list.survivors:
        np.add(expected, inputs[m], out=expected)
    return Prepared(
        cfg=cfg,
        ring_bits=params.ring_bits,
        probe=probe,
        probe_client=probe_client,
        probe_delivery=deliveries[probe],
        probe_input=inputs[probe],
        probe_masked=sent[probe],
        server=server,
        expected=expected,
        survivors=tuple(survivor_list.survivors),
        dropped=tuple(sorted(drop)),
    )


@pytest.fixture(scope="module", params=CASES)
def cohort(request) -> Prepared:
    return prepare(*request.param)


def _describe(benchmark, prepared: Prepared, side: str) -> None:
    cfg = prepared.cfg
    benchmark.group = f"secagg-{side}-dim{cfg.dim}"
    benchmark.extra_info.update(
        side=side,
        dim=cfg.dim,
        clients=cfg.clients,
        dropout=cfg.dropout,
        survivors=len(prepared.survivors),
        ring_bits=prepared.ring_bits,
    )


def test_client_masking(benchmark, cohort: Prepared) -> None:
    _describe(benchmark, cohort, "client_mask")
    assert cohort.probe_client.stage is ClientStage.SHARED

    def fresh():
        return (_snapshot_client(cohort.probe_client), cohort.probe_delivery, cohort.probe_input), {}

    msg = benchmark.pedantic(
        lambda client, delivery, vector: client.masked_input(delivery, vector),
        setup=fresh,
        rounds=ROUNDS,
        iterations=1,
    )
    assert msg.member == cohort.probe
    assert msg.vector.dtype == cohort.probe_input.dtype and msg.vector.shape == (cohort.cfg.dim,)
    # Masks are a deterministic function of the session's keys: the timed call reproduces
    # exactly the vector that, summed with the others, unmasked to the exact sum.
    assert np.array_equal(msg.vector, cohort.probe_masked)
    assert not np.array_equal(msg.vector, cohort.probe_input)


def test_server_unmasking(benchmark, cohort: Prepared) -> None:
    _describe(benchmark, cohort, "server_unmask")
    assert cohort.server.stage is ServerStage.UNMASK

    def fresh():
        return (_snapshot_server(cohort.server),), {}

    result = benchmark.pedantic(lambda server: server.finish(), setup=fresh, rounds=ROUNDS, iterations=1)
    assert result.survivors == cohort.survivors
    assert result.dropped == cohort.dropped
    assert len(result.dropped) == int(np.floor(cohort.cfg.dropout * cohort.cfg.clients + 1e-9))
    assert np.array_equal(result.total, cohort.expected)
