"""Cryptographic primitives, fixed-point quantization and the secure-aggregation protocol.

May import only ``cryptography`` and ``numpy`` (and ``ftte``'s wire layer).
"""
