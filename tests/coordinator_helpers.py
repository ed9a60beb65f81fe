"""An in-process deployment coordinator for tests: its config, a controllable clock, joins, an honest cohort."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ftte import wire
from ftte.crypto.primitives import Signer
from ftte.crypto.secagg_client import SecAggClient
from ftte.deploy_messages import JoinRequest, PollRequest, Submit
from ftte.deploy_messages import CohortEnd
from ftte.http_auth import member_id
from ftte.protocol.cohort import session_params
from ftte.protocol.encoding import UpdateCodec
from ftte.protocol.weighting import WeightRule
from ftte.deploy_messages import TaskInfo


CONFIG = """
[run]
seed = 0
[model]
name = "logistic"
[train]
local_steps = 2
batch_size = 8
[privacy]
noise_multiplier = 1.0
accountant = "rdp"
epsilon_max = 100.0
target_epsilon = 0.0
[secagg]
clip = 2.0
[server]
buffer_size = 4
deadline_s = 5.0
[http]
plaintext = true
[deploy]
state = "state.db"
ledger_key = "ledger.key"
allow_list = "allow.txt"
stage_timeout_s = 5.0
"""


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def make_coordinator(tmp: Path, signers: list[Signer], clock: Clock):
    from ftte.pipeline.coordinator import Coordinator
    from ftte.pipeline.deploy_config import parse_server_config
    from ftte.pipeline.deploy_task import build_task
    from ftte.pipeline.journal import Database

    (tmp / "allow.txt").write_text("".join(s.public_key.hex() + "\n" for s in signers))
    settings = parse_server_config(CONFIG, base_dir=tmp)
    task = build_task(settings)
    db = Database(settings.path("state.db"), settings.path("ledger.key"))
    db.open()
    return Coordinator(task, db, {member_id(s.public_key): s.public_key for s in signers}, clock=clock), db


def join_request(coord, base_version: int) -> JoinRequest:
    return JoinRequest(plan_id=coord.plan_id, base_version=base_version, model_hash=coord.hashes[base_version],
                       steps=2, sample_rate=0.05, noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp",
                       delta=1e-5, epsilon_max=100.0, rng_source="test", torch_version="t", opacus_version="o",
                       ftte_version="f")


def crash(coord, db) -> None:
    """What SIGKILL leaves: the write in progress completes or not (here: completes), nothing else runs."""
    for task in list(coord._tasks) + ([coord.journal._task] if coord.journal._task else []):
        task.cancel()
    db._pool.shutdown(wait=True, cancel_futures=True)


async def drive_cohort(coord, signers: list[Signer], joins: dict[int, JoinRequest]) -> CohortEnd:
    """Join every member with its request and run the five stages honestly, in process."""
    members = [member_id(s.public_key) for s in signers]
    for m in members:
        cid = (await coord.join(m, joins[m], wire.encode(joins[m]))).cohort_id
    start = await coord.poll(members[0], PollRequest(cid, 0), wait_s=5)
    clients = {m: SecAggClient(session_params(start), m, s) for m, s in zip(members, signers)}
    codec = UpdateCodec(coord.task.dim, start.clip, start.value_bits, start.ring_bits)
    rng = np.random.default_rng(2)
    make = [
        lambda m, x: clients[m].advertise(),
        lambda m, x: clients[m].share_keys(x),
        lambda m, x: clients[m].masked_input(x, codec.encode(np.zeros(codec.dim), 1.0, 0.0, rng)),
        lambda m, x: clients[m].consistency(x),
        lambda m, x: clients[m].unmask(x),
    ]
    previous = {m: None for m in members}
    for stage in range(5):
        if stage:
            previous = {m: await coord.poll(m, PollRequest(cid, stage), wait_s=5) for m in members}
        for m in members:
            await coord.submit(m, Submit(cid, wire.encode(make[stage](m, previous[m]))), 1 << 20)
    return await coord.poll(members[0], PollRequest(cid, 5), wait_s=5)


# A task as a device receives it, with the contribution terms of the security tests.
D = 64
CLIP = 2.0
RULE = WeightRule(0.5, 1.0, 0.25)


def make_task(**over) -> TaskInfo:
    base = dict(member=0, plan_json="{}", model_name="logistic", model_kwargs_json="{}", input_shape=(D,),
                num_classes=2, initial_weights=np.zeros(1, np.float32), local_steps=1, batch_size=1, lr=1.0,
                dp_enabled=1, noise_multiplier=1.0, max_grad_norm=1.0, delta=0.0, accountant="rdp", epsilon_max=0.0,
                buffer_size=10, stage_timeout_ms=1000, poll_wait_ms=1000, clip=CLIP, value_bits=12,
                staleness_exponent=RULE.staleness_exponent, variance_penalty=RULE.variance_penalty, r_min=RULE.r_min,
                max_corrupt=1)
    base.update(over)
    return TaskInfo(**base)
