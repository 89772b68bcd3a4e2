"""Pieces every Gram-space solver shares: the problem/result pytrees, masked solves, the loop.

A solver sees one target at a time (drivers ``vmap`` it over targets × hyper-parameters × seeds):

    Problem(gram (K,K), cross (K,), target_sq (), n_rows (), lipschitz ())

and returns ``SolverResult(coef (K,), n_iter, converged, error)`` where ``error`` is the solver's
own optimality measure (KKT residual, duality gap, ...). Everything is float64.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Problem(NamedTuple):
    """One target's decomposition problem in Gram space (float64).

    Attributes:
      gram: (K, K) ``DᵀD``.
      cross: (K,) ``Dᵀv``.
      target_sq: () ``‖v‖²``.
      n_rows: () number of rows n (scikit-learn's ``n_samples``).
      lipschitz: () ``λmax(G)``, shared by all targets with the same ``gram``.
    """

    gram: jax.Array
    cross: jax.Array
    target_sq: jax.Array
    n_rows: jax.Array
    lipschitz: jax.Array


class SolverResult(NamedTuple):
    """Per-target outcome.

    Attributes:
      coef: (K,) coefficients.
      n_iter: () iterations (FISTA steps; atoms for OMP; 1 for direct solves).
      converged: () bool, the stopping criterion was met within ``max_iter``.
      error: () the final optimality measure the criterion tested (see each solver).
    """

    coef: jax.Array
    n_iter: jax.Array
    converged: jax.Array
    error: jax.Array


def quad_objective(p: Problem, a):
    """``‖v − Da‖² = ‖v‖² − 2cᵀa + aᵀGa``, clamped at 0 (it cancels badly near an exact fit)."""
    return jnp.maximum(p.target_sq - 2.0 * p.cross @ a + a @ (p.gram @ a), 0.0)


def _pivoted_cholesky(a, tol):
    """Diagonally pivoted Cholesky ``P A Pᵀ = T Tᵀ`` of a symmetric PSD (K, K) matrix.

    Pure ``lax`` (K rank-1 steps): the batched LAPACK kernels XLA:CPU calls for ``eigh``/``cholesky``
    under ``vmap`` run their batch on the intra-op thread pool from a pool thread, and two of
    them in flight at once deadlock a 2-thread pool (seen here: sweeps hanging in
    ``ParallelBatchMap``). K is small, so this costs nothing and runs the same on every backend.

    Returns:
      (T, perm, rank): T (K, K) lower triangular in pivot order with zero columns ≥ rank; perm
      (K,) int, pivot order; rank () int, pivots above ``tol``.
    """
    k = a.shape[0]

    def step(j, carry):
        res, t_cols, perm, used, rank = carry
        d = jnp.where(used, -jnp.inf, jnp.diagonal(res))
        piv = jnp.argmax(d).astype(jnp.int32)
        ok = d[piv] > tol
        col = jnp.where(ok & ~used, res[:, piv] / jnp.sqrt(jnp.where(ok, d[piv], 1.0)), 0.0)
        res = res - jnp.outer(col, col)
        return (res, t_cols.at[:, j].set(col), perm.at[j].set(piv), used.at[piv].set(True),
                rank + ok.astype(jnp.int32))

    init = (a, jnp.zeros_like(a), jnp.zeros(k, jnp.int32), jnp.zeros(k, bool), jnp.asarray(0, jnp.int32))
    _, cols, perm, _, rank = jax.lax.fori_loop(0, k, step, init)
    return cols[perm], perm, rank  # row j of T is row perm[j] of the column factor


def _forward(t, rhs, rank):
    """Solve ``T[:r,:r] y = rhs[:r]`` (lower triangular); ``y[r:] = 0``."""
    k = t.shape[0]

    def step(j, y):
        diag = t[j, j]
        val = (rhs[j] - t[j] @ y) / jnp.where(j < rank, diag, 1.0)
        return y.at[j].set(jnp.where(j < rank, val, 0.0))

    return jax.lax.fori_loop(0, k, step, jnp.zeros_like(rhs))


def _backward(t, y):
    """Solve ``Tᵀ z = y`` for a nonsingular lower-triangular ``T``."""
    k = t.shape[0]

    def step(i, z):
        j = k - 1 - i
        return z.at[j].set((y[j] - t[:, j] @ z) / t[j, j])

    return jax.lax.fori_loop(0, k, step, jnp.zeros_like(y))


def psd_solve(a, b, *, full_rank: bool = False):
    """Minimum-norm least-squares solution ``x = A⁺ b`` of a symmetric PSD system (pure ``lax``).

    Pivoted Cholesky ``P A Pᵀ = T Tᵀ``; pivots below ``K·ε·max diag(A)`` count as zero (duplicate
    or zero atoms). Full rank: two triangular solves. Rank r < K (``b`` in the range of ``A``, as
    for any Gram system ``Dᵀv``): ``y = T_r⁻¹ P b``, ``x = Pᵀ T_r (T_rᵀT_r)⁻¹ y``, the solution of
    least norm. jit/vmap safe; error ≈ κ(A)·ε like a LAPACK solve.

    ``full_rank=True`` (static) promises every pivot clears the tolerance (see
    :func:`gram_is_well_posed`) and skips the rank-deficient branch, which under ``vmap`` is
    otherwise computed for every lane and costs as much as the solve itself.
    """
    k = a.shape[0]
    tol = k * jnp.finfo(a.dtype).eps * jnp.max(jnp.abs(jnp.diagonal(a)))
    t, perm, rank = _pivoted_cholesky(a, tol)
    y = _forward(t, b[perm], rank)
    if full_rank:
        return jnp.zeros_like(b).at[perm].set(_backward(t, y))
    full = jnp.zeros_like(b).at[perm].set(_backward(jnp.where(rank == k, t, jnp.eye(k, dtype=a.dtype)), y))
    keep = (jnp.arange(k) < rank).astype(a.dtype)
    tr = t * keep[None, :]
    n_mat = tr.T @ tr + jnp.diag(1.0 - keep)  # positive definite by construction
    t2, perm2, _ = _pivoted_cholesky(n_mat, jnp.asarray(0.0, a.dtype))
    w = jnp.zeros_like(y).at[perm2].set(_backward(t2, _forward(t2, y[perm2], k)))
    least_norm = jnp.zeros_like(b).at[perm].set(tr @ (w * keep))
    return jnp.where(rank == k, full, least_norm)


def masked_solve(gram, rhs, mask, shift=0.0, *, full_rank: bool = False):
    """Solve ``(G_SS + shift·I) x_S = rhs_S`` on the support ``S = mask``; ``x`` is 0 off ``S``.

    Shapes stay static (K×K) so this works under jit/vmap: rows/columns outside ``S`` are replaced
    by the identity. A singular ``G_SS`` (duplicate or zero atoms) gives the minimum-norm
    least-squares solution instead of NaN (see :func:`psd_solve`); ``full_rank=True`` skips that
    branch when :func:`gram_is_well_posed` holds for ``G``.
    """
    m = mask.astype(gram.dtype)
    a = gram * m[:, None] * m[None, :] + jnp.diag(1.0 - m) + shift * jnp.diag(m)
    return psd_solve(a, rhs * m, full_rank=full_rank) * m


# Margin over psd_solve's pivot tolerance K·ε·max diag: eigvalsh is accurate to ~ε·λmax.
_WELL_POSED_MARGIN = 100.0


def gram_is_well_posed(gram) -> bool:
    """Host check that every masked, shifted or atom-normalised solve on ``gram`` has full rank.

    Every pivot of a Cholesky factorisation of a principal submatrix ``G_SS (+ shift·I)`` is at
    least ``λmin(G)``, and of the atom-normalised ``Ĝ = N⁻¹GN⁻¹`` (OMP) at least
    ``λmin(G) / max diag G``. With ``s = max(1, max diag G)`` (the identity rows that pad a masked
    system count in the tolerance too), ``λmin(G) > 100·K·ε·s`` and ``max diag G < 1/(100·K·ε)``
    put every pivot of every such solve above :func:`psd_solve`'s tolerance.

    Args:
      gram: (..., K, K) float64 NumPy Gram matrices (all must pass).

    Returns:
      bool, safe to call the solvers with ``full_rank=True``.
    """
    gram = np.asarray(gram, np.float64)
    k = gram.shape[-1]
    eps = np.finfo(np.float64).eps
    if not np.all(np.isfinite(gram)):
        return False
    top = np.max(np.diagonal(gram, axis1=-2, axis2=-1), axis=-1)
    lam_min = np.linalg.eigvalsh(gram)[..., 0]
    bound = _WELL_POSED_MARGIN * k * eps
    return bool(np.all(lam_min > bound * np.maximum(1.0, top)) and np.all(top < 1.0 / bound))


def iterate(step: Callable, done: Callable, state, *, max_iter: int, block: int):
    """Run ``state = step(state)`` in blocks of ``block`` until ``done(state)`` or ``max_iter``.

    Under ``vmap`` the loop runs until the slowest lane finishes; ``lax.while_loop``'s batching
    keeps finished lanes frozen, so each lane's result and iteration count do not depend on which
    other targets share its batch. Returns ``(state, n_iter)``.
    """

    def cond(carry):
        s, it = carry
        return jnp.logical_and(it < max_iter, jnp.logical_not(done(s)))

    def body(carry):
        s, it = carry
        s = jax.lax.fori_loop(0, block, lambda _, x: step(x), s)
        return s, it + block

    return jax.lax.while_loop(cond, body, (state, jnp.asarray(0, jnp.int32)))


def fista(grad_prox: Callable, optimality: Callable, polish: Callable, x0, lipschitz, *, tol, max_iter, block):
    """Accelerated proximal gradient with gradient-based adaptive restart and support polishing.

    Args:
      grad_prox: ``(y, step) -> x`` one proximal-gradient step from ``y``.
      optimality: ``x -> scalar`` measure that is ≤ tol at a solution.
      polish: ``x -> x'`` exact solve on ``x``'s support/signs (accepted when it meets ``tol``): once FISTA has found the support, this lands on the exact optimum instead of
        crawling there at the condition-number-limited rate.
      x0: starting point; lipschitz: λmax of the smooth part's Hessian.

    Returns:
      (x, n_iter, converged, error).
    """
    step = 1.0 / jnp.where(lipschitz > 0, lipschitz, 1.0)

    def one(state):
        x, y, t, _ = state
        x_new = grad_prox(y, step)
        # O'Donoghue & Candès restart: momentum is dropped when it points uphill.
        restart = jnp.dot(y - x_new, x_new - x) > 0
        t_new = jnp.where(restart, 1.0, 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)))
        y_new = jnp.where(restart, x_new, x_new + ((t - 1.0) / t_new) * (x_new - x))
        return x_new, y_new, t_new, state[3]

    def with_polish(state):
        # The polished point is taken only when it solves the problem: accepting a merely
        # better one would reset FISTA's momentum every block and stall ill-conditioned runs.
        x, y, t, _ = state
        xp = polish(x)
        e, ep = optimality(x), optimality(xp)
        take = (ep <= tol) & (ep <= e)
        return jnp.where(take, xp, x), jnp.where(take, xp, y), t, jnp.where(take, ep, e)

    # No polish at x0: FISTA starts from 0, whose support is empty (the polish would be 0 again).
    state0 = (x0, x0, jnp.asarray(1.0, x0.dtype), optimality(x0))
    n_blocks = -(-max_iter // block)
    (x, _, _, err), n_blocks_run = iterate(
        _blocked(one, block, with_polish), lambda s: s[3] <= tol, state0, max_iter=n_blocks, block=1)
    n_iter = n_blocks_run * block
    return x, n_iter, err <= tol, err


def _blocked(one, block, finish):
    def run(state):
        state = jax.lax.fori_loop(0, block, lambda _, s: one(s), state)
        return finish(state)

    return run
