"""Messages of the HTTP deployment (tags 40-59): what a device and ``ftte server`` exchange.

Every request body is one of these (or a secure-aggregation message inside a ``Submit``),
and every response body too, so both directions cross ``wire.decode`` with its limits.
Floats that may be "unlimited" or "unknown" travel as 0.0 or -1.0 (the codec refuses
NaN and infinity on purpose).
"""

from __future__ import annotations

import numpy as np

from ftte.wire import F32_VECTOR, F64, IDS, KEY32, U64, Message, field, message, pairs, text, var_bytes

DEPLOY_TEXT = 64 * 1024  # plan JSON and similar documents
DEPLOY_MAX_PAYLOAD = 64 * 1024 * 1024


@message(40)
class TaskRequest(Message):
    """Device to server: what does this deployment train? (sent once per device process)."""

    client: str = field(text(128))  # client software and version, for the server's logs


@message(41)
class TaskInfo(Message):
    """Server to device: the plan, the architecture and its initial weights, training and privacy settings.

    ``initial_weights`` holds every parameter of the model in ``named_parameters`` order, so a
    device that builds the architecture gets the frozen part the server uses; the trainable
    subset is refreshed by every :class:`ModelPull`. ``epsilon_max`` 0 means no server cap,
    ``delta`` 0 means each device picks 1/(10 n) itself.
    """

    member: int = field(U64)
    plan_json: str = field(text(DEPLOY_TEXT))
    model_name: str = field(text(256))
    model_kwargs_json: str = field(text(4096))
    input_shape: tuple = field(IDS)  # one record, without the batch dimension
    num_classes: int = field(U64)
    initial_weights: np.ndarray = field(F32_VECTOR)
    local_steps: int = field(U64)
    batch_size: int = field(U64)
    lr: float = field(F64)
    dp_enabled: int = field(U64)
    noise_multiplier: float = field(F64)
    max_grad_norm: float = field(F64)
    delta: float = field(F64)
    accountant: str = field(text(16))
    epsilon_max: float = field(F64)
    buffer_size: int = field(U64)
    stage_timeout_ms: int = field(U64)
    poll_wait_ms: int = field(U64)
    # What shapes every contribution, fixed for the whole task; every cohort start must repeat
    # these values exactly (a device checks it), so no cohort can weigh one member differently.
    clip: float = field(F64, default=0.0)
    value_bits: int = field(U64, default=0)
    staleness_exponent: float = field(F64, default=0.0)
    variance_penalty: float = field(F64, default=0.0)
    r_min: float = field(F64, default=0.0)
    max_corrupt: int = field(U64, default=0)
    # Target-epsilon mode (0 = off): each device derives its noise multiplier from its own sample
    # rate so that ``planned_rounds`` rounds spend at most ``target_epsilon``; never below the floor.
    target_epsilon: float = field(F64, default=0.0)
    planned_rounds: int = field(U64, default=0)
    min_noise_multiplier: float = field(F64, default=0.0)
    clipping: str = field(text(16), default="per_sample")  # DP clipping mode: "per_sample" or "ghost"
    # Feature standardisation the model expects (empty: none; records are used as given): a device
    # trains on ``(x - feature_mean) / feature_std`` over the flattened record, one value per
    # feature or one value for all. Bounded and checked on the device like every task field.
    feature_mean: np.ndarray = field(F32_VECTOR, default_factory=lambda: np.zeros(0, dtype=np.float32))
    feature_std: np.ndarray = field(F32_VECTOR, default_factory=lambda: np.zeros(0, dtype=np.float32))
    # The privacy unit: "example" (DP-SGD on the device) or "user" (distributed discrete Gaussian
    # noise inside the masked sum; DP-SGD off). In user mode every participation is charged at
    # ``user_noise_multiplier`` (rdp, q = 1, one step) against ``user_epsilon`` at ``user_delta``,
    # and the mechanism is planned for cohorts of up to ``user_members`` with noise calibrated so
    # that ``user_calibrated_for`` honest survivors carry it (protocol.cohort.user_level_params).
    unit: str = field(text(16), default="example")
    user_noise_multiplier: float = field(F64, default=0.0)
    user_epsilon: float = field(F64, default=0.0)
    user_delta: float = field(F64, default=0.0)
    user_members: int = field(U64, default=0)
    user_calibrated_for: int = field(U64, default=0)


@message(42)
class PullRequest(Message):
    """Device to server: the current weights of ``plan_id``'s subset."""

    plan_id: str = field(text(128))


@message(43)
class JoinRequest(Message):
    """Device to server after local training: put me in the open cohort of my plan.

    Carries the round's DP parameters (what the server writes into the privacy ledger);
    never the loss or the record count, which are not covered by the DP guarantee.
    """

    plan_id: str = field(text(128))
    base_version: int = field(U64)
    model_hash: bytes = field(KEY32)
    steps: int = field(U64)
    sample_rate: float = field(F64)
    noise_multiplier: float = field(F64)
    max_grad_norm: float = field(F64)
    accountant: str = field(text(16))
    delta: float = field(F64)
    epsilon_max: float = field(F64)  # 0 = unlimited
    rng_source: str = field(text(256))
    torch_version: str = field(text(64))
    opacus_version: str = field(text(64))
    ftte_version: str = field(text(64))
    round_seq: int = field(U64, default=0)  # this round's place in the device's accountant history (1-based)
    unreported: tuple = field(pairs(var_bytes(512)), default=())  # (seq, encoded SpentRound) never reported
    # The device's Ed25519 signature over its spend claim for this round (ftte.privacy.spend):
    # the ledger stores it, and the audit verifies it against the row the server wrote.
    spend_signature: bytes = field(var_bytes(64), default=b"")
    # A random id of the device's accountant state: with ``round_seq`` it names a round uniquely,
    # so a round reported twice is recorded once, and a device that lost its state is not confused
    # with one that repeats itself.
    accountant_id: bytes = field(var_bytes(16), default=b"")


