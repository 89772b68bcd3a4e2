"""The checks every ``unmerge_jax.SOLVERS`` entry must pass, parametrised over the registry itself.

Registering a solver makes every test here run on it, and each test looks the solver up in
:data:`ENTRIES` — the parameter sets it is checked at, its independent float64 reference and its
optimality conditions. A registered solver without an entry FAILS here (``KeyError``); it is
never skipped. The references:

  nnls         scipy.optimize.nnls on the n×K problem
  lasso/enet   sklearn Lasso / ElasticNet (fit_intercept=False), positive and signed
  ridge        sklearn Ridge(solver="cholesky")
  omp          sklearn orthogonal_mp_gram on unit-norm atoms (identical supports)
  dot          a direct NumPy formula: cosine selection, least squares on the selected atoms

Each is checked on three dictionaries built from float32 data — random, correlated (pairwise
cos ≈ 0.9) and ill-conditioned (κ(D) ≈ 1e3) — and must also satisfy its optimality (KKT)
conditions in Gram space, give each target under ``vmap`` what it gets alone, not recompile on
a second call with new hyper-parameter values and data, return float64, and handle degenerate
dictionaries (one atom, duplicate atoms, a zero atom, a zero target).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import chex
import numpy as np
import pytest
from scipy.optimize import nnls as scipy_nnls
from sklearn.linear_model import ElasticNet, Lasso, Ridge, orthogonal_mp_gram

import unmerge_jax as u
from tests._problems import KINDS, K, N, T, f64, make_dictionary, make_targets, rand
from unmerge_jax.solve import solve_batched
from unmerge_jax.solvers import SOLVERS

REL = 1e-6  # objective tolerance vs the references
KKT_TOL = 1e-8  # optimality residuals, relative to max |Dᵀv|


# ---- references -------------------------------------------------------------------------------
def ref_nnls(d64, v64, params):
    return np.stack([scipy_nnls(d64, v64[:, t], maxiter=100 * K)[0] for t in range(v64.shape[1])])


def _sklearn_enet(d64, v64, params, l1_ratio):
    alpha, positive = params["alpha"], params.get("positive", True)
    if l1_ratio == 1.0:
        model = lambda: Lasso(alpha=alpha, fit_intercept=False, positive=positive, tol=1e-12, max_iter=200_000)  # noqa: E731
    else:
        model = lambda: ElasticNet(alpha=alpha, l1_ratio=l1_ratio, fit_intercept=False, positive=positive,  # noqa: E731
                                   tol=1e-12, max_iter=200_000)
    return np.stack([model().fit(d64, v64[:, t]).coef_ for t in range(v64.shape[1])])


def ref_lasso(d64, v64, params):
    return _sklearn_enet(d64, v64, params, 1.0)


def ref_elastic_net(d64, v64, params):
    return _sklearn_enet(d64, v64, params, params["l1_ratio"])


def ref_ridge(d64, v64, params):
    return Ridge(alpha=params["alpha"], fit_intercept=False, solver="cholesky").fit(d64, v64).coef_


def ref_omp(d64, v64, params):
    norms = np.linalg.norm(d64, axis=0)
    dn = d64 / norms
    return orthogonal_mp_gram(dn.T @ dn, dn.T @ v64, n_nonzero_coefs=params["n_nonzero_coefs"]).T / norms


def ref_dot(d64, v64, params):
    cos = (d64.T @ v64) / (np.linalg.norm(d64, axis=0)[:, None] * np.linalg.norm(v64, axis=0)[None, :])
    out = np.zeros((v64.shape[1], d64.shape[1]))
    for t in range(v64.shape[1]):
        sel = (cos[:, t] >= params["threshold"]) & (cos[:, t] > 0)
        if sel.any():
            out[t, sel] = np.linalg.lstsq(d64[:, sel], v64[:, t], rcond=None)[0]
    return out


# ---- comparisons with the reference -----------------------------------------------------------
def same_or_better_objective(objective):
    """Ours reaches the reference's objective within REL (the optimum is unique up to REL)."""

    def compare(res, ref, d64, v64, params, kind):
        for t in range(v64.shape[1]):
            ours, theirs = objective(res.coef[t], d64, v64[:, t], params), objective(ref[t], d64, v64[:, t], params)
            assert ours <= theirs * (1 + REL), (kind, t, ours, theirs)

    return compare


def _lsq(a, d64, v, params):
    r = v - d64 @ a
    return r @ r


