"""Lasso and ElasticNet in Gram space, with scikit-learn's objective and tolerance.

scikit-learn (``fit_intercept=False``) minimises over the n×K problem

    (1/2n)‖v − Da‖² + αρ‖a‖₁ + ½α(1−ρ)‖a‖²          (ρ = l1_ratio; Lasso: ρ = 1)

Multiplying by n, in Gram space:

    ½aᵀGa − cᵀa + l1‖a‖₁ + ½ l2‖a‖²,   l1 = nαρ,  l2 = nα(1−ρ)

Solved by FISTA (soft-threshold prox, ``positive`` clips at 0), restarts, and support/sign
polishing: on the current support S with signs s, ``(G_SS + l2 I) a_S = c_S − l1 s_S``, accepted
when it lowers the duality gap. Stop when the duality gap (scikit-learn's formula, which needs only
G, c and ‖v‖²) is ≤ ``tol · ‖v‖²`` — scikit-learn's meaning of ``tol``.
"""

from __future__ import annotations

import jax.numpy as jnp

from unmerge_jax.solvers.common import Problem, SolverResult, fista, masked_solve


def enet_penalties(p: Problem, alpha, l1_ratio):
    """scikit-learn's ``(l1_reg, l2_reg)`` = ``(nαρ, nα(1−ρ))``."""
    n = p.n_rows.astype(p.cross.dtype)
    return n * alpha * l1_ratio, n * alpha * (1.0 - l1_ratio)


def enet_objective(p: Problem, a, alpha, l1_ratio):
    """scikit-learn's ElasticNet objective ``(1/2n)‖v − Da‖² + αρ‖a‖₁ + ½α(1−ρ)‖a‖²``."""
    n = p.n_rows.astype(p.cross.dtype)
    rss = p.target_sq - 2.0 * p.cross @ a + a @ (p.gram @ a)
    return 0.5 * jnp.maximum(rss, 0.0) / n + alpha * l1_ratio * jnp.sum(jnp.abs(a)) + 0.5 * alpha * (1.0 - l1_ratio) * a @ a


def enet_gap(p: Problem, a, l1, l2, positive: bool):
    """Duality gap of the n-scaled problem (scikit-learn's ``enet_coordinate_descent_gram``)."""
    ga = p.gram @ a
    r_norm2 = jnp.maximum(p.target_sq - 2.0 * p.cross @ a + a @ ga, 0.0)
    xt_r = p.cross - ga - l2 * a  # Xᵀ(y − Xw) − l2·w
    dual_norm = jnp.max(xt_r) if positive else jnp.max(jnp.abs(xt_r))
    big = dual_norm > l1
    const = jnp.where(big, l1 / jnp.where(big, dual_norm, 1.0), 1.0)
    gap = jnp.where(big, 0.5 * (r_norm2 + r_norm2 * const**2), r_norm2)
    r_dot_y = p.target_sq - p.cross @ a
    gap = gap + l1 * jnp.sum(jnp.abs(a)) - const * r_dot_y + 0.5 * l2 * (1.0 + const**2) * (a @ a)
    return jnp.maximum(gap, 0.0)


def elastic_net(p: Problem, alpha, l1_ratio, *, positive: bool = False, tol: float = 1e-10,
                max_iter: int = 20000, block: int = 10, full_rank: bool = False) -> SolverResult:
    """ElasticNet for one target; ``alpha``/``l1_ratio`` are arrays so a grid shares one program.

    ``error`` is the duality gap divided by ``‖v‖²`` (the quantity compared with ``tol``).
    """
    alpha = jnp.asarray(alpha, p.cross.dtype)
    l1_ratio = jnp.asarray(l1_ratio, p.cross.dtype)
    l1, l2 = enet_penalties(p, alpha, l1_ratio)
    scale = jnp.maximum(p.target_sq, jnp.finfo(p.cross.dtype).tiny)

    def grad_prox(y, step):
        z = y - step * (p.gram @ y - p.cross + l2 * y)
        shrunk = jnp.maximum(jnp.abs(z) - step * l1, 0.0)
        return jnp.maximum(z - step * l1, 0.0) if positive else jnp.sign(z) * shrunk

    def polish(a):
        # Solve on the support with FISTA's signs s, re-take s = sign(x) once and solve again:
        # near the optimum of a tiny-alpha problem FISTA's signs on small entries can be wrong,
        # and one correction fixes them in practice (three rounds gave identical iteration counts
        # on random, correlated and ill-conditioned dictionaries, at two more solves per block).
        # The caller accepts the result only if it meets the tolerance, so a wrong sign costs a
        # block, never accuracy.
        support = a != 0

        def solve_with(s):
            x = masked_solve(p.gram, p.cross - l1 * s, support, shift=l2, full_rank=full_rank)
            return jnp.maximum(x, 0.0) if positive else x

        s = jnp.sign(a)
        x = solve_with(s)
        if positive:
            # Non-negative: s = 1 on the support and the clipped x never changes sign, so the
            # corrected signs equal s and the second solve would repeat the first.
            return x
        return solve_with(jnp.where(x != 0, jnp.sign(x), s))

    def gap(a):
        return enet_gap(p, a, l1, l2, positive) / scale

    a0 = jnp.zeros_like(p.cross)
    a, n_iter, converged, err = fista(grad_prox, gap, polish, a0, p.lipschitz + l2,
                                      tol=tol, max_iter=max_iter, block=block)
    return SolverResult(a, n_iter, converged, err)


def lasso(p: Problem, alpha, *, positive: bool = False, tol: float = 1e-10, max_iter: int = 20000,
          block: int = 10, full_rank: bool = False) -> SolverResult:
    """Lasso = ElasticNet with ``l1_ratio = 1`` (scikit-learn's ``Lasso``)."""
    return elastic_net(p, alpha, 1.0, positive=positive, tol=tol, max_iter=max_iter, block=block,
                       full_rank=full_rank)
