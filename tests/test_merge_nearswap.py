"""nearswap against the NumPy float64 formula of mergekit 0.1.5 (the registry's reference), and its
edge cases: t = 0 (the base), a t beyond every distance (the other model), equal entries, negative
t, the 1e-6 floor, one model only."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_merge_registry import np_nearswap
from unmerge_jax.errors import UnmergeError
from unmerge_jax.merge.tensor import merge_tensors


def _pair(seed=0, shape=(19, 13)):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=shape).astype(np.float32)
    b = (a + 0.01 * rng.normal(size=shape) * (rng.random(shape) < 0.7)).astype(np.float32)
    return a, b


def _ns(a, b, t):
    return np.asarray(merge_tensors("nearswap", a, [b], deltas=False, t=t))


@pytest.mark.parametrize("t", [1e-4, 3e-3, 0.01, 0.05])
def test_nearswap_equals_reference(t):
    a, b = _pair()
    got = _ns(a, b, t)
    np.testing.assert_allclose(got, np_nearswap(t, a, b), rtol=2e-6, atol=2e-6)
    near = np.abs(a - b) <= t
    np.testing.assert_array_equal(got[near], b[near])          # within t: the other model's value
    far = ~near
    np.testing.assert_allclose(np.abs(got - a)[far], t, rtol=0, atol=3e-7)   # beyond: a step of t (float32 of |a| ~ 1)


def test_nearswap_t_zero_is_the_base_and_a_large_t_the_other_model():
    a, b = _pair()
    np.testing.assert_array_equal(_ns(a, b, 0.0), a)
    np.testing.assert_array_equal(_ns(a, b, 10.0), b)
    np.testing.assert_array_equal(_ns(a, b, -1.0), a)            # w clipped at 0


def test_nearswap_floors_the_distance_at_1e_6():
    """|a − b| = 5e-7 counts as 1e-6: t = 2e-7 moves a by 0.2·(b − a), not 0.4·(b − a)."""
    a = np.linspace(1e-3, 2e-3, 12, dtype=np.float32)
    b = (a + np.float32(5e-7)).astype(np.float32)
    got = _ns(a, b, 2e-7)
    np.testing.assert_allclose(got, np_nearswap(2e-7, a, b), rtol=0, atol=3e-10)   # float32 spacing here ≈ 1.2e-10; the unfloored step is 1e-7 larger
    np.testing.assert_allclose(got - a, 0.2 * (b.astype(np.float64) - a), rtol=0, atol=3e-10)   # float32 spacing here ≈ 1.2e-10; the unfloored step is 1e-7 larger
    np.testing.assert_allclose(_ns(a, a.copy(), 1e-7), a, rtol=2e-7, atol=0)   # w b + (1 − w) a with b = a


def test_nearswap_needs_t_and_one_model():
    a, b = _pair()
    with pytest.raises(UnmergeError, match="needs parameter t"):
        merge_tensors("nearswap", a, [b - a])
    with pytest.raises(UnmergeError, match="exactly one other model"):
        merge_tensors("nearswap", a, [b - a, b - a], t=0.1)
