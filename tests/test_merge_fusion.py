"""arcee_fusion against the NumPy float64 formula of mergekit 0.1.5 (the registry's reference);
its threshold, three order statistics of the importances found over chunks, equals the sorted
array's exactly (also on a tensor large enough for the sampled bracket of ``orderstats``); the
order-preserving keys of signed values; refusals."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_merge_registry import np_arcee_fusion
from unmerge_jax.errors import UnmergeError
from unmerge_jax.kernels import merge_sphere as S
from unmerge_jax.merge.chunks import TensorChunks
from unmerge_jax.merge.methods.fusion import quantile_positions, tensor_stats
from unmerge_jax.merge.params import resolve
from unmerge_jax.merge.tensor import merge_resolved, merge_tensors
from unmerge_jax.orderstats import order_keys


def _pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=shape).astype(np.float32)
    b = (a + 0.3 * rng.normal(size=shape) * (rng.random(shape) < 0.6)).astype(np.float32)
    return a, b


@pytest.mark.parametrize("shape", [(31, 17), (200,), (5, 64)])
def test_fusion_equals_reference(shape):
    a, b = _pair(shape)
    got = np.asarray(merge_tensors("arcee_fusion", a, [b], deltas=False))
    np.testing.assert_allclose(got, np_arcee_fusion(a, b), rtol=2e-6, atol=2e-6)
    kept = got != a
    assert 0 < kept.sum() < 0.5 * kept.size      # the threshold keeps the outliers only


@pytest.mark.parametrize("chunk", [4096, 1 << 20])
def test_fusion_threshold_is_the_exact_order_statistic(chunk):
    """On 600 × 512 entries (beyond the exact-pass size, so the sampled bracket is used) the
    threshold is median + 1.5·IQR of the sorted importances, to the bit, and the merge keeps
    exactly the entries at or above it."""
    a, b = _pair((600, 512), seed=1)
    res = resolve("arcee_fusion", 1, {})
    chunks = TensorChunks(a, (b,), deltas=False, chunk=chunk, rows=True)
    stats = tensor_stats(res, chunks, None)
    kl = np.asarray(S.row_kl(a.ravel(), (b.ravel(),), deltas=False, row_len=512))
    np.testing.assert_array_equal(stats.kl, kl)
    imp = np.asarray(S.fusion_importance(a.ravel(), (b.ravel(),), kl, deltas=False, row_len=512))
    srt = np.sort(imp)
    q1, med, q3 = (srt[p] for p in quantile_positions(imp.size))
    thr = np.float32(med + np.float32(1.5) * (q3 - q1))
    assert stats.thr == thr
    got = merge_resolved(res, a, (b,), deltas=False, chunk=chunk)
    keep = (imp >= thr).reshape(a.shape)
    np.testing.assert_array_equal(got, np.where(keep, a + (b - a), a))


def test_order_keys_sort_signed_values():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(size=500), [0.0, -0.0, np.inf, -np.inf, 1e-40, -1e-40]]).astype(np.float32)
    k = order_keys(x)
    np.testing.assert_array_equal(np.sort(x), order_keys(np.sort(k), inverse=True))
    np.testing.assert_array_equal(order_keys(k, inverse=True).view(np.uint32), x.view(np.uint32))


def test_fusion_needs_one_model():
    a, b = _pair((4, 4))
    with pytest.raises(UnmergeError, match="exactly one other model"):
        merge_tensors("arcee_fusion", a, [b, b], deltas=False)
