"""Non-negative least squares in Gram space.

    min_{a ≥ 0} ‖v − Da‖²  ⇔  min_{a ≥ 0} ½aᵀGa − cᵀa

Accelerated projected gradient (FISTA, step 1/λmax(G), adaptive restart); after every block of
steps the iterate's support is polished by an exact solve of ``G_SS a_S = c_S``, which is accepted
when it does not worsen the KKT residual — so ill-conditioned problems (κ(G) = 1e6) finish in a
few hundred steps with the exact Lawson–Hanson answer instead of crawling towards it.

Stopping rule (KKT): ``‖min(a, Ga − c)‖∞ ≤ tol · ‖c‖∞``.
Reference: ``scipy.optimize.nnls(D, v)``; with ``G = RᵀR`` it equals ``nnls(R, R⁻ᵀc)``.
"""

from __future__ import annotations

import jax.numpy as jnp

from unmerge_jax.solvers.common import Problem, SolverResult, fista, masked_solve


def nnls_kkt(p: Problem, a):
    """``‖min(a, Ga − c)‖∞ / max(‖c‖∞, tiny)``: 0 exactly at the NNLS optimum."""
    g = p.gram @ a - p.cross
    scale = jnp.maximum(jnp.max(jnp.abs(p.cross)), jnp.finfo(a.dtype).tiny)
    return jnp.max(jnp.abs(jnp.minimum(a, g))) / scale


def nnls(p: Problem, *, tol: float = 1e-10, max_iter: int = 20000, block: int = 10,
         full_rank: bool = False) -> SolverResult:
    """Solve one NNLS problem. Returns :class:`SolverResult`; ``error`` is the relative KKT residual."""

    def grad_prox(y, step):
        return jnp.maximum(y - step * (p.gram @ y - p.cross), 0.0)

    def polish(a):
        x = masked_solve(p.gram, p.cross, a > 0, full_rank=full_rank)
        # Infeasible polish (support not yet right) falls back to the projected point.
        return jnp.maximum(x, 0.0)

    a0 = jnp.zeros_like(p.cross)
    a, n_iter, converged, err = fista(grad_prox, lambda a: nnls_kkt(p, a), polish, a0, p.lipschitz,
                                      tol=tol, max_iter=max_iter, block=block)
    return SolverResult(a, n_iter, converged, err)
