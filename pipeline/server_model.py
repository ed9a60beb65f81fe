"""The server's model: one object that every driver (simulator, HTTP coordinator) asks to apply a cohort.

It holds what the server knows between cohorts — the version, the plan's weights, the
server optimizer's state, the reference variance it announces to the next cohort and the
hashes of recent versions — and :meth:`ServerModel.apply` is the only place where a
cohort's decoded sum becomes a new version. It returns typed records (the cohort record,
the history row) that the driver commits; it never does I/O, so the simulator and the
deployment merge by the same rule and write the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ftte.pipeline.merge import ServerOptimizer, weighted_mean
from ftte.deploy_messages import CohortStart
from ftte.protocol.cohort import impossible_sum, model_hash
from ftte.protocol.encoding import EXTRA_COORDINATES


@dataclass(frozen=True)
class CohortSum:
    """What unmasking revealed, decoded: ``Σ w·Δ``, ``Σ w`` and ``Σ σ²`` over ``included``."""

    included: tuple[int, ...]
    weighted_sum: np.ndarray
    weight_sum: float
    variance_sum: float


@dataclass(frozen=True)
class CohortResult:
    """How one cohort ended, as either driver observed it; ``total`` is None when it aborted."""

    cohort_id: str
    close_version: int
    members: tuple[int, ...]
    dropped: Mapping[int, str]  # member -> stage label at which it vanished
    staleness: Mapping[int, int]  # member -> close version minus the version it trained from
    duration_s: float
    total: CohortSum | None
    aborted: str = ""
    start: CohortStart | None = None  # what the members were told; bounds what their sum can be


@dataclass(frozen=True)
class CohortRecord:
    """The durable record of a cohort (``server_cohorts``), applied or not."""

    cohort_id: str
    close_version: int
    members: tuple[int, ...]
    included: tuple[int, ...]
    dropped: Mapping[int, str]
    weight_sum: float
    duration_s: float
    aborted: str
    applied_version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "cohort_id": self.cohort_id,
            "close_version": self.close_version,
            "members": list(self.members),
            "included": list(self.included),
            "dropped": {str(m): s for m, s in self.dropped.items()},
            "weight_sum": self.weight_sum,
            "duration_s": self.duration_s,
            "aborted": self.aborted,
        }
        if self.applied_version is not None:
            out["applied_version"] = self.applied_version
        return out


@dataclass(frozen=True)
class HistoryRow:
    """One applied version. ``time_key`` names the clock: ``virtual_time_s`` in a simulation,
    ``elapsed_s`` (wall seconds since the server first started) in a deployment."""

    version: int
    time_s: float
    cohort_size: int
    mean_staleness: float
    mean_weight: float
    dropped: int
    accuracy: float | None = None
    loss: float | None = None
    time_key: str = "virtual_time_s"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, self.time_key: round(self.time_s, 6)}
        if self.accuracy is not None:
            out.update(accuracy=self.accuracy, loss=self.loss)
        out.update(cohort_size=self.cohort_size, mean_staleness=self.mean_staleness, mean_weight=self.mean_weight,
                   dropped=self.dropped)
        return out


@dataclass(frozen=True)
class ModelState:
    """The server's model after a merge, before it is adopted (a driver may first make it durable)."""

    version: int
    weights: np.ndarray
    velocity: np.ndarray | None
    reference_variance: float | None
    model_hash: bytes


@dataclass(frozen=True)
class Applied:
    """What the server core decided about a cohort: the record to commit, and the new version if one was made."""

    record: CohortRecord
    history: HistoryRow | None
    state: ModelState | None = None

    @property
    def applied(self) -> bool:
        return self.state is not None


Evaluator = Callable[[np.ndarray], tuple[float, float]]


def bounded_merge(mean: np.ndarray, reference: float, start: CohortStart) -> tuple[np.ndarray, float]:
    """The merged step and the next reference variance, held to what clipped updates allow.

    A convex combination of updates clipped to ``clip`` has norm at most ``clip``, and the
    coordinate variance of a clipped update is at most ``clip²/d``: beyond those, only
    quantisation slack or a lying member can take them. Holding both here means a member
    inside :func:`impossible_sum`'s slack still moves the model at most one clip norm, and
    can never announce a reference that honest devices refuse (which would stop training).
    """
    norm = float(np.linalg.norm(mean))
    if norm > start.clip:
        mean = mean * (start.clip / norm)
    coordinates = start.dim - EXTRA_COORDINATES
    return mean, float(min(max(reference, 0.0), start.clip**2 / coordinates))


