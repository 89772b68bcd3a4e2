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
from unmerge_jax.solvers.dot import cosine_scores


def support_solve(p: Problem, alpha, threshold, by_score, *, coef: str = "lstsq",
                  full_rank: bool = False) -> SolverResult:
    """Ridge (``by_score = 0``, penalty ``alpha``) or dot-product thresholding (``by_score = 1``,
    ``threshold``; ``coef`` as :func:`~unmerge_jax.solvers.dot.dot`'s) for one target."""
    dtype = p.cross.dtype
    alpha = jnp.asarray(alpha, dtype)
    is_dot = jnp.asarray(by_score, dtype) > 0
    scores = cosine_scores(p)
    selected = (scores >= threshold) & (scores > 0)
    nonzero = jnp.diag(p.gram) > 0
    shift = jnp.where(is_dot, jnp.zeros_like(alpha), alpha)
    x = masked_solve(p.gram, p.cross, jnp.where(is_dot, selected, nonzero), shift=shift, full_rank=full_rank)
    if coef == "score":
        x = jnp.where(is_dot, jnp.where(selected, scores, 0.0), x)
    # Ridge's error: ‖(G + αI)a − c‖∞ / ‖c‖∞; dot's: the largest unselected score.
    k = p.cross.shape[0]
    scale = jnp.maximum(jnp.max(jnp.abs(p.cross)), jnp.finfo(dtype).tiny)
    ridge_err = jnp.max(jnp.abs((p.gram + alpha * jnp.eye(k, dtype=p.gram.dtype)) @ x - p.cross)) / scale
    left = jnp.max(jnp.where(selected, -jnp.inf, scores), initial=-jnp.inf)
    return SolverResult(x,
                        jnp.where(is_dot, jnp.sum(selected), 1).astype(jnp.int32),
                        jnp.where(is_dot, True, ridge_err <= 1e-8),
                        jnp.where(is_dot, left, ridge_err))
