"""``della`` / ``della_linear`` (mergekit 0.1.5 ``della_magprune``): the keep probabilities agree
with a NumPy reference and with the ones mergekit hands to ``torch.bernoulli`` (captured), the l1
rescale and consensus agree with mergekit's given the same masks, the drawn masks follow the
probabilities (within 5 binomial s.d., on four seeds), the draw does not depend on the chunk size,
and bad epsilon is refused."""

import numpy as np
import pytest

from tests.test_merge_registry import np_della_probs, np_gta
from unmerge_jax import UnmergeError
from unmerge_jax.kernels import merge as K
from unmerge_jax.orderstats import abs_bits, row_ranks
from unmerge_jax.merge.params import resolve
from unmerge_jax.merge.tensor import merge_resolved, merge_tensors


def _data(shape=(12, 50), k=3, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(np.float32)
    d = (0.1 * rng.normal(size=(k, *shape)) * (rng.random((k, *shape)) < 0.8)).astype(np.float32)
    return base, d


def _probs(d, density, eps):
    """Our kernel's probabilities: host row ranks, then :func:`K.della_probs`."""
    row = d.shape[-1] if d.ndim > 1 else d.size
    ranks = row_ranks(abs_bits(d.ravel()), row)
    return np.asarray(K.della_probs(ranks, np.float32(density - eps), np.float32(eps), row)).reshape(d.shape)


def test_row_ranks_equal_a_stable_double_argsort():
    rng = np.random.default_rng(1)
    x = np.abs(rng.normal(size=(9, 33))).astype(np.float32)
    x[:, ::4] = 0.0                     # ties (zeros) and repeated values
    x[2, :10] = x[2, 10]
    want = np.argsort(np.argsort(x, axis=1, kind="stable"), axis=1, kind="stable")
    np.testing.assert_array_equal(row_ranks(abs_bits(x.ravel()), 33).reshape(x.shape), want)


@pytest.mark.parametrize("density,eps", [(0.5, 0.15), (0.3, 0.1), (0.8, 0.0), (0.7, 0.29)])
def test_probabilities_equal_the_numpy_reference(density, eps):
    _, d = _data()
    got = _probs(d[0], density, eps)
    want = np_della_probs(d[0], density, eps)
    np.testing.assert_allclose(got, want, rtol=0, atol=1.5e-7)
    assert got.min() == pytest.approx(density - eps, abs=1e-7) and got.max() == pytest.approx(density + eps, abs=1e-7)


def test_probabilities_equal_the_ones_mergekit_draws_from(monkeypatch):
    torch = pytest.importorskip("torch")
    sp = pytest.importorskip("mergekit.sparsify", reason="mergekit is not installed: its probabilities not compared")
    _, d = _data((8, 64))
    seen = []

    def bernoulli(p, *a, **kw):
        seen.append(p.detach().numpy().copy())
        return torch.ones_like(p)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    for density, eps in [(0.5, 0.15), (0.35, 0.2)]:
        for x in (d[0], d[1, 0]):                       # a matrix (per row) and a 1-D tensor (one row)
            seen.clear()
            sp.della_magprune(torch.from_numpy(x), density, eps)
            ours, theirs = _probs(x, density, eps), seen[0].reshape(x.shape)
            # Exact zeros tie: mergekit's argsort orders them arbitrarily, we by position; a tied
            # group gets the same set of probabilities, the other entries the same ones.
            nz = x != 0
            np.testing.assert_allclose(ours[nz], theirs[nz], rtol=0, atol=1.2e-7)
            for r in range(x.reshape(-1, x.shape[-1]).shape[0]):
                z = ~nz.reshape(-1, x.shape[-1])[r]
                np.testing.assert_allclose(np.sort(ours.reshape(-1, x.shape[-1])[r][z]),
                                           np.sort(theirs.reshape(-1, x.shape[-1])[r][z]), rtol=0, atol=1.2e-7)


@pytest.mark.parametrize("method,consensus,normalize", [("della", True, True), ("della_linear", False, False)])
def test_rescale_and_mix_equal_mergekits_given_the_same_masks(monkeypatch, method, consensus, normalize):
    """mergekit's della_magprune with its Bernoulli replaced by fixed masks equals np_gta with the
    same masks (l1 rescale over the whole tensor, sign consensus, normalisation): the reference the
    registry test holds our kernel to is mergekit's formula."""
    torch = pytest.importorskip("torch")
    sp = pytest.importorskip("mergekit.sparsify", reason="mergekit is not installed")
    base, d = _data((10, 30))
    rng = np.random.default_rng(4)
    masks = rng.random(d.shape) < 0.5
    w = np.array([0.5, 1.0, 0.7])
    calls = iter(range(3))

    def bernoulli(p, *a, **kw):
        return torch.from_numpy(masks[next(calls)].astype(np.float32)).reshape(p.shape)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    kept = [sp.della_magprune(torch.from_numpy(d[i]), 0.5, 0.1, rescale_norm=sp.RescaleNorm.l1).numpy() for i in range(3)]
    u = np.stack(kept).astype(np.float64) * w[:, None, None]
    if consensus:
        maj = np.where(u.sum(0) >= 0, 1, -1)
        agree = np.sign(u) == maj
        div = (w[:, None, None] * agree).sum(0)
        div[div == 0] = 1
        mk = base + (u * agree).sum(0) / div
    else:
        mk = base + u.sum(0)
    ref = np_gta(base, d, w, keeps=masks, density=[0.5] * 3, rule="l1", consensus=consensus, normalize=normalize)
    np.testing.assert_allclose(ref, mk, rtol=0, atol=2e-6)


def test_keep_frequencies_follow_the_probabilities():
    """One model, one row of 4000 entries: the fraction kept among the entries of each rank decile
    is within 5 binomial s.d. of the decile's mean probability, on each of four seeds; the l1
    rescale keeps the row's L1 mass."""
    rng = np.random.default_rng(7)
    d = rng.normal(size=(1, 4000)).astype(np.float32)
    base = np.zeros_like(d[0])
    p = np_della_probs(d[0], 0.4, 0.3)
    order = np.argsort(np.abs(d[0]), kind="stable")
    for seed in (10, 11, 12, 13):
        res = resolve("della_linear", 1, {"density": 0.4, "epsilon": 0.3, "rescale": False})
        kept = merge_resolved(res, base, (d[0],), seed=seed, name="t") != 0
        for dec in np.array_split(order, 10):
            pm = p[dec].mean()
            assert abs(kept[dec].mean() - pm) < 5 * np.sqrt(pm * (1 - pm) / dec.size)
        res = resolve("della_linear", 1, {"density": 0.4, "epsilon": 0.3})
        out = merge_resolved(res, base, (d[0],), seed=seed, name="t")
        assert np.abs(out).sum() == pytest.approx(np.abs(d[0]).sum(), rel=1e-5)


def test_draw_does_not_depend_on_chunk_size_or_tensor_order():
    base, d = _data((40, 30))
    res = resolve("della", 3, {"density": 0.5})
    one = merge_resolved(res, base, tuple(d), seed=5, name="x")
    for chunk in (30, 90, 210):
        np.testing.assert_array_equal(merge_resolved(res, base, tuple(d), seed=5, name="x", chunk=chunk), one)
    assert not np.array_equal(merge_resolved(res, base, tuple(d), seed=6, name="x"), one)


def test_density_one_is_task_arithmetic_and_one_model():
    base, d = _data(k=1)
    got = merge_tensors("della_linear", base, d, [0.7], density=1.0)
    np.testing.assert_allclose(np.asarray(got, np.float64), base + 0.7 * d[0].astype(np.float64), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("density,eps", [(0.5, 0.5), (0.9, 0.15), (0.1, 0.1), (0.5, -0.1)])
def test_bad_epsilon_refused(density, eps):
    base, d = _data(k=2)
    with pytest.raises(UnmergeError, match="epsilon"):
        merge_tensors("della", base, d, density=density, epsilon=eps)


def test_rows_of_one_entry_keep_with_probability_density():
    """(L = 1: mergekit's rank normalisation divides 0 by 0 and torch.bernoulli fails.)"""
    rng = np.random.default_rng(9)
    d = rng.normal(size=(4000, 1)).astype(np.float32)
    np.testing.assert_allclose(_probs(d, 0.4, 0.1), 0.4, atol=1e-7)
    res = resolve("della_linear", 1, {"density": 0.4, "epsilon": 0.1, "rescale": False})
    kept = (merge_resolved(res, np.zeros_like(d), (d,), seed=1, name="b") != 0).mean()
    assert abs(kept - 0.4) < 5 * np.sqrt(0.24 / d.size)
