"""Why the server refuses a device's request, in the protocol's own terms (no transport).

A :class:`Refused` carries a stable code and a detail and is raised before any state
changes. The HTTP layer (:mod:`ftte.pipeline.http_errors`) maps each code to a status.
"""

from __future__ import annotations


class Refused(Exception):
    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail
