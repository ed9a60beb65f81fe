"""Which joins the deployment admits: the model they trained, their DP parameters, their late rounds.

Pure checks on a :class:`~ftte.deploy_messages.JoinRequest` against the server's model
and the task's configuration; each refusal is a :class:`~ftte.pipeline.refusal.Refused`
raised before anything is stored.
"""

from __future__ import annotations

import hmac

from ftte import wire
from ftte.deploy_messages import JoinRequest, SpentRound
from ftte.pipeline.config import Config
from ftte.pipeline.refusal import Refused
from ftte.pipeline.server_model import ServerModel

MAX_UNREPORTED = 500  # late-reported rounds accepted in one join (about 35 KB, under the body limit)


def check_plan(plan_id: str, wanted: str) -> None:
    if wanted != plan_id:
        raise Refused("wrong_plan", f"this server trains {plan_id}, not {wanted}")


def check_join(req: JoinRequest, model: ServerModel, cfg: Config, max_staleness: int) -> None:
    """Refuse a join that did not train the server's current plan from a recent version, or broke the DP task."""
    check_plan(model.plan_id, req.plan_id)
    if req.base_version > model.version:
        raise Refused("future_version", f"version {req.base_version} does not exist yet")
    if model.version - req.base_version > max_staleness:
        raise Refused("too_stale", f"trained from version {req.base_version}, now {model.version}")
    known = model.hashes.get(req.base_version)
    if known is None or not hmac.compare_digest(known, req.model_hash):
        raise Refused("model_mismatch", f"model hash does not match version {req.base_version}")
    p = cfg.privacy
    if not p.enabled or p.user_level:  # user-level terms: the coordinator's policy and mechanism checks
        return
    if req.accountant != p.accountant:
        raise Refused("dp_mismatch", f"accountant must be {p.accountant!r}")
    floor = p.min_noise_multiplier if p.target_epsilon else p.noise_multiplier  # target mode: derived per device
    if req.noise_multiplier + 1e-12 < floor or req.max_grad_norm > p.max_grad_norm + 1e-12:
        raise Refused("dp_mismatch", "noise multiplier or clipping norm differ from the task")
    if req.steps != cfg.train.local_steps or not 0.0 < req.sample_rate <= 1.0:
        raise Refused("dp_mismatch", "steps or sample rate outside the task")
    if not 0.0 < req.delta < 1.0 or req.epsilon_max < 0.0:
        raise Refused("dp_mismatch", "delta must lie in (0, 1) and epsilon_max >= 0")
    spent_rounds(req)  # validates the late-reported rounds


def spent_rounds(req: JoinRequest) -> list[tuple[int, SpentRound]]:
    """The rounds a join reports late, decoded and range-checked, in the device's order."""
    if len(req.unreported) > MAX_UNREPORTED:
        raise Refused("malformed", f"more than {MAX_UNREPORTED} late rounds in one join")
    out: list[tuple[int, SpentRound]] = []
    for seq, blob in req.unreported:
        try:
            r = wire.decode(blob, expect=SpentRound, max_bytes=512)
        except wire.WireError as exc:
            raise Refused("malformed", f"late round {seq}: {exc}") from None
        if not (1 <= seq < req.round_seq and r.steps >= 1 and 0.0 < r.sample_rate <= 1.0
                and r.noise_multiplier > 0.0 and r.max_grad_norm > 0.0 and 0.0 < r.delta < 1.0):
            raise Refused("dp_mismatch", f"late round {seq} is out of range")
        out.append((seq, r))
    if len({seq for seq, _ in out}) != len(out):
        raise Refused("malformed", "a late round is reported twice")
    return sorted(out, key=lambda x: x[0])