def _enet(a, d64, v, params):
    alpha, rho = params["alpha"], params.get("l1_ratio", 1.0)
    r = v - d64 @ a
    return r @ r / (2 * N) + alpha * rho * np.abs(a).sum() + 0.5 * alpha * (1 - rho) * a @ a


def _ridge(a, d64, v, params):
    r = v - d64 @ a
    return r @ r + params["alpha"] * a @ a


def compare_nnls(res, ref, d64, v64, params, kind):
    assert res.coef.shape == (T, K) and res.converged.all()
    same_or_better_objective(_lsq)(res, ref, d64, v64, params, kind)


def compare_enet(res, ref, d64, v64, params, kind):
    assert res.converged.all(), res.error
    same_or_better_objective(_enet)(res, ref, d64, v64, params, kind)
    if params.get("positive", True):
        assert np.all(res.coef >= 0)
    assert np.all(res.error <= 1e-10)  # our own certificate: the duality gap (sklearn's formula)


def compare_ridge(res, ref, d64, v64, params, kind):
    tol = 1e-6 if kind != "illcond" else 1e-4  # both sides solve a κ(G)=1e6 system
    np.testing.assert_allclose(res.coef, ref, rtol=tol, atol=tol * np.abs(ref).max())
    obj = lambda a: ((v64 - d64 @ a.T) ** 2).sum(0) + params["alpha"] * (a ** 2).sum(1)  # noqa: E731
    np.testing.assert_array_less(obj(res.coef), obj(ref) * (1 + REL) + 1e-300)


def compare_omp(res, ref, d64, v64, params, kind):
    np.testing.assert_array_equal(res.coef != 0, ref != 0, err_msg=kind)
    np.testing.assert_allclose(res.coef, ref, rtol=1e-6, atol=1e-8 * np.abs(ref).max())
    assert np.all(res.n_iter == params["n_nonzero_coefs"])


def compare_dot(res, ref, d64, v64, params, kind):
    for t in range(T):
        np.testing.assert_allclose(res.coef[t], ref[t], rtol=1e-6, atol=1e-9 * max(1, np.abs(ref[t]).max()))


# ---- optimality conditions in Gram space (G = DᵀD, c = Dᵀv, n rows) ---------------------------
def _scale(c):
    return np.abs(c).max()


def kkt_nnls(g, c, vv, n, a, params):
    """a ≥ 0; gradient Ga − c ≥ 0 where a = 0 and = 0 where a > 0: min(a, Ga − c) = 0."""
    assert np.all(a >= 0)
    assert np.max(np.abs(np.minimum(a, g @ a - c))) <= KKT_TOL * _scale(c)


def kkt_enet(g, c, vv, n, a, params):
    """Subgradient of ½aᵀGa − cᵀa + nαρ‖a‖₁ + ½nα(1−ρ)‖a‖²: with g = Ga − c + nα(1−ρ)a, λ = nαρ,
    g_i = −λ·sign(a_i) where a_i ≠ 0; |g_i| ≤ λ (signed) or g_i ≥ −λ (positive) where a_i = 0."""
    alpha, rho = params["alpha"], params.get("l1_ratio", 1.0)
    lam = n * alpha * rho
    grad = g @ a - c + n * alpha * (1 - rho) * a
    on = a != 0
    assert np.max(np.abs(grad[on] + lam * np.sign(a[on])), initial=0.0) <= KKT_TOL * _scale(c)
    if params.get("positive", True):
        assert np.all(a >= 0)
        assert np.all(grad[~on] >= -lam - KKT_TOL * _scale(c))
    else:
        assert np.all(np.abs(grad[~on]) <= lam + KKT_TOL * _scale(c))


def kkt_ridge(g, c, vv, n, a, params):
    """Normal equations (G + αI)a = c."""
    assert np.max(np.abs((g + params["alpha"] * np.eye(len(c))) @ a - c)) <= KKT_TOL * _scale(c)


def _support_least_squares(g, c, a, support):
    """Zero off the support; the normal equations G_SS a_S = c_S on it."""
    np.testing.assert_array_equal(a[~support], 0.0)
    s = np.flatnonzero(support)
    assert np.max(np.abs(g[np.ix_(s, s)] @ a[s] - c[s]), initial=0.0) <= KKT_TOL * _scale(c)


def kkt_omp(g, c, vv, n, a, params):
    """k atoms (K ≥ k, full rank here) and the least-squares optimum on them."""
    support = a != 0
    assert support.sum() == params["n_nonzero_coefs"]
    _support_least_squares(g, c, a, support)


