"""The five stages of a secure-aggregation session, defined once for every driver.

A stage is what a member sends (its message type) after receiving what the server
published when the previous stage closed (the stage's *input*, none for the first). The
simulator's in-process runner, the HTTP coordinator, the edge client and the load
benchmark all walk this one enum, so a stage's name, its message and the message that
precedes it cannot disagree between modes.

``poll`` numbers are the HTTP deployment's long-poll slots: slot ``s`` carries the input
of stage ``s`` (slot 0 the cohort start, which precedes advertising) and slot
:data:`POLL_END` the cohort's end.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Mapping

from ftte.secagg_messages import (
    AdvertiseKeys,
    ConsistencyBundle,
    ConsistencySignature,
    MaskedInput,
    Roster,
    ShareDelivery,
    ShareKeys,
    SurvivorList,
    UnmaskShares,
)


class Stage(IntEnum):
    ADVERTISE = 0
    SHARE = 1
    UPLOAD = 2
    CONSISTENCY = 3
    UNMASK = 4

    @property
    def label(self) -> str:
        """The stage's name in configs, journals, dropout tables and records."""
        return self.name.lower()

    @property
    def member_message(self) -> type:
        return _MEMBER_MESSAGE[self]

    @property
    def server_input(self) -> type | None:
        """What a member must have received before it can send this stage's message."""
        return _SERVER_INPUT[self]

    @classmethod
    def of_message(cls, msg: object) -> "Stage | None":
        return _STAGE_OF_MESSAGE.get(type(msg))

    @classmethod
    def from_label(cls, label: str) -> "Stage":
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(f"unknown stage {label!r}; stages are {STAGE_LABELS}") from None


_MEMBER_MESSAGE = {
    Stage.ADVERTISE: AdvertiseKeys,
    Stage.SHARE: ShareKeys,
    Stage.UPLOAD: MaskedInput,
    Stage.CONSISTENCY: ConsistencySignature,
    Stage.UNMASK: UnmaskShares,
}
_SERVER_INPUT: dict[Stage, type | None] = {
    Stage.ADVERTISE: None,
    Stage.SHARE: Roster,
    Stage.UPLOAD: ShareDelivery,
    Stage.CONSISTENCY: SurvivorList,
    Stage.UNMASK: ConsistencyBundle,
}
_STAGE_OF_MESSAGE = {cls: stage for stage, cls in _MEMBER_MESSAGE.items()}

#: Stage labels in protocol order.
STAGE_LABELS: tuple[str, ...] = tuple(s.label for s in Stage)
#: The long-poll slot of a cohort's end (after the last stage's input).
POLL_END = len(Stage)


def close_stage(server: Any, stage: Stage) -> Any:
    """Close ``stage`` on a :class:`~ftte.crypto.secagg_server.SecAggServer`; returns what it publishes
    (the roster, the per-member deliveries, the survivor list, the consistency bundle; for the last
    stage, nothing: unmasking is :meth:`finish`, which a server may run off its event loop)."""
    if stage is Stage.ADVERTISE:
        return server.close_advertise()
    if stage is Stage.SHARE:
        return server.close_share()
    if stage is Stage.UPLOAD:
        return server.close_upload()
    if stage is Stage.CONSISTENCY:
        return server.close_consistency()
    return None


def input_for(stage: Stage, member: int, published: Any) -> Any:
    """The published input of ``stage`` addressed to ``member``, or None if the member is no longer in it.

    ``published`` is what closing the previous stage returned (for the upload stage, the
    mapping of deliveries by member). A member missing from the roster, without a delivery,
    off the survivor list or absent from the consistency bundle was dropped by the server.
    """
    if stage is Stage.ADVERTISE:
        return None
    if stage is Stage.SHARE:
        return published if any(m == member for m, _ in published.adverts) else None
    if stage is Stage.UPLOAD:
        assert isinstance(published, Mapping)
        return published.get(member)
    if stage is Stage.CONSISTENCY:
        return published if member in published.survivors else None
    return published if any(m == member for m, _ in published.signatures) else None