@message(53)
class SpentRound(Message):
    """A round the device's accountant counted but whose join never reached the server
    (the device died or lost the server in between). Reported with the next join, so the
    ledger ends up holding every round the device's own accountant holds."""

    steps: int = field(U64)
    sample_rate: float = field(F64)
    noise_multiplier: float = field(F64)
    max_grad_norm: float = field(F64)
    delta: float = field(F64)
    # What the device signed for this round when it trained it (its claim covers these too),
    # so a late report carries the same evidence as a round reported on time.
    version: int = field(U64, default=0)
    rng_source: str = field(text(128), default="")
    signature: bytes = field(var_bytes(64), default=b"")


@message(44)
class JoinReply(Message):
    """Server to device: the cohort it waits in."""

    cohort_id: str = field(text(64))
    base_version: int = field(U64)


@message(45)
class PollRequest(Message):
    """Device to server: the server's message for ``stage`` of the cohort (long poll).

    Stages: 0 cohort start, 1 roster, 2 share delivery, 3 survivor list, 4 consistency
    bundle, 5 cohort end.
    """

    cohort_id: str = field(text(64))
    stage: int = field(U64)


@message(46)
class Pending(Message):
    """Server to device: nothing new yet; poll again."""

    cohort_id: str = field(text(64))
    stage: int = field(U64)
    retry_after_ms: int = field(U64)


@message(47)
class CohortStart(Message):
    """Server to members when a cohort closes: everything :class:`SessionParams` needs, and the weighting inputs.

    ``reference_variance`` -1 means none yet (the first cohort).
    """

    cohort_id: str = field(text(64))
    plan_id: str = field(text(128))
    model_hash: bytes = field(KEY32)
    close_version: int = field(U64)
    members: tuple = field(IDS)
    identity_keys: tuple = field(pairs(KEY32))  # (member, Ed25519 public key)
    threshold: int = field(U64)
    share_threshold: int = field(U64)
    graph: str = field(text(16))
    neighbors: int = field(U64)
    dim: int = field(U64)
    ring_bits: int = field(U64)
    value_bits: int = field(U64)
    clip: float = field(F64)
    reference_variance: float = field(F64)
    staleness_exponent: float = field(F64)
    variance_penalty: float = field(F64)
    r_min: float = field(F64)
    max_corrupt: int = field(U64, default=0)  # colluding members the threshold was chosen to tolerate
    # User-level DP (all 0 for an example-level cohort): the mechanism every member applies
    # (distributed_dp.UserDPParams over ``user_coordinates``; ``dim`` is then its padded length and
    # ``ring_bits`` its ring). Bound into the session context by contribution_binding.
    user_coordinates: int = field(U64, default=0)
    user_scale: float = field(F64, default=0.0)
    user_sigma: float = field(F64, default=0.0)
    user_calibrated_for: int = field(U64, default=0)
    user_members: int = field(U64, default=0)
    user_noise_multiplier: float = field(F64, default=0.0)


@message(48)
class CohortEnd(Message):
    """Server to a member: the cohort is over for it.

    ``status`` is ``applied`` (``applied_version`` holds the merge), ``aborted`` (nothing
    was revealed) or ``dropped`` (the member missed a stage; the cohort may go on without it).
    """

    cohort_id: str = field(text(64))
    status: str = field(text(16))
    applied_version: int = field(U64)
    included: tuple = field(IDS)
    reason: str = field(text(1024))


@message(49)
class Submit(Message):
    """Device to server: one secure-aggregation message (encoded) for a cohort."""

    cohort_id: str = field(text(64))
    payload: bytes = field(var_bytes(DEPLOY_MAX_PAYLOAD))


@message(50)
class Ack(Message):
    """Server to device: the message is stored durably and will survive a server crash."""

    cohort_id: str = field(text(64))
    stage: int = field(U64)


@message(51)
class ErrorReply(Message):
    """Server to device with every 4xx/5xx: a stable code, a human-readable detail, the server's clock."""

    code: str = field(text(64))
    detail: str = field(text(1024))
    server_time_ms: int = field(U64)


@message(52)
class LeaveRequest(Message):
    """Device to server: take me out of a cohort that has not started (I stop waiting for it)."""

    cohort_id: str = field(text(64))


@message(59)
class Advance(Message):
    """Device to server: one secure-aggregation message, and in the same reply the server's next message.

    The server runs exactly the checks of a :class:`Submit` (after the gate's authentication and
    replay checks of the request itself), stores the message durably, then answers what a
    :class:`PollRequest` for the next slot (the submitted stage + 1; after the unmask stage, the
    cohort's end) would: that stage's server message, a :class:`CohortEnd`, or :class:`Pending`
    if nothing came within the long-poll wait. Any 200 reply therefore also means "stored". One
    request per stage instead of two; the device checks the piggy-backed message exactly as a
    polled one.
    """

    cohort_id: str = field(text(64))
    payload: bytes = field(var_bytes(DEPLOY_MAX_PAYLOAD))
