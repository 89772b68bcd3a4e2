"""The counter-based random module: the cipher equals JAX's, draws do not depend on how a pass is cut."""

import jax
import jax.numpy as jnp
import numpy as np

import unmerge_jax  # noqa: F401  (x64)
from unmerge_jax.kernels import random as R


def test_threefry_equals_the_jax_primitive():
    from jax.extend.random import threefry_2x32

    rng = np.random.default_rng(0)
    k = rng.integers(0, 2**32, 2, dtype=np.uint64).astype(np.uint32)
    x1, x2 = (rng.integers(0, 2**32, 1000, dtype=np.uint64).astype(np.uint32) for _ in range(2))
    want = np.asarray(threefry_2x32((jnp.uint32(k[0]), jnp.uint32(k[1])), jnp.concatenate([x1, x2]))).reshape(2, -1)
    got = np.stack([np.asarray(w) for w in R.threefry2x32(jnp.uint32(k[0]), jnp.uint32(k[1]), x1, x2)])
    np.testing.assert_array_equal(got, want)


def test_bernoulli_equals_jax_random_bernoulli_across_the_2_32_carry():
    key = jax.random.key(11)
    p = jnp.float32(0.3)
    whole = np.asarray(jax.random.bernoulli(key, p, (4096,)))
    np.testing.assert_array_equal(np.asarray(R.bernoulli_at(key, p, 0, 4096)), whole)
    # a chunk straddling 2**32 equals the two halves drawn on each side of the carry
    start = 2**32 - 5
    both = np.asarray(R.bernoulli_at(key, p, start, 10))
    np.testing.assert_array_equal(both[:5], np.asarray(R.bernoulli_at(key, p, start, 5)))
    np.testing.assert_array_equal(both[5:], np.asarray(R.bernoulli_at(key, p, 2**32, 5)))
    assert 0.2 < np.asarray(R.bernoulli_at(key, p, 0, 100_000)).mean() < 0.4


def test_poisson1_weights_are_poisson_and_independent_of_slicing():
    key = jax.random.key(2)
    units = np.arange(200_000)
    w = np.asarray(R.poisson1_weights(key, units, 3))
    assert w.shape == (3, units.size) and w.dtype == np.int32
    for s in range(3):  # Poisson(1): mean 1, variance 1, P(0) = e^-1
        assert abs(w[s].mean() - 1) < 0.01 and abs(w[s].var() - 1) < 0.02
        assert abs(np.mean(w[s] == 0) - np.exp(-1)) < 0.005
    assert abs(np.corrcoef(w[0], w[1])[0, 1]) < 0.01
    np.testing.assert_array_equal(np.asarray(R.poisson1_weights(key, units[1000:2000], 3)), w[:, 1000:2000])
    np.testing.assert_array_equal(np.asarray(R.poisson1_weights(key, units, 1)), w[:1])


def test_model_keys_differ_by_model_and_tensor():
    a = jax.random.key_data(R.model_keys(0, R.name_hash("a"), 3))
    b = jax.random.key_data(R.model_keys(0, R.name_hash("b"), 3))
    assert len({tuple(np.asarray(x)) for x in list(a) + list(b)}) == 6
    assert R.name_hash("model.layers.0.mlp.up_proj.weight") == R.name_hash("model.layers.0.mlp.up_proj.weight")


def test_bootstrap_draw_depends_on_row_and_seed_only():
    key = jax.random.key(9)
    rows = np.arange(200_000)
    w3 = np.asarray(R.poisson1_weights(key, rows, 3))
    np.testing.assert_array_equal(np.asarray(R.poisson1_weights(key, rows, 2)), w3[:2])  # S does not matter
    np.testing.assert_array_equal(np.asarray(R.poisson1_weights(key, rows[5000:6000], 3)), w3[:, 5000:6000])
    big = np.asarray(R.poisson1_weights(key, np.asarray([2**40 + 7, 7]), 1))[0]
    assert big.shape == (2,)  # 64-bit row indices hash both words
    # Poisson(1): mean 1, variance 1, P(0) = P(1) = e⁻¹, P(2) = e⁻¹/2; replicates uncorrelated.
    for s in range(3):
        assert abs(w3[s].mean() - 1) < 0.01 and abs(w3[s].var() - 1) < 0.02
        freq = np.bincount(w3[s], minlength=3)[:3] / rows.size
        np.testing.assert_allclose(freq, np.exp(-1) * np.array([1, 1, 0.5]), atol=0.005)
    assert abs(np.corrcoef(w3)[np.triu_indices(3, 1)]).max() < 0.01
