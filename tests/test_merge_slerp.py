"""slerp, nuslerp and multislerp against NumPy float64 references written from mergekit 0.1.5's
formulas (``tests/test_merge_registry.py`` holds the references; here the edge cases): t = 0 and 1,
parallel, antipodal and zero vectors, the near-parallel lerp threshold, weights that sum to zero,
K = 1, row- and column-wise nuslerp on shapes whose rows straddle chunks, and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_merge_registry import np_multislerp, np_nuslerp, np_slerp
from unmerge_jax.errors import UnmergeError
from unmerge_jax.merge.tensor import merge_tensors

RTOL = ATOL = 2e-6


def _pair(shape=(13, 11), seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


def _slerp(a, b, t, chunk=None):
    kw = {} if chunk is None else {"chunk": chunk}
    from unmerge_jax.merge.params import resolve
    from unmerge_jax.merge.tensor import merge_resolved

    res = resolve("slerp", 1, {"t": t})
    return merge_resolved(res, a, (b,), deltas=False, **kw)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0, 1.3, -0.4])
def test_slerp_equals_reference(t):
    a, b = _pair()
    np.testing.assert_allclose(_slerp(a, b, t), np_slerp(t, a, b), rtol=RTOL, atol=ATOL)


def test_slerp_endpoints_are_exact():
    a, b = _pair()
    np.testing.assert_array_equal(_slerp(a, b, 0.0), a)
    np.testing.assert_array_equal(_slerp(a, b, 1.0), b)


def test_slerp_keeps_the_norm_between_orthonormal_inputs():
    """On two orthogonal unit vectors slerp stays on the unit circle at angle tπ/2."""
    a = np.zeros(8, np.float32)
    b = np.zeros(8, np.float32)
    a[0], b[1] = 1, 1
    for t in (0.2, 0.5, 0.8):
        got = _slerp(a, b, t)
        np.testing.assert_allclose(got[:2], [np.cos(t * np.pi / 2), np.sin(t * np.pi / 2)], atol=1e-7)
        np.testing.assert_allclose(np.linalg.norm(got), 1.0, atol=1e-6)


@pytest.mark.parametrize("scale", [2.0, -3.0])
def test_slerp_parallel_and_antipodal_inputs_interpolate_linearly(scale):
    a, _ = _pair()
    b = (scale * a).astype(np.float32)
    np.testing.assert_allclose(_slerp(a, b, 0.3), 0.7 * a + 0.3 * b, rtol=RTOL, atol=ATOL)


def test_slerp_threshold_sits_at_cos_0_9995():
    """Just below |cos| = 0.9995 slerp is spherical, just above it linear (mergekit's threshold)."""
    a = np.zeros(4, np.float32)
    a[0] = 1
    for cos, linear in ((0.9990, False), (0.9999, True)):
        b = np.array([cos, np.sqrt(1 - cos ** 2), 0, 0], np.float32)
        got = _slerp(a, b, 0.5)
        th = np.arccos(np.float64(b[0]))
        sph = (np.sin(0.5 * th) * a + np.sin(0.5 * th) * b.astype(np.float64)) / np.sin(th)
        np.testing.assert_allclose(got, 0.5 * a + 0.5 * b if linear else sph, rtol=1e-6, atol=1e-7)
        assert linear == bool(np.allclose(got, 0.5 * a + 0.5 * b, rtol=0, atol=1e-9))


def test_slerp_with_a_zero_tensor():
    a, b = _pair()
    z = np.zeros_like(a)
    np.testing.assert_allclose(_slerp(z, b, 0.3), np_slerp(0.3, z, b), rtol=RTOL, atol=ATOL)


def test_slerp_does_not_depend_on_the_chunk_size():
    a, b = _pair((37, 29))
    one = _slerp(a, b, 0.35)
    for chunk in (3, 64, 500):
        np.testing.assert_array_equal(_slerp(a, b, 0.35, chunk=chunk), one)


def test_slerp_refuses_missing_t_and_other_model_counts():
    a, b = _pair()
    with pytest.raises(UnmergeError, match="needs parameter t"):
        merge_tensors("slerp", a, [b - a])
    with pytest.raises(UnmergeError, match="exactly one other model"):
        merge_tensors("slerp", a, [b - a, b - a], t=0.5)
    with pytest.raises(UnmergeError, match="needs a base"):
        merge_tensors("slerp", None, [b], t=0.5)


# ---------------------------------------------------------------- nuslerp
@pytest.mark.parametrize("flatten,row_wise,axis", [(True, False, None), (False, False, -1), (False, True, 0)])
@pytest.mark.parametrize("weights", [(0.6, 0.4), (1.0, 3.0), (-0.5, 0.5)])
def test_nuslerp_equals_reference(flatten, row_wise, axis, weights):
    base, x = _pair((9, 7), seed=1)
    _, y = _pair((9, 7), seed=2)
    got = merge_tensors("nuslerp", base, [x, y], list(weights), nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    np.testing.assert_allclose(np.asarray(got), base + np_nuslerp(t, x, y, axis), rtol=RTOL, atol=ATOL)


def test_nuslerp_without_a_base_interpolates_the_weights():
    _, x = _pair((9, 7), seed=1)
    _, y = _pair((9, 7), seed=2)
    got = merge_tensors("nuslerp", None, [x, y], [0.6, 0.4])
    np.testing.assert_allclose(np.asarray(got), np_nuslerp(0.4, x, y), rtol=RTOL, atol=ATOL)


def test_nuslerp_rows_with_a_zero_row_and_a_parallel_row():
    base = np.zeros((4, 6), np.float32)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    y = rng.normal(size=(4, 6)).astype(np.float32)
    x[1] = 0                 # zero vector: cos 0, θ = π/2
    y[2] = 2 * x[2]          # parallel: linear
    got = merge_tensors("nuslerp", base, [x, y], [0.7, 0.3], nuslerp_flatten=False)
    np.testing.assert_allclose(np.asarray(got), np_nuslerp(0.3, x, y, -1), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(got)[2], 0.7 * x[2] + 0.3 * y[2], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("row_wise", [False, True])
def test_nuslerp_row_layouts_do_not_depend_on_the_chunk_size(row_wise):
    from unmerge_jax.merge.params import resolve
    from unmerge_jax.merge.tensor import merge_resolved

    base, x = _pair((23, 19), seed=4)
    _, y = _pair((23, 19), seed=5)
    res = resolve("nuslerp", 2, {"nuslerp_flatten": False, "nuslerp_row_wise": row_wise},
                  [{"weight": 0.3}, {"weight": 0.5}])
    one = merge_resolved(res, base, (x, y), deltas=True)
    for chunk in (1, 40, 100):     # one row per chunk, two rows, five rows with a padded tail
        np.testing.assert_array_equal(merge_resolved(res, base, (x, y), deltas=True, chunk=chunk), one)


@pytest.mark.parametrize("shape", [(5, 4, 3), (3, 2, 4, 5), (6, 1, 4)])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_row_wise_on_tensors_with_more_axes_goes_along_axis_0(shape, with_base):
    """``nuslerp_row_wise`` on a 3-/4-D tensor (a conv kernel): one vector along axis 0 per index of
    the other axes, as mergekit's ``transpose(0, -1)``; a zero and a parallel vector among them;
    chunks that cut through the (rows, prod(shape[1:])) view anywhere give the same bytes."""
    from unmerge_jax.merge.params import resolve
    from unmerge_jax.merge.tensor import merge_resolved

    base, x = _pair(shape, seed=8)
    _, y = _pair(shape, seed=9)
    x[(slice(None),) + (0,) * (len(shape) - 1)] = 0                      # a zero vector
    colinear = (slice(None),) + (-1,) * (len(shape) - 1)
    y[colinear] = 2.5 * x[colinear]                                    # a parallel one
    res = resolve("nuslerp", 2, {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                  [{"weight": 0.3}, {"weight": 0.5}])
    if with_base:
        one = merge_resolved(res, base, (x, y), deltas=True)
        want = base + np_nuslerp(0.5 / 0.8, x, y, 0)
    else:
        one = merge_resolved(res, np.zeros_like(base), (x, y), deltas=True)
        want = np_nuslerp(0.5 / 0.8, x, y, 0)
    np.testing.assert_allclose(np.asarray(one), want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(one)[colinear] - (base[colinear] if with_base else 0),
                               0.375 * x[colinear] + 0.625 * y[colinear], rtol=RTOL, atol=ATOL)
    for chunk in (1, 7, shape[-1], 50):
        b0 = base if with_base else np.zeros_like(base)
        np.testing.assert_array_equal(merge_resolved(res, b0, (x, y), deltas=True, chunk=chunk), one)


def test_nuslerp_refuses_other_model_counts_and_missing_weights():
    base, x = _pair()
    with pytest.raises(UnmergeError, match="exactly two models"):
        merge_tensors("nuslerp", base, [x], [1.0])
    with pytest.raises(UnmergeError, match="weight of model 0"):
        merge_tensors("nuslerp", base, [x, x])


# ---------------------------------------------------------------- multislerp
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_equals_every_step_of_the_reference(normalize):
    base, _ = _pair((8, 5), seed=6)
    rng = np.random.default_rng(7)
    d = rng.normal(size=(4, 8, 5)).astype(np.float32)
    w = [0.4, 0.1, 0.3, 0.6]
    got = merge_tensors("multislerp", base, d, w, normalize_weights=normalize)
    np.testing.assert_allclose(np.asarray(got), base + np_multislerp(d, w, normalize), rtol=RTOL, atol=ATOL)


def test_multislerp_one_model_is_that_model():
    base, x = _pair()
    np.testing.assert_array_equal(np.asarray(merge_tensors("multislerp", base, [x], [0.3], deltas=False)), x)


def test_multislerp_antipodal_pair_falls_back_to_the_weighted_sum_and_three_are_refused():
    base, x = _pair()
    got = merge_tensors("multislerp", base, [x, -x], [0.5, 0.5])
    np.testing.assert_allclose(np.asarray(got), base + 0.5 * x - 0.5 * x, atol=ATOL)
    with pytest.raises(UnmergeError, match="weighted mean of the unit vectors is zero"):
        merge_tensors("multislerp", base, [x, -x, x, -x], [0.25] * 4)


def test_multislerp_refuses_weights_summing_to_zero():
    base, x = _pair()
    with pytest.raises(UnmergeError, match="sum to zero"):
        merge_tensors("multislerp", base, [x, 2 * x], [0.5, -0.5])


def test_multislerp_refusal_names_the_tensor():
    base, x = _pair()
    with pytest.raises(UnmergeError, match="tensor model.layers.3.mlp.up_proj.weight: multislerp"):
        merge_tensors("multislerp", base, [x, -x, x, -x], [0.25] * 4, name="model.layers.3.mlp.up_proj.weight")
