"""Solver-specific behaviour and the shared linear algebra of ``unmerge_jax.solvers``.

What every registered solver must satisfy (references, optimality conditions, vmap, no retrace,
degenerate dictionaries) is in tests/test_solver_registry.py. Here: each solver's own answer on
a singular Gram (duplicate atoms), and ``solvers.common``'s pseudo-inverse solve and its
full-rank fast path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import nnls as scipy_nnls

import unmerge_jax as u
from tests._problems import T, rand


def _duplicate_atoms():
    d, v = rand()
    d[:, 3] = d[:, 2]  # G is singular
    return d, v


def test_nnls_on_a_singular_gram_matches_scipy():
    d, v = _duplicate_atoms()
    res = u.decompose(d, v, "nnls")
    d64, v64 = d.astype(np.float64), v.astype(np.float64)
    for t in range(T):
        ref, _ = scipy_nnls(d64, v64[:, t])
        ours = np.sum((v64[:, t] - d64 @ res.coef[t]) ** 2)
        assert ours <= np.sum((v64[:, t] - d64 @ ref) ** 2) * (1 + 1e-9)


def test_ridge_alpha_zero_on_a_singular_gram_is_the_minimum_norm_solution():
    d, v = _duplicate_atoms()
    res = u.decompose(d, v, "ridge", alpha=0.0)
    d64, v64 = d.astype(np.float64), v.astype(np.float64)
    np.testing.assert_allclose(res.coef, (np.linalg.pinv(d64) @ v64).T,
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(res.coef[:, 2], res.coef[:, 3], rtol=1e-9)


def test_omp_never_selects_both_duplicate_atoms():
    d, v = _duplicate_atoms()
    res = u.decompose(d, v, "omp", n_nonzero_coefs=3)
    assert not np.any((res.coef[:, 2] != 0) & (res.coef[:, 3] != 0))


@pytest.mark.parametrize("case", ["spd", "ill", "rank_deficient", "zero_rows"])
def test_psd_solve_is_pinv(case):
    from unmerge_jax.solvers.common import psd_solve

    rng = np.random.default_rng(3)
    d = rng.standard_normal((50, 7))
    if case == "ill":
        d = d @ np.diag(np.logspace(0, -3, 7))  # κ(D) = 1e3, κ(G) = 1e6
    if case == "rank_deficient":
        d[:, 4] = d[:, 1] - 2 * d[:, 2]
        d[:, 6] = d[:, 0]
    if case == "zero_rows":
        d[:, 3] = 0.0
    g, c = d.T @ d, d.T @ rng.standard_normal(50)
    x = np.asarray(jax.jit(psd_solve)(g, c))
    ref = np.linalg.pinv(g, rcond=1e-13, hermitian=True) @ c
    np.testing.assert_allclose(x, ref, rtol=1e-8 if case != "ill" else 1e-6, atol=1e-10 * np.abs(ref).max())


def test_well_posed_check_and_its_fast_path():
    # gram_is_well_posed lets every support solve skip the rank-deficient branch. It must say no
    # for singular Grams, and when it says yes every masked, shifted or normalised system it
    # covers must factor at full rank and give the same answer as the general path.
    from unmerge_jax.solvers.common import _pivoted_cholesky, gram_is_well_posed, masked_solve

    rng = np.random.default_rng(5)
    d = rng.standard_normal((400, 8)) @ np.diag(np.logspace(0, -2, 8))
    g = d.T @ d
    assert gram_is_well_posed(g) and gram_is_well_posed(np.stack([g, 2 * g]))
    dup = d.copy()
    dup[:, 5] = dup[:, 2]
    zero = d.copy()
    zero[:, 0] = 0
    for bad in (dup.T @ dup, zero.T @ zero, g * 1e-30, np.stack([g, dup.T @ dup])):
        assert not gram_is_well_posed(bad)
    norm = np.sqrt(np.diag(g))
    k = 8
    masks = rng.random((200, k)) < 0.6
    rhs = rng.standard_normal((200, k))

    @jax.jit
    def check(mat, mask, b):
        m = mask.astype(mat.dtype)
        a = mat * m[:, None] * m[None, :] + jnp.diag(1 - m)
        rank = _pivoted_cholesky(a, k * jnp.finfo(a.dtype).eps * jnp.max(jnp.abs(jnp.diag(a))))[2]
        return rank, masked_solve(mat, b, mask, full_rank=True), masked_solve(mat, b, mask)

    for mat in (g, g / np.outer(norm, norm)):  # as given, and atom-normalised (OMP)
        rank, fast, slow = jax.vmap(check, in_axes=(None, 0, 0))(jnp.asarray(mat), jnp.asarray(masks), jnp.asarray(rhs))
        assert np.all(np.asarray(rank) == k)
        np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), rtol=1e-12, atol=1e-14)