def kkt_dot(g, c, vv, n, a, params):
    """The atoms with cos(v, d_i) ≥ threshold (and > 0), least squares on them."""
    cos = c / (np.sqrt(np.diag(g)) * np.sqrt(vv))
    _support_least_squares(g, c, a, (cos >= params["threshold"]) & (cos > 0))


# ---- the registry's entries -------------------------------------------------------------------
class Entry(NamedTuple):
    """How one solver is checked.

    Attributes:
      cases: parameter sets compared with the reference (and checked for optimality).
      reference: ``(D, V, params) -> (T, K)`` float64 coefficients from an independent library.
      compare: asserts the solve result agrees with the reference.
      kkt: asserts the optimality conditions of one target's coefficients.
      typical: one parameter set for the vmap and reconstruction checks.
      edge: one parameter set for the degenerate dictionaries.
      retrace: parameter sets with the same static options: none may recompile after the first.
    """

    cases: tuple
    reference: Callable
    compare: Callable
    kkt: Callable
    typical: dict
    edge: dict
    retrace: tuple


ENTRIES = {
    "nnls": Entry(({},), ref_nnls, compare_nnls, kkt_nnls, {}, {}, ({}, {})),
    "lasso": Entry(tuple({"alpha": a, "positive": p} for p in (True, False) for a in (1e-6, 1e-3)),
                   ref_lasso, compare_enet, kkt_enet, {"alpha": 1e-4}, {"alpha": 1e-4},
                   ({"alpha": 1e-3}, {"alpha": 1e-4}, {"alpha": 2e-4}, {"alpha": 5e-2})),
    "elastic_net": Entry(tuple({"alpha": a, "l1_ratio": r, "positive": p} for p in (True, False)
                               for a, r in ((1e-4, 0.5), (1e-2, 0.1))),
                         ref_elastic_net, compare_enet, kkt_enet, {"alpha": 1e-4, "l1_ratio": 0.5},
                         {"alpha": 1e-4, "l1_ratio": 0.5},
                         ({"alpha": 1e-4, "l1_ratio": 0.5}, {"alpha": 1e-3, "l1_ratio": 0.9})),
    "ridge": Entry(tuple({"alpha": a} for a in (1e-8, 1e-4, 1e-2, 1.0)), ref_ridge, compare_ridge, kkt_ridge,
                   {"alpha": 1e-3}, {"alpha": 0.0}, ({"alpha": 1e-4}, {"alpha": 1e-1})),
    "omp": Entry(tuple({"n_nonzero_coefs": k} for k in (1, 3, 5, 8)), ref_omp, compare_omp, kkt_omp,
                 {"n_nonzero_coefs": 3}, {"n_nonzero_coefs": 3},
                 ({"n_nonzero_coefs": 2, "max_atoms": 4}, {"n_nonzero_coefs": 4, "max_atoms": 4})),
    "dot": Entry(tuple({"threshold": x} for x in (0.0, 0.3, 0.6)), ref_dot, compare_dot, kkt_dot,
                 {"threshold": 0.2}, {"threshold": 0.1}, ({"threshold": 0.05}, {"threshold": 0.3})),
}

SOLVER_NAMES = sorted(SOLVERS)


@functools.lru_cache(maxsize=None)
def problem(kind):
    d = make_dictionary(kind)
    v, _ = make_targets(d)
    return d, v, u.gram_stats(d, v)


