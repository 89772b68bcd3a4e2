"""Gram-space solvers against independent float64 references (SciPy, scikit-learn, NumPy).

Every solver in ``SOLVERS`` is checked on three dictionaries — random, correlated (pairwise
cos ≈ 0.9) and ill-conditioned (κ(D) ≈ 1e3) — built from float32 data, against:
  nnls        scipy.optimize.nnls on the n×K problem; KKT conditions
  lasso/enet  sklearn Lasso/ElasticNet(fit_intercept=False), positive and signed; duality gap
  ridge       sklearn Ridge(solver="cholesky")
  omp         sklearn orthogonal_mp_gram on unit-norm atoms: identical supports
  dot         a direct NumPy formula
Shapes are shared across tests (K=8, T=6) so each solver compiles once.
"""

import numpy as np
import pytest
from scipy.optimize import nnls as scipy_nnls
from sklearn.linear_model import ElasticNet, Lasso, Ridge, orthogonal_mp_gram

import unmerge_jax as u
from unmerge_jax.solve import solve_batched

K, T, N = 8, 6, 600
REL = 1e-6  # objective tolerance vs the references (the bar)


def _orthonormal(rng, n, k):
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def make_dictionary(kind: str, seed: int = 0) -> np.ndarray:
    """float32 (N, K) dictionary of the requested kind."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        d = rng.standard_normal((N, K))
    elif kind == "correlated":
        z = _orthonormal(rng, N, K + 1)
        d = np.sqrt(0.9) * z[:, :1] + np.sqrt(0.1) * z[:, 1:]  # pairwise cosine 0.9
    elif kind == "illcond":
        u_, v_ = _orthonormal(rng, N, K), _orthonormal(rng, K, K)
        d = (u_ * np.logspace(0, -3, K)) @ v_.T  # κ(D) = 1e3
    else:
        raise ValueError(kind)
    return d.astype(np.float32)


def make_targets(d: np.ndarray, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sparse non-negative mixtures plus noise (so the optimum is unique and not an exact fit)."""
    rng = np.random.default_rng(seed)
    w = np.abs(rng.standard_normal((K, T))) * (rng.random((K, T)) < 0.5)
    scale = np.linalg.norm(d) / np.sqrt(d.size)
    v = d.astype(np.float64) @ w + 0.05 * scale * rng.standard_normal((N, T))
    return v.astype(np.float32), w.T


KINDS = ["random", "correlated", "illcond"]


@pytest.fixture(scope="module", params=KINDS)
def problem(request):
    d = make_dictionary(request.param)
    v, w = make_targets(d)
    return request.param, d, v, u.gram_stats(d, v)


def f64(x):
    return np.asarray(x, dtype=np.float64)


def test_gram_stats_match_float64_numpy(problem):
    _, d, v, st = problem
    d64, v64 = f64(d), f64(v)
    np.testing.assert_allclose(st.gram, d64.T @ d64, rtol=1e-12, atol=1e-12 * np.abs(d64.T @ d64).max())
    np.testing.assert_allclose(st.cross, d64.T @ v64, rtol=1e-12, atol=1e-12 * np.abs(d64.T @ v64).max())
    np.testing.assert_allclose(st.target_sq, (v64**2).sum(0), rtol=1e-12)
    assert int(st.n_rows) == N
    assert st.gram.dtype == np.float64


def test_nnls_matches_scipy_and_kkt(problem):
    kind, d, v, st = problem
    res = u.solve(st, "nnls")
    assert res.coef.shape == (T, K) and res.converged.all()
    d64, v64 = f64(d), f64(v)
    g, c = d64.T @ d64, d64.T @ v64
    for t in range(T):
        ref, _ = scipy_nnls(d64, v64[:, t], maxiter=100 * K)
        ours_obj = np.sum((v64[:, t] - d64 @ res.coef[t]) ** 2)
        ref_obj = np.sum((v64[:, t] - d64 @ ref) ** 2)
        assert ours_obj <= ref_obj * (1 + REL), (kind, t, ours_obj, ref_obj)
        # KKT: a ≥ 0, gradient ≥ 0 where a = 0, gradient = 0 where a > 0.
        a, grad = res.coef[t], g @ res.coef[t] - c[:, t]
        assert np.all(a >= 0)
        assert np.max(np.abs(np.minimum(a, grad))) <= 1e-8 * np.abs(c[:, t]).max()


