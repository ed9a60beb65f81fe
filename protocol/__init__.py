"""The cohort protocol both sides speak: what a cohort start means, how a contribution is weighted and encoded.

The server (simulator or deployment) plans a cohort here and the device checks it here, so
a rule about a contribution is written once. Depends on ``ftte`` (messages, codec),
``ftte.crypto`` and ``ftte.privacy``; never on ``ftte.edge`` or ``ftte.pipeline``.
"""
