"""``sce`` (mergekit 0.1.5): values against a NumPy reference, the selection mask and weights
against mergekit's own ``sce_mask`` / ``sce_weight``, edge cases (select_topk 0 and 1, K = 1,
all-zero task vectors, variance ties split across chunks, a tensor large enough for the sampled
bracket), and bad parameters refused."""

import numpy as np
import pytest

from tests.test_merge_registry import np_sce
from unmerge_jax import UnmergeError
from unmerge_jax.merge.methods.sce import sce_weights
from unmerge_jax.merge.params import resolve
from unmerge_jax.merge.tensor import merge_resolved, merge_tensors

RTOL = ATOL = 2e-6


def _data(shape=(30, 20), k=3, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(np.float32)
    d = (0.1 * rng.normal(size=(k, *shape)) * (rng.random((k, *shape)) < 0.7)).astype(np.float32)
    return base, d


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.0])
def test_values_equal_the_reference(k, topk):
    base, d = _data(k=k)
    got = merge_tensors("sce", base, d, select_topk=topk)
    np.testing.assert_allclose(np.asarray(got, np.float64), np_sce(base, d, topk), rtol=RTOL, atol=ATOL)


def test_mask_and_weights_equal_mergekits():
    torch = pytest.importorskip("torch")
    mk = pytest.importorskip("mergekit.merge_methods.sce", reason="mergekit is not installed: its functions not compared")
    _, d = _data((16, 50))
    tv = torch.from_numpy(d)
    for topk in (0.2, 0.6):
        mask = mk.sce_mask(tv, topk, torch.float32).numpy().astype(bool)
        var = d.astype(np.float64).var(0).ravel()
        n_sel = int(np.count_nonzero(var) * topk)
        ours = np.zeros(var.size, bool)
        ours[np.argsort(-var, kind="stable")[:n_sel]] = True
        np.testing.assert_array_equal(ours.reshape(mask.shape), mask)
        masked = d * mask
        want = mk.sce_weight(torch.from_numpy(masked)).numpy()
        got = sce_weights((masked.astype(np.float64) ** 2).reshape(3, -1).sum(1), masked[0].size)
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_one_model_and_zero_task_vectors():
    base, d = _data(k=1)
    # K = 1: no variance, so a selection keeps nothing (the base); without one, the model itself
    np.testing.assert_array_equal(np.asarray(merge_tensors("sce", base, d, select_topk=0.5)), base)
    np.testing.assert_allclose(np.asarray(merge_tensors("sce", base, d), np.float64), base + d[0].astype(np.float64),
                               rtol=RTOL, atol=ATOL)
    z = np.zeros((3, *base.shape), np.float32)      # uniform weights, nothing agrees: the base
    np.testing.assert_array_equal(np.asarray(merge_tensors("sce", base, z)), base)


@pytest.mark.parametrize("chunk", [5, 64])
def test_variance_ties_split_across_chunks(chunk):
    """Variances in 4 levels of 50 equal values: the threshold falls in a tie group spread over
    chunks; the first ones by position are kept, whatever the chunk size."""
    rng = np.random.default_rng(2)
    n = 200
    level = np.repeat(np.arange(1, 5, dtype=np.float32) * 0.01, 50)[rng.permutation(n)]
    d = np.stack([level, -level, np.zeros(n, np.float32)]).astype(np.float32)
    base = np.zeros(n, np.float32)
    res = resolve("sce", 3, {"select_topk": 0.6})
    got = merge_resolved(res, base, tuple(d), chunk=chunk)
    np.testing.assert_allclose(np.asarray(got, np.float64), np_sce(base, d, 0.6), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(got, merge_resolved(res, base, tuple(d)))


def test_sampled_bracket_on_a_large_tensor():
    """n = 600,000 > 4·65,536: the threshold is bracketed from a sample; the result is exact."""
    base, d = _data((600, 1000), seed=4)
    got = merge_tensors("sce", base, d, select_topk=0.25)
    np.testing.assert_allclose(np.asarray(got, np.float64), np_sce(base, d, 0.25), rtol=RTOL, atol=ATOL)


def test_fine_tuned_weights_and_ignored_weights():
    base, d = _data()
    theta = (base + d).astype(np.float32)
    got = merge_tensors("sce", base, theta, [0.3, 2.0, 1.0], deltas=False, select_topk=0.4)
    np.testing.assert_allclose(np.asarray(got, np.float64), np_sce(base, theta - base, 0.4), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("params", [{"select_topk": -0.1}, {"select_topk": 1.5}, {"select_topk": "a"},
                                    {"int8_mask": "sometimes"}, {"density": 0.5}])
def test_bad_parameters_refused(params):
    base, d = _data()
    with pytest.raises(UnmergeError):
        merge_tensors("sce", base, d, **params)
