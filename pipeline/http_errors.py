"""The HTTP status of every refusal code: the only place where protocol refusals meet HTTP.

Kept free of the web framework so tests and the edge-facing docs can read it without
Starlette. 403: the device is not who the request needs; 404: no such cohort; 409: the
request conflicts with the server's state (retrying the same request cannot help, a
fresh round can); 422: the request is malformed or violates the task's rules.
"""

from __future__ import annotations

from ftte.pipeline.refusal import Refused

STATUS_OF_CODE: dict[str, int] = {
    "member_mismatch": 403,
    "not_a_member": 403,
    "unknown_cohort": 404,
    "busy": 409,
    "cohort_over": 409,
    "duplicate": 409,
    "model_mismatch": 409,
    "not_expected": 409,
    "not_started": 409,
    "stage_closed": 409,
    "started": 409,
    "too_stale": 409,
    "wrong_plan": 409,
    "wrong_session": 409,
    "bad_message_signature": 422,
    "bad_shape": 422,
    "bad_stage": 422,
    "dp_mismatch": 422,
    "future_version": 422,
    "malformed": 422,
    "policy": 422,
}


def http_status(refused: Refused) -> int:
    """The status a refusal is answered with; an unmapped code is a server bug (500)."""
    return STATUS_OF_CODE.get(refused.code, 500)
