"""One deployment cohort from its first join to its commit: the coordinator's per-cohort state.

``stage`` is ``None`` while the cohort forms, then the :class:`~ftte.crypto.stages.Stage`
whose member messages it collects, and :data:`FINISHING` once the last stage has closed
and the sum is being unmasked and merged. ``published`` is the highest long-poll slot
whose server message is durable and may be shown to members.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ftte.crypto.secagg_server import SecAggServer
from ftte.crypto.stages import Stage, input_for
from ftte.deploy_messages import CohortEnd, CohortStart, JoinRequest
from ftte.protocol.encoding import UpdateCodec
from ftte.protocol.user_encoding import UserCodec
from ftte.secagg_messages import ConsistencyBundle, Roster, ShareDelivery, SurvivorList

FINISHING = "finishing"


@dataclass
class LiveCohort:
    cohort_id: str
    opened_at: float
    joins: dict[int, JoinRequest] = field(default_factory=dict)
    join_bytes: dict[int, bytes] = field(default_factory=dict)
    superseded: dict[int, list[JoinRequest]] = field(default_factory=dict)  # earlier joins a member replaced
    start: CohortStart | None = None
    codec: UpdateCodec | UserCodec | None = None  # UserCodec for a user-level cohort
    server: SecAggServer | None = None
    stage: Stage | str | None = None  # None forming; a Stage; FINISHING
    stage_opened_at: float = 0.0
    published: int = -1  # highest poll slot whose server message is durable and visible
    got: dict[Stage, set[int]] = field(default_factory=lambda: {s: set() for s in Stage})
    accepted: dict[tuple[int, int], bytes] = field(default_factory=dict)
    durable: dict[tuple[int, int], asyncio.Future] = field(default_factory=dict)
    roster: Roster | None = None
    deliveries: dict[int, ShareDelivery] = field(default_factory=dict)
    survivors: SurvivorList | None = None
    bundle: ConsistencyBundle | None = None
    aborted: str = ""
    end: CohortEnd | None = None
    changed: asyncio.Event | None = None

    def add_join(self, member: int, req: JoinRequest, raw: bytes) -> None:
        """A member's join; an earlier join it replaces is kept, since its round was spent too."""
        old = self.joins.get(member)
        if old is not None and self.join_bytes.get(member) != raw:
            self.superseded.setdefault(member, []).append(old)
        self.joins[member] = req
        self.join_bytes[member] = raw

    @property
    def collecting(self) -> Stage | None:
        """The stage whose member messages are being collected, if any."""
        return self.stage if isinstance(self.stage, Stage) else None

    def notify(self) -> None:
        old, self.changed = self.changed, asyncio.Event()
        if old is not None:
            old.set()

    def event(self) -> asyncio.Event:
        if self.changed is None:
            self.changed = asyncio.Event()
        return self.changed

    def expected(self) -> set[int]:
        """Members whose message the open stage still waits for: those that answered the stage before."""
        stage = self.collecting
        if stage is None:
            return set()
        if stage is Stage.ADVERTISE:
            return set(self.joins)
        return set(self.got[Stage(stage - 1)])

    def stage_name(self) -> str:
        if self.aborted:
            return "aborting"
        if self.stage is None:
            return "forming"
        return self.stage.label if isinstance(self.stage, Stage) else FINISHING

    def published_input(self, stage: Stage):
        """What closing the stage before ``stage`` published (the input members need for ``stage``)."""
        return {Stage.SHARE: self.roster, Stage.UPLOAD: self.deliveries, Stage.CONSISTENCY: self.survivors,
                Stage.UNMASK: self.bundle}.get(stage)

    def input_for(self, stage: Stage, member: int):
        return input_for(stage, member, self.published_input(stage))

    def dropped_stages(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for m in self.joins:
            for s in Stage:
                if m not in self.got[s]:
                    out[m] = s.label
                    break
        return out
