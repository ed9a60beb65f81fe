"""One record of a spent round, one list of round outcomes, one ledger-row builder.

Every driver (the simulator, the HTTP coordinator, a lost Ray worker, a late report from a
device) writes its ledger rows through :func:`ledger_rows` (or :func:`ledger_row` when it has
the ε figures already), so a row means the same thing whoever wrote it:

* ``epsilon_total`` is the device's cumulative ε *after this row*, recomputed with the row's
  accountant at the row's δ from the device's **full history as recorded in this ledger**
  (every earlier row of the device, in ledger order, plus this one). That is exactly what
  ``ftte audit`` recomputes, and when every round a device spent is in the ledger it is also
  what the device's own accountant says.
* ``epsilon_round`` is ``epsilon_total`` minus the device's previous row's ``epsilon_total``
  (0 before its first row): the marginal cost under composition, not a per-round ε.

Why an outcome column: a round's privacy cost is paid when the device computes its update,
whatever happens to it next. The ledger must hold every spent round exactly once, and say
what became of it (:class:`RoundOutcome`).

Device evidence: a device signs :func:`spend_claim_bytes` — its round parameters and the ε
its own accountant reports after the round — with its Ed25519 identity key. The server
stores the signature in the row; the audit rebuilds the claim from the row and verifies it,
so the operator cannot alter a signed row's parameters or ε, even by re-signing the ledger.
Because the claimed ε is cumulative, a row of the device that the server dropped earlier
also makes every later signed row of that device fail.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, Iterable, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .accountant import NON_PRIVATE_ACCOUNTANT, PrivacyStep, compute_epsilon
from .ledger import LedgerRow, library_versions, verify_signature

if TYPE_CHECKING:
    import sqlite3

    from .accountant import AccountantStore
    from .ledger import Ledger

CLAIM_DOMAIN = b"ftte.privacy.spend-claim/1\x00"


class RoundOutcome(str, Enum):
    """What became of a round whose privacy cost was paid (every value is a *spent* round).

    - ``MERGED``: its update was part of a cohort whose aggregate was applied.
    - ``ABORTED``: it joined a cohort that was aborted; the update may have been seen by
      the server (masked or not), so it is spent.
    - ``UNMERGED``: trained, possibly released, never aggregated: the run stopped with the
      round in flight, or the device reported it late (it died or was replaced before its
      update was used). Replaces the ``"unmerged"`` cohort id, the coordinator's
      ``UNMERGED`` and the edge's ``SpentRound``/``reported.json`` notion of "spent, not merged".
    - ``LOST``: the worker/process training it died before any update left it. Spent
      because it was charged before training started.
    """

    MERGED = "merged"
    ABORTED = "aborted"
    UNMERGED = "unmerged"
    LOST = "lost"


@dataclass(frozen=True)
class SpendRecord:
    """One device's spend in one round: everything a ledger row says except where the
    round ended up (outcome, cohort) and the ε figures, which depend on the ledger."""

    device_id: str
    plan_id: str
    version: int
    step: PrivacyStep
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon_max: float
    rng_source: str
    torch_version: str = field(default_factory=lambda: library_versions()["torch"])
    opacus_version: str = field(default_factory=lambda: library_versions()["opacus"])
    ftte_version: str = field(default_factory=lambda: library_versions()["ftte"])
    device_public_key: str | None = None  # hex, Ed25519
    device_signature: str | None = None  # hex, over spend_claim_bytes(claim_for(...))

    def __post_init__(self) -> None:
        if not self.device_id:
            raise ValueError("device_id must not be empty")
        if (self.device_public_key is None) != (self.device_signature is None):
            raise ValueError("device_public_key and device_signature go together")


@dataclass(frozen=True)
class SpendClaim:
    """What a device signs about one of its rounds (all of it is in the ledger row)."""

    device_id: str
    plan_id: str
    version: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon_max: float
    rng_source: str
    epsilon_total: float  # the device's own cumulative ε after the round

    def __post_init__(self) -> None:
        for name in ("device_id", "plan_id", "accountant", "rng_source"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str")
        for name in ("version", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value:
                raise TypeError(f"{name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("noise_multiplier", "sample_rate", "max_grad_norm", "delta", "epsilon_max", "epsilon_total"):
            value = float(getattr(self, name))
            if math.isnan(value):
                raise ValueError(f"{name} must not be NaN")
            object.__setattr__(self, name, value)

    @classmethod
    def for_spend(cls, spend: SpendRecord, epsilon_total: float) -> "SpendClaim":
        return cls(spend.device_id, spend.plan_id, spend.version, spend.step.noise_multiplier,
                   spend.step.sample_rate, spend.step.steps, spend.max_grad_norm, spend.delta, spend.accountant,
                   spend.epsilon_max, spend.rng_source, epsilon_total)

    @classmethod
    def for_row(cls, row: LedgerRow) -> "SpendClaim":
        return cls(row.device_id, row.plan_id, row.version, row.noise_multiplier, row.sample_rate, row.steps,
                   row.max_grad_norm, row.delta, row.accountant, row.epsilon_max, row.rng_source, row.epsilon_total)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def spend_claim_bytes(claim: SpendClaim) -> bytes:
    """The exact bytes a device signs: a domain tag, then sorted-key compact JSON of the claim.

    Floats use Python's shortest round-trip repr, so a value stored as an IEEE double in
    SQLite re-encodes to the same bytes (``inf`` is written as ``Infinity``).
    """
    body = json.dumps(claim.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return CLAIM_DOMAIN + body.encode("ascii")


class ClaimSigner(Protocol):
    """An Ed25519 identity as the edge holds it (``ftte.crypto.primitives.Signer`` fits)."""

    public_key: bytes

    def sign(self, data: bytes) -> bytes: ...


def sign_spend(spend: SpendRecord, epsilon_total: float,
               signer: Ed25519PrivateKey | ClaimSigner) -> tuple[SpendRecord, SpendClaim]:
    """Sign the claim "this round, at these parameters, brought me to ``epsilon_total``".

    Returns the record carrying the signature (to send to the server) and the claim (to
    keep in the device's own record, :mod:`.device_record`).
    """
    if isinstance(signer, Ed25519PrivateKey):
        pub = signer.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        sign = signer.sign
    else:
        pub, sign = bytes(signer.public_key), signer.sign
    claim = SpendClaim.for_spend(spend, epsilon_total)
    signature = sign(spend_claim_bytes(claim))
    return replace(spend, device_public_key=pub.hex(), device_signature=signature.hex()), claim


def verify_claim(claim: SpendClaim, public_key_hex: str, signature_hex: str) -> bool:
    return verify_signature(public_key_hex, spend_claim_bytes(claim), signature_hex)


def row_device_signature_ok(row: LedgerRow) -> bool | None:
    """None for an unsigned row, else whether the device's signature verifies on the row."""
    if row.device_public_key is None and row.device_signature is None:
        return None
    if row.device_public_key is None or row.device_signature is None:
        return False
    return verify_claim(SpendClaim.for_row(row), row.device_public_key, row.device_signature)


# -- the one row builder ----------------------------------------------------------------------

def ledger_row(
    spend: SpendRecord,
    *,
    outcome: RoundOutcome,
    cohort_id: str | None,
    epsilon_before: float,
    epsilon_after: float,
    timestamp: str | None = None,
) -> LedgerRow:
    """The ledger row of ``spend``. ``epsilon_after`` must be the device's cumulative ε after
    this row in the module's one meaning (see the module docstring) and ``epsilon_before`` the
    device's previous row's figure; :func:`ledger_rows` computes both from the ledger.

    ``cohort_id`` is the cohort a MERGED or ABORTED round belonged to (None for a device
    training alone); for UNMERGED and LOST rounds it may be None, and the row then carries the
    outcome's value as its cohort id (the label older ledgers and tools read).
    """
    outcome = RoundOutcome(outcome)
    if cohort_id is None and outcome in (RoundOutcome.UNMERGED, RoundOutcome.LOST):
        cohort_id = outcome.value
    if math.isfinite(epsilon_after):
        eps_round = epsilon_after - epsilon_before
    else:
        eps_round = math.inf
    extra = {} if timestamp is None else {"timestamp": timestamp}
    return LedgerRow(
        device_id=spend.device_id, plan_id=spend.plan_id, version=spend.version,
        sample_rate=spend.step.sample_rate, steps=spend.step.steps, noise_multiplier=spend.step.noise_multiplier,
        max_grad_norm=spend.max_grad_norm, accountant=spend.accountant, rng_source=spend.rng_source,
        epsilon_round=eps_round, epsilon_total=epsilon_after, delta=spend.delta, epsilon_max=spend.epsilon_max,
        cohort_id=cohort_id, torch_version=spend.torch_version, opacus_version=spend.opacus_version,
        ftte_version=spend.ftte_version, outcome=outcome.value, device_public_key=spend.device_public_key,
        device_signature=spend.device_signature, **extra,
    )


def _mechanism(accountant: str) -> str:
    # A non-private history has ε = inf whichever accountant is named; any valid one will do.
    return accountant if accountant != NON_PRIVATE_ACCOUNTANT else "prv"


@dataclass(frozen=True)
class _Prior:
    step: PrivacyStep
    delta: float
    accountant: str


def ledger_rows(
    ledger: "Ledger",
    spends: Iterable[tuple[SpendRecord, RoundOutcome, str | None]],
    *,
    conn: "sqlite3.Connection | None" = None,
) -> list[LedgerRow]:
    """Rows for ``(spend, outcome, cohort_id)`` triples, to be appended to ``ledger`` in this
    order, with ε recomputed from each device's history in the ledger (read through
    ``ledger.rows_for``, inside ``conn``'s transaction if given) plus the earlier triples."""
    out: list[LedgerRow] = []
    pending: dict[str, list[_Prior]] = {}
    for spend, outcome, cohort_id in spends:
        dev = spend.device_id
        if dev not in pending:
            pending[dev] = [_Prior(PrivacyStep(e.row.noise_multiplier, e.row.sample_rate, e.row.steps),
                                   e.row.delta, e.row.accountant) for e in ledger.rows_for(dev, conn=conn)]
        prior = pending[dev]
        steps = [p.step for p in prior]
        before = compute_epsilon(steps, prior[-1].delta, _mechanism(prior[-1].accountant)) if prior else 0.0
        after = compute_epsilon(steps + [spend.step], spend.delta, _mechanism(spend.accountant))
        out.append(ledger_row(spend, outcome=outcome, cohort_id=cohort_id, epsilon_before=before,
                              epsilon_after=after))
        prior.append(_Prior(spend.step, spend.delta, spend.accountant))
    return out



def unrecorded_spends(
    ledger: "Ledger",
    store: "AccountantStore",
    *,
    plan_id: str,
    version: int,
    max_grad_norm: float,
    epsilon_max: float,
    rng_source: str,
) -> list[SpendRecord]:
    """Rounds a device's accountant store charged beyond the device's rows in the ledger.

    A round is charged before it trains, but its row is written when its cohort ends; a run
    that stops (or crashes) in between leaves spent rounds without rows. This returns them,
    oldest first, for a driver to write as UNMERGED with :func:`ledger_rows`. ``version``,
    ``plan_id``, the clipping norm and ``epsilon_max`` are not in the store: the caller states
    them (the latest applied version is the honest answer when the true one is unknown).
    Assumes, as the drivers guarantee, that the ledger holds a prefix of each device's
    charged rounds.
    """
    out: list[SpendRecord] = []
    for device in store.devices():
        state = store.state(device)
        if state is None:
            continue
        written = len(ledger.rows_for(device))
        for step in state.history[written:]:
            out.append(SpendRecord(device_id=device, plan_id=plan_id, version=version, step=step,
                                   max_grad_norm=max_grad_norm, delta=state.delta, accountant=state.accountant,
                                   epsilon_max=epsilon_max, rng_source=rng_source))
    return out
