"""Ridge regression in Gram space (scikit-learn's objective, no 1/n and no ½):

    min_a ‖v − Da‖² + α‖a‖²  ⇔  (G + αI) a = c

Pivoted-Cholesky solve (``psd_solve``); when ``G + αI`` is singular (α = 0 with duplicate or zero
atoms) it returns the minimum-norm least-squares solution; zero atoms are left out so their
coefficient is exactly 0.
Reference: ``sklearn.linear_model.Ridge(solver="cholesky", fit_intercept=False)``.
"""

from __future__ import annotations

import jax.numpy as jnp

from unmerge_jax.solvers.common import Problem, SolverResult, masked_solve


def ridge_error(p: Problem, alpha, x):
    """``‖(G + αI)x − c‖∞ / ‖c‖∞``: the ridge normal equations' relative residual at ``x``."""
    k = p.cross.shape[0]
    a_mat = p.gram + alpha * jnp.eye(k, dtype=p.gram.dtype)
    scale = jnp.maximum(jnp.max(jnp.abs(p.cross)), jnp.finfo(p.cross.dtype).tiny)
    return jnp.max(jnp.abs(a_mat @ x - p.cross)) / scale


def ridge(p: Problem, alpha, *, full_rank: bool = False) -> SolverResult:
    """Ridge for one target. ``error`` is :func:`ridge_error`."""
    alpha = jnp.asarray(alpha, p.cross.dtype)
    x = masked_solve(p.gram, p.cross, jnp.diag(p.gram) > 0, shift=alpha, full_rank=full_rank)
    err = ridge_error(p, alpha, x)
    return SolverResult(x, jnp.asarray(1, jnp.int32), err <= 1e-8, err)
