"""``breadcrumbs`` / ``breadcrumbs_ties`` (mergekit 0.1.5 ``magnitude_outliers``): the keep-masks
against a NumPy reference and against mergekit's own function, the edge cases (density 1, gamma 0,
a target of 0 entries, gamma + density > 1, K = 1), magnitudes tied at both thresholds across
chunk boundaries, the l1 rescale, and bad gamma refused."""

import numpy as np
import pytest

from tests.test_merge_registry import np_gta, np_outliers
from unmerge_jax import UnmergeError
from unmerge_jax.merge.params import resolve
from unmerge_jax.merge.tensor import merge_resolved, merge_tensors

RTOL = ATOL = 2e-6


def _data(shape=(24, 20), k=3, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(np.float32)
    d = (0.1 * rng.normal(size=(k, *shape))).astype(np.float32)
    return base, d


def _ref(base, d, w, density, gamma, consensus, rescale=False, normalize=False, lam=1.0):
    keeps = [np_outliers(d[i], density[i], gamma[i]) for i in range(len(d))]
    return np_gta(base, d, w, keeps=keeps, density=density, rule="l1" if rescale else None, consensus=consensus,
                  normalize=normalize, lam=lam)


def _kept(base, d, density, gamma, method="breadcrumbs", chunk=1 << 20):
    """The entries each model keeps: merge each model alone with weight 1 (linear consensus)."""
    out = []
    for i in range(len(d)):
        res = resolve(method, 1, {"density": density, "gamma": gamma})
        out.append(merge_resolved(res, base, (d[i],), chunk=chunk) != base)
    return np.stack(out)


@pytest.mark.parametrize("method,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.3, 0.2), (0.9, 0.3), (0.05, 0.0), (0.001, 0.1),
                                           (0.7, 1.0), (1.0, 0.5)])
def test_values_equal_the_reference(method, consensus, density, gamma):
    base, d = _data()
    w = np.array([0.6, 1.0, 0.3])
    got = merge_tensors(method, base, d, list(w), density=density, gamma=gamma)
    want = _ref(base, d, w, [density] * 3, [gamma] * 3, consensus)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=RTOL, atol=ATOL)


def test_counts_follow_mergekit_arithmetic():
    """n = 480: target = int(0.3·480) = 144 kept, n_top = int(0.2·480) = 96 largest dropped;
    with gamma = 0.9 the outlier removal shrinks to n − target (n_bot = 0); a density below 1/n
    keeps nothing; density 1 keeps everything untouched."""
    base, d = _data()
    mags = np.abs(d[0]).ravel()
    order = np.argsort(-mags, kind="stable")
    for density, gamma, lo, hi in [(0.3, 0.2, 96, 240), (0.3, 0.9, 336, 480), (0.001, 0.1, 0, 0)]:
        kept = _kept(base, d[:1], density, gamma)[0].ravel()
        assert kept.sum() == hi - lo
        assert np.array_equal(np.flatnonzero(kept), np.sort(order[lo:hi]))
    np.testing.assert_array_equal(np.asarray(merge_tensors("breadcrumbs", base, d[:1], density=1.0, gamma=0.5)),
                                  (base + d[0]).astype(np.float32))


def test_matches_mergekits_magnitude_outliers():
    torch = pytest.importorskip("torch")
    sp = pytest.importorskip("mergekit.sparsify", reason="mergekit is not installed: its function not compared")
    base, d = _data((16, 40))
    for density, gamma in [(0.5, 0.01), (0.2, 0.3), (0.8, 0.15)]:
        want = np.stack([sp.magnitude_outliers(torch.from_numpy(d[i]), density, gamma=gamma).numpy() != 0
                         for i in range(3)])
        np.testing.assert_array_equal(_kept(base, d, density, gamma), want)
        np.testing.assert_array_equal(want, np.stack([np_outliers(d[i], density, gamma) for i in range(3)]))


@pytest.mark.parametrize("chunk", [3, 7, 64])
def test_ties_at_both_thresholds_split_across_chunks(chunk):
    """Magnitudes in 6 levels of 20 equal values each: both thresholds fall inside a tie group, the
    groups span many chunks; the kept set (ties first by position at each threshold) is the
    reference's whatever the chunk size."""
    rng = np.random.default_rng(3)
    n = 120
    d = np.repeat(np.arange(1, 7, dtype=np.float32) * 0.01, 20)
    d = d * np.where(rng.random(n) < 0.5, -1, 1)
    d = d[rng.permutation(n)].astype(np.float32)
    base = np.zeros(n, np.float32)
    for density, gamma in [(0.35, 0.1), (0.5, 0.25), (0.6, 0.05)]:
        want = np_outliers(d, density, gamma)
        got = _kept(base, d[None], density, gamma, chunk=chunk)[0]
        np.testing.assert_array_equal(got, want, err_msg=f"{density} {gamma}")
        assert got.sum() == int(density * n)


def test_l1_rescale_and_lambda():
    base, d = _data()
    w = np.array([1.0, 0.5, 0.8])
    got = merge_tensors("breadcrumbs_ties", base, d, list(w), density=[0.4, 0.6, 0.5], gamma=[0.05, 0.1, 0.0],
                        rescale=True, normalize=True, **{"lambda": 0.7})
    want = _ref(base, d, w, [0.4, 0.6, 0.5], [0.05, 0.1, 0.0], True, rescale=True, normalize=True, lam=0.7)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=RTOL, atol=ATOL)


def test_fine_tuned_weights_and_one_model():
    base, d = _data(k=1)
    theta = (base + d).astype(np.float32)
    dd = theta - base
    got = merge_tensors("breadcrumbs", base, theta, [0.5], deltas=False, density=0.4, gamma=0.1)
    np.testing.assert_allclose(np.asarray(got, np.float64), _ref(base, dd, [0.5], [0.4], [0.1], False),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("gamma", [-0.1, 1.5, "x"])
def test_bad_gamma_refused(gamma):
    base, d = _data(k=2)
    with pytest.raises(UnmergeError, match="gamma"):
        merge_tensors("breadcrumbs", base, d, density=0.5, gamma=gamma)
