"""The fast one-step RDP curve is bit-for-bit Opacus's, and ε from the accountant still equals Opacus's."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from ftte.privacy.accountant import PrivacyStep, compute_epsilon
from ftte.privacy.rdp_curve import rdp_one_step

ORDERS = RDPAccountant.DEFAULT_ALPHAS


@pytest.mark.parametrize("q", [1e-4, 0.003, 0.02, 0.16, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("sigma", [0.0, 0.3, 0.7, 1.0, 1.7, 4.0, 16.0])
def test_curve_is_opacus_curve_bit_for_bit(q, sigma):
    want = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=ORDERS)
    got = rdp_one_step(q, sigma, ORDERS)
    assert np.array_equal(np.asarray(want), got)


@settings(max_examples=25, deadline=None)
@given(st.floats(1e-3, 0.9), st.floats(0.4, 8.0), st.integers(1, 200))
def test_random_mechanisms_match_opacus_curve_and_epsilon(q, sigma, steps):
    want = np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=ORDERS))
    assert np.array_equal(want, rdp_one_step(q, sigma, ORDERS))
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    assert compute_epsilon([PrivacyStep(sigma, q, steps)], 1e-5, "rdp") == pytest.approx(
        max(0.0, acc.get_epsilon(delta=1e-5)), rel=1e-12)