@pytest.mark.parametrize("positive", [True, False])
@pytest.mark.parametrize("alpha,l1_ratio", [(1e-6, 1.0), (1e-3, 1.0), (1e-4, 0.5), (1e-2, 0.1)])
def test_lasso_elastic_net_match_sklearn(problem, positive, alpha, l1_ratio):
    kind, d, v, st = problem
    d64, v64 = f64(d), f64(v)
    if l1_ratio == 1.0:
        res = u.solve(st, "lasso", alpha=alpha, positive=positive)
        make = lambda: Lasso(alpha=alpha, fit_intercept=False, positive=positive, tol=1e-12, max_iter=200_000)
    else:
        res = u.solve(st, "elastic_net", alpha=alpha, l1_ratio=l1_ratio, positive=positive)
        make = lambda: ElasticNet(alpha=alpha, l1_ratio=l1_ratio, fit_intercept=False, positive=positive,
                                  tol=1e-12, max_iter=200_000)
    assert res.converged.all(), res.error

    def objective(a, t):
        r = v64[:, t] - d64 @ a
        return r @ r / (2 * N) + alpha * l1_ratio * np.abs(a).sum() + 0.5 * alpha * (1 - l1_ratio) * a @ a

    for t in range(T):
        ref = make().fit(d64, v64[:, t]).coef_
        ours, theirs = objective(res.coef[t], t), objective(ref, t)
        assert ours <= theirs * (1 + REL), (kind, t, ours, theirs)
        if positive:
            assert np.all(res.coef[t] >= 0)
    # Our own certificate: the duality gap (sklearn's formula) is tiny.
    assert np.all(res.error <= 1e-10)


@pytest.mark.parametrize("alpha", [1e-8, 1e-4, 1e-2, 1.0])
def test_ridge_matches_sklearn_cholesky(problem, alpha):
    kind, d, v, st = problem
    res = u.solve(st, "ridge", alpha=alpha)
    ref = Ridge(alpha=alpha, fit_intercept=False, solver="cholesky").fit(f64(d), f64(v)).coef_
    tol = 1e-6 if kind != "illcond" else 1e-4  # both sides solve a κ(G)=1e6 system
    np.testing.assert_allclose(res.coef, ref, rtol=tol, atol=tol * np.abs(ref).max())

    def objective(a):
        r = f64(v) - f64(d) @ a.T
        return (r**2).sum(0) + alpha * (a**2).sum(1)

    np.testing.assert_array_less(objective(res.coef), objective(ref) * (1 + REL) + 1e-300)


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_omp_matches_sklearn_gram_omp(problem, k):
    kind, d, v, st = problem
    res = u.solve(st, "omp", n_nonzero_coefs=k)
    d64 = f64(d)
    norms = np.linalg.norm(d64, axis=0)
    dn = d64 / norms
    ref = orthogonal_mp_gram(dn.T @ dn, dn.T @ f64(v), n_nonzero_coefs=k).T / norms  # (T, K)
    np.testing.assert_array_equal(res.coef != 0, ref != 0, err_msg=kind)
    np.testing.assert_allclose(res.coef, ref, rtol=1e-6, atol=1e-8 * np.abs(ref).max())
    assert np.all(res.n_iter == k)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.6])
def test_dot_matches_numpy_formula(problem, threshold):
    _, d, v, st = problem
    d64, v64 = f64(d), f64(v)
    res = u.solve(st, "dot", threshold=threshold)
    cos = (d64.T @ v64) / (np.linalg.norm(d64, axis=0)[:, None] * np.linalg.norm(v64, axis=0)[None, :])
    for t in range(T):
        sel = (cos[:, t] >= threshold) & (cos[:, t] > 0)
        expect = np.zeros(K)
        if sel.any():
            expect[sel] = np.linalg.lstsq(d64[:, sel], v64[:, t], rcond=None)[0]
        np.testing.assert_allclose(res.coef[t], expect, rtol=1e-6, atol=1e-9 * max(1, np.abs(expect).max()))


def test_recon_error_matches_direct_formula(problem):
    _, d, v, st = problem
    res = u.solve(st, "nnls")
    d64, v64 = f64(d), f64(v)
    rec = d64 @ res.coef.T
    cos = (rec * v64).sum(0) / (np.linalg.norm(rec, axis=0) * np.linalg.norm(v64, axis=0))
    np.testing.assert_allclose(res.recon_error, 1 - np.maximum(cos, 0) ** 2, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.unexplained, ((v64 - rec) ** 2).sum(0) / (v64**2).sum(0), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("method,params", [("nnls", {}), ("lasso", {"alpha": 1e-4}), ("omp", {"n_nonzero_coefs": 3}),
                                           ("ridge", {"alpha": 1e-3}), ("elastic_net", {"alpha": 1e-4, "l1_ratio": 0.5}),
                                           ("dot", {"threshold": 0.2})])
def test_batched_equals_one_target_at_a_time(method, params):
    """vmap over targets gives each target what it gets alone (finished lanes are frozen)."""
    d = make_dictionary("illcond")
    v, _ = make_targets(d)
    st = u.gram_stats(d, v)
    full = u.solve(st, method, **params)
    for t in range(T):
        one = u.solve(st.select_targets([t]), method, **params)
        # Same iterations; values equal up to the summation order of batched vs unbatched matmuls.
        np.testing.assert_allclose(one.coef[0], full.coef[t], rtol=1e-9, atol=1e-12)
        assert one.n_iter[0] == full.n_iter[t]


def test_new_hyper_parameters_do_not_recompile():
    d = make_dictionary("random")
    v, _ = make_targets(d)
    st = u.gram_stats(d, v)
    u.solve(st, "lasso", alpha=1e-3)
    before = solve_batched._cache_size()
    for alpha in (1e-4, 2e-4, 5e-2):
        u.solve(st, "lasso", alpha=alpha)
    assert solve_batched._cache_size() == before
