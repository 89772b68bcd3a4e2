"""Ridge and dot-product thresholding as one compiled program.

Both are one masked solve ``(G_SS + shift·I) a_S = c_S`` (``common.masked_solve``): Ridge on every
non-zero atom with ``shift = α``, dot-product thresholding on the atoms whose cosine clears the
threshold with ``shift = 0``. A sweep over both families therefore runs them as lanes of one
program, ``by_score`` (a swept 0/1 value) choosing the family per grid point, instead of compiling
two programs. Each lane does the arithmetic of :func:`~unmerge_jax.solvers.ridge.ridge` or
:func:`~unmerge_jax.solvers.dot.dot` and reports that solver's iteration count, convergence flag
and error measure; coefficients equal theirs to rounding, with the same support (tested: XLA
vectorises the same arithmetic by batch shape, and here the support varies along the grid axis).
"""

from __future__ import annotations

import jax.numpy as jnp

from unmerge_jax.solvers.common import Problem, SolverResult, masked_solve
from unmerge_jax.solvers.dot import cosine_selection, largest_unselected
from unmerge_jax.solvers.ridge import ridge_error


def support_solve(p: Problem, alpha, threshold, by_score, *, coef: str = "lstsq",
                  full_rank: bool = False) -> SolverResult:
    """Ridge (``by_score = 0``, penalty ``alpha``) or dot-product thresholding (``by_score = 1``,
    ``threshold``; ``coef`` as :func:`~unmerge_jax.solvers.dot.dot`'s) for one target."""
    alpha = jnp.asarray(alpha, p.cross.dtype)
    is_dot = jnp.asarray(by_score, p.cross.dtype) > 0
    scores, selected = cosine_selection(p, threshold)
    shift = jnp.where(is_dot, jnp.zeros_like(alpha), alpha)
    mask = jnp.where(is_dot, selected, jnp.diag(p.gram) > 0)
    x = masked_solve(p.gram, p.cross, mask, shift=shift, full_rank=full_rank)
    if coef == "score":
        x = jnp.where(is_dot, jnp.where(selected, scores, 0.0), x)
    ridge_err = ridge_error(p, alpha, x)
    return SolverResult(x,
                        jnp.where(is_dot, jnp.sum(selected), 1).astype(jnp.int32),
                        jnp.where(is_dot, True, ridge_err <= 1e-8),
                        jnp.where(is_dot, largest_unselected(scores, selected), ridge_err))
