"""``model_stock`` against a NumPy float64 reference written here (mergekit 0.1.5's formula) and
its edge cases: parallel task vectors (t = 1: their mean), orthogonal ones (t = 0: the base), the
singular mean cosine −1/(K−1) (the base), a zero task vector, ``filter_wise`` on 1-D, 2-D and 3-D
tensors, K = 2, and K = 1 refused."""

import numpy as np
import pytest

from unmerge_jax import UnmergeError
from unmerge_jax.merge.tensor import merge_tensors


def np_model_stock(base, deltas, filter_wise=False):
    d = np.asarray(deltas, np.float64)
    k = len(d)
    if filter_wise:
        rows = d.reshape(k, -1, d.shape[-1]) if d.ndim > 1 else d.reshape(k, 1, -1)
    else:
        rows = d.reshape(k, 1, -1)
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            num = (rows[i] * rows[j]).sum(-1)
            den = np.linalg.norm(rows[i], axis=-1) * np.linalg.norm(rows[j], axis=-1)
            cos.append(np.clip(num / np.maximum(den, 1e-6), -1, 1))
    c = np.mean(cos, axis=0)
    den = 1 + (k - 1) * c
    t = np.where(np.abs(den) < 1e-6, 0.0, k * c / np.where(np.abs(den) < 1e-6, 1.0, den))[:, None]
    b = np.asarray(base, np.float64).reshape(rows.shape[1], -1)
    avg = (b[None] + rows).mean(0)
    return (t * avg + (1 - t) * b).reshape(np.shape(base))


def _data(shape, k=3, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(np.float32)
    common = rng.normal(size=shape)
    d = (0.05 * (common + rng.normal(size=(k, *shape)))).astype(np.float32)   # correlated: 0 < cos < 1
    return base, d


@pytest.mark.parametrize("shape", [(40, 24), (8, 6, 10), (50,)])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("k", [2, 4])
def test_values_equal_the_reference(shape, filter_wise, k):
    base, d = _data(shape, k)
    got = np.asarray(merge_tensors("model_stock", base, d, filter_wise=filter_wise), np.float64)
    np.testing.assert_allclose(got, np_model_stock(base, d, filter_wise), rtol=2e-6, atol=2e-6)
    # chunked (whole rows with filter_wise) equals the one-chunk result exactly
    from unmerge_jax.merge.params import resolve
    from unmerge_jax.merge.tensor import merge_resolved
    res = resolve("model_stock", k, {"filter_wise": filter_wise})
    one = merge_resolved(res, base, tuple(d))
    np.testing.assert_array_equal(merge_resolved(res, base, tuple(d), chunk=5), one)


def test_t_lies_strictly_between_base_and_mean_for_correlated_vectors():
    base, d = _data((30, 20))
    got = np.asarray(merge_tensors("model_stock", base, d), np.float64)
    mean = d.astype(np.float64).mean(0).ravel()
    step = (got - base).ravel()
    t = step @ mean / (mean @ mean)
    assert 0.3 < t < 1
    np.testing.assert_allclose(step, t * mean, rtol=0, atol=1e-6)


def test_parallel_task_vectors_give_their_mean():
    base, d = _data((20, 10))
    par = np.stack([d[0], 2 * d[0], 0.5 * d[0]])    # cos = 1 → t = 1
    got = np.asarray(merge_tensors("model_stock", base, par), np.float64)
    np.testing.assert_allclose(got, base + par.astype(np.float64).mean(0), rtol=2e-6, atol=2e-6)


def test_orthogonal_task_vectors_keep_the_base():
    base = np.ones((4, 4), np.float32)
    d = np.zeros((3, 4, 4), np.float32)
    d[0, 0, 0], d[1, 1, 1], d[2, 2, 2] = 0.3, -0.2, 0.5     # cos = 0 → t = 0
    np.testing.assert_array_equal(np.asarray(merge_tensors("model_stock", base, d)), base)


def test_singular_mean_cosine_keeps_the_base():
    """K = 2 opposite vectors: cos = −1, 1 + (K−1)cos = 0 → mergekit keeps the base."""
    base, d = _data((10, 10), k=1)
    opp = np.stack([d[0], -d[0]])
    np.testing.assert_array_equal(np.asarray(merge_tensors("model_stock", base, opp)), base)
    # filter-wise: one row singular, the others not
    mixed = np.stack([d[0], d[0] * 0.5])
    mixed[1, 3] = -d[0, 3]
    got = np.asarray(merge_tensors("model_stock", base, mixed, filter_wise=True))
    np.testing.assert_array_equal(got[3], base[3])
    np.testing.assert_allclose(got, np_model_stock(base, mixed, True), rtol=2e-6, atol=2e-6)


def test_zero_task_vector_and_weights_ignored(capsys):
    base, d = _data((12, 8))
    d[1] = 0.0
    want = np_model_stock(base, d)
    got = np.asarray(merge_tensors("model_stock", base, d, weights=[0.2, 3.0, 1.0]), np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    np.testing.assert_array_equal(got, np.asarray(merge_tensors("model_stock", base, d), np.float64))


def test_fine_tuned_weights_equal_task_vectors():
    base, d = _data((16, 12))
    theta = (base + d).astype(np.float32)
    got = np.asarray(merge_tensors("model_stock", base, theta, deltas=False, filter_wise=True), np.float64)
    np.testing.assert_allclose(got, np_model_stock(base, theta - base, True), rtol=2e-6, atol=2e-6)


def test_one_model_is_refused():
    base, d = _data((4, 4), k=1)
    with pytest.raises(UnmergeError, match="at least 2 models"):
        merge_tensors("model_stock", base, d)
    with pytest.raises(UnmergeError, match="filter_wise"):
        merge_tensors("model_stock", base, np.concatenate([d, d]), filter_wise="maybe")
