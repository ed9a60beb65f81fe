"""Messages of one training round that every mode carries (tags 20-39): the pull and the plain update.

The simulator encodes them to count real bytes; the HTTP deployment sends them.
"""

from __future__ import annotations

import numpy as np

from ftte.wire import F32_VECTOR, F64, KEY32, U64, Message, field, message, text


@message(20)
class ModelPull(Message):
    """Server to device: the weights a device trains from (only the plan's subset when it holds the rest)."""

    version: int = field(U64)
    plan_id: str = field(text(128))
    model_hash: bytes = field(KEY32)
    weights: np.ndarray = field(F32_VECTOR)


@message(21)
class PlainUpdate(Message):
    """Device to server when secure aggregation is off: the weighted update in float32, then w and σ²."""

    member: int = field(U64)
    version: int = field(U64)
    vector: np.ndarray = field(F32_VECTOR)
    weight: float = field(F64)
    variance: float = field(F64)