def test_every_registered_solver_has_an_entry():
    assert set(ENTRIES) == set(SOLVERS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", SOLVER_NAMES)
def test_matches_independent_reference(method, kind):
    entry = ENTRIES[method]
    d, v, st = problem(kind)
    for params in entry.cases:
        res = u.solve(st, method, **params)
        entry.compare(res, entry.reference(f64(d), f64(v), params), f64(d), f64(v), params, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", SOLVER_NAMES)
def test_optimality_conditions_hold(method, kind):
    entry = ENTRIES[method]
    _, _, st = problem(kind)
    g, c, vv, n = f64(st.gram), f64(st.cross), f64(st.target_sq), float(st.n_rows)
    for params in entry.cases:
        res = u.solve(st, method, **params)
        for t in range(T):
            entry.kkt(g, c[:, t], vv[t], n, np.asarray(res.coef[t]), params)


@pytest.mark.parametrize("method", SOLVER_NAMES)
def test_vmap_over_targets_equals_a_python_loop(method):
    """vmap over targets gives each target what it gets alone (finished lanes are frozen)."""
    params = ENTRIES[method].typical
    _, _, st = problem("illcond")
    full = u.solve(st, method, **params)
    for t in range(T):
        one = u.solve(st.select_targets([t]), method, **params)
        # Same iterations; values equal up to the summation order of batched vs unbatched matmuls.
        np.testing.assert_allclose(one.coef[0], full.coef[t], rtol=1e-9, atol=1e-12)
        assert one.n_iter[0] == full.n_iter[t]


@pytest.mark.parametrize("method", SOLVER_NAMES)
def test_second_call_does_not_recompile(method, monkeypatch):
    """New hyper-parameter values and new data of the same shapes reuse the compiled program.

    Shapes (K=5, T=3) no other test uses, so the first call traces the solver here; the solver
    is wrapped in ``chex.assert_max_traces(n=1)`` and the jit cache must not grow."""
    spec = SOLVERS[method]
    monkeypatch.setenv("UNMERGE_PROGRAM_CACHE", "0")  # counted through jax.jit's own cache
    chex.clear_trace_counter()
    monkeypatch.setitem(SOLVERS, method, spec._replace(fn=chex.assert_max_traces(spec.fn, n=1)))
    variants = ENTRIES[method].retrace
    assert len(variants) >= 2
    u.solve(u.gram_stats(*rand(seed=0, k=5, t=3)), method, **variants[0])
    before = solve_batched._cache_size()
    for seed, params in enumerate(variants[1:], start=1):
        u.solve(u.gram_stats(*rand(seed=seed, k=5, t=3)), method, **params)
    assert solve_batched._cache_size() == before


@pytest.mark.parametrize("method", SOLVER_NAMES)
def test_results_are_float64(method):
    _, _, st = problem("random")
    res = u.solve(st, method, **ENTRIES[method].typical)
    for field in ("coef", "recon_error", "cosine", "residual_sq", "unexplained", "error"):
        assert np.asarray(getattr(res, field)).dtype == np.float64, field


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", SOLVER_NAMES)
def test_reconstruction_metrics_match_direct_formula(method, kind):
    d, v, st = problem(kind)
    res = u.solve(st, method, **ENTRIES[method].typical)
    d64, v64 = f64(d), f64(v)
    rec = d64 @ res.coef.T
    cos = (rec * v64).sum(0) / (np.linalg.norm(rec, axis=0) * np.linalg.norm(v64, axis=0))
    np.testing.assert_allclose(res.recon_error, 1 - np.maximum(cos, 0) ** 2, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.unexplained, ((v64 - rec) ** 2).sum(0) / (v64**2).sum(0), rtol=1e-8, atol=1e-12)


# ---- degenerate dictionaries ------------------------------------------------------------------
@pytest.mark.parametrize("method", SOLVER_NAMES)
def test_single_atom(method):
    rng = np.random.default_rng(0)
    d = rng.standard_normal((N, 1))
    v = 0.7 * d + 0.01 * rng.standard_normal((N, T))
    params = dict(ENTRIES[method].edge, **({"n_nonzero_coefs": 1} if method == "omp" else {}))
    res = u.decompose(d, v, method, **params)
    assert res.coef.shape == (T, 1)
    expect = np.linalg.lstsq(d, v, rcond=None)[0][0]
    np.testing.assert_allclose(res.coef[:, 0], expect, rtol=2e-2)


@pytest.mark.parametrize("method", SOLVER_NAMES)
def test_duplicate_atoms_give_finite_coefficients(method):
    """A singular Gram (two equal atoms) gives finite coefficients; each solver's own answer on it
    is checked in tests/test_solvers.py."""
    d, v = rand()
    d[:, 3] = d[:, 2]  # G is singular
    res = u.decompose(d, v, method, **ENTRIES[method].edge)
    assert np.all(np.isfinite(res.coef))


@pytest.mark.parametrize("method", SOLVER_NAMES)
def test_zero_target(method):
    d, v = rand()
    v[:, 1] = 0.0
    res = u.decompose(d, v, method, **ENTRIES[method].edge)
    np.testing.assert_array_equal(res.coef[1], 0.0)
    assert res.recon_error[1] == 0.0 and res.unexplained[1] == 0.0
    assert bool(res.converged[1])


@pytest.mark.parametrize("method", SOLVER_NAMES)
def test_zero_atom_gets_zero_weight(method):
    d, v = rand()
    d[:, 5] = 0.0
    res = u.decompose(d, v, method, **ENTRIES[method].edge)
    assert np.all(np.isfinite(res.coef))
    np.testing.assert_array_equal(res.coef[:, 5], 0.0)