@dataclass
class ServerModel:
    """Version, weights (float64, the plan's coordinates), optimizer state, reference variance, hashes."""

    plan_id: str
    weights: np.ndarray
    optimizer: ServerOptimizer
    version: int = 0
    reference_variance: float | None = None
    keep_hashes: int = 64  # versions whose hash a join may still cite
    hashes: dict[int, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.weights = np.asarray(self.weights, dtype=np.float64)
        self.hashes.setdefault(self.version, self._hash(self.weights))

    def _hash(self, weights: np.ndarray) -> bytes:
        return model_hash(self.plan_id, weights.astype(np.float32))

    @property
    def current_hash(self) -> bytes:
        return self.hashes[self.version]

    def remember(self, version: int, weights: np.ndarray) -> None:
        """Record the hash of an older version (after a restart) so joins that trained from it are recognised."""
        self.hashes[version] = self._hash(np.asarray(weights, dtype=np.float64))

    def restore(self, *, version: int, weights: np.ndarray, velocity: np.ndarray | None,
                reference_variance: float | None) -> None:
        self.version, self.weights = version, np.asarray(weights, dtype=np.float64)
        self.optimizer.load_state(velocity)
        self.reference_variance = reference_variance
        self.hashes[version] = self._hash(self.weights)

    def propose(self, result: CohortResult, *, now: float, evaluate: Evaluator | None = None,
                time_key: str = "virtual_time_s") -> Applied:
        """Decide what a cohort does to the model, without changing it (see :meth:`adopt`).

        A sum whose weights do not add up to a positive number, that is not finite, or that
        honest members of the cohort could not have produced (:func:`impossible_sum`: the
        TFF "zeroing" idea, with limits derived from the cohort's own terms) is never merged:
        the cohort is recorded as aborted with the reason.
        """
        total = result.total
        record = dict(cohort_id=result.cohort_id, close_version=result.close_version, members=result.members,
                      dropped=dict(result.dropped), duration_s=result.duration_s)
        reason = result.aborted
        if total is not None and not reason and not (total.weight_sum > 0 and np.all(np.isfinite(total.weighted_sum))):
            reason = "the cohort's weights summed to zero" if not total.weight_sum > 0 else "the decoded sum is not finite"
        if total is not None and not reason and result.start is not None:
            reason = impossible_sum(result.start, dict(result.staleness), total.included, total.weighted_sum,
                                    total.weight_sum, total.variance_sum)
        if total is None or reason:
            return Applied(CohortRecord(included=(), weight_sum=0.0 if total is None else total.weight_sum,
                                        aborted=reason, **record), None)
        opt = ServerOptimizer(self.optimizer.lr, self.optimizer.momentum)
        velocity = self.optimizer.state()
        opt.load_state(None if velocity is None else velocity.copy())
        mean = weighted_mean(total.weighted_sum, total.weight_sum)
        reference = total.variance_sum / len(total.included)
        if result.start is not None:
            mean, reference = bounded_merge(mean, reference, result.start)
        weights = opt.step(self.weights, mean)
        version = self.version + 1
        n = len(total.included)
        state = ModelState(version, weights, opt.state(), reference, self._hash(weights))
        acc = loss = None
        if evaluate is not None:
            acc, loss = evaluate(weights)
        stal = [result.staleness[m] for m in total.included]
        history = HistoryRow(version, now, n, float(np.mean(stal)) if stal else 0.0, total.weight_sum / n,
                             len(result.dropped), acc, loss, time_key)
        return Applied(CohortRecord(included=total.included, weight_sum=total.weight_sum, aborted="",
                                    applied_version=version, **record), history, state)

    def adopt(self, applied: Applied) -> None:
        """Make a proposed merge the current model (a no-op for a cohort that was not merged)."""
        st = applied.state
        if st is None:
            return
        if st.version != self.version + 1:
            raise ValueError(f"merge for version {st.version} proposed at version {self.version}")
        self.version, self.weights, self.reference_variance = st.version, st.weights, st.reference_variance
        self.optimizer.load_state(st.velocity)
        self.hashes[st.version] = st.model_hash
        self.hashes.pop(st.version - self.keep_hashes - 1, None)

    def apply(self, result: CohortResult, *, now: float, evaluate: Evaluator | None = None,
              time_key: str = "virtual_time_s") -> Applied:
        """:meth:`propose` then :meth:`adopt`: for drivers that commit after changing the model (the simulator)."""
        applied = self.propose(result, now=now, evaluate=evaluate, time_key=time_key)
        self.adopt(applied)
        return applied
