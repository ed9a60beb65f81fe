"""One member's side of a secure-aggregation session, a stage at a time, whatever carries the messages.

The in-process runner (:mod:`ftte.crypto.secagg_local`), the edge client and the HTTP load
benchmark each keep only their transport: they hand this driver the server's input for a
stage and send back what it returns. The member's input vector is asked for only when the
upload stage comes, so a device can weigh and encode its update once it knows the cohort.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ftte.crypto.primitives import Signer
from ftte.crypto.secagg_client import SecAggClient
from ftte.crypto.secagg_session import ReplayError, SessionParams
from ftte.crypto.stages import Stage


class MemberSession:
    def __init__(self, params: SessionParams, member: int, identity: Signer,
                 input_vector: Callable[[], np.ndarray]) -> None:
        self.client = SecAggClient(params, member, identity)
        self.member = member
        self._input_vector = input_vector

    def reply(self, stage: Stage, server_input: object | None) -> object:
        """This member's message for ``stage`` given the server's input to it (checked for its type)."""
        want = stage.server_input
        if want is None:
            if server_input is not None:
                raise ReplayError(f"stage {stage.label} takes no server message")
            return self.client.advertise()
        if not isinstance(server_input, want):
            raise ReplayError(f"stage {stage.label} needs a {want.__name__}, got {type(server_input).__name__}")
        if stage is Stage.SHARE:
            return self.client.share_keys(server_input)  # type: ignore[arg-type]
        if stage is Stage.UPLOAD:
            return self.client.masked_input(server_input, self._input_vector())  # type: ignore[arg-type]
        if stage is Stage.CONSISTENCY:
            return self.client.consistency(server_input)  # type: ignore[arg-type]
        return self.client.unmask(server_input)  # type: ignore[arg-type]
