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


def masked_solve(gram, rhs, mask, shift=0.0):
    """Solve ``(G_SS + shift·I) x_S = rhs_S`` on the support ``S = mask``; ``x`` is 0 off ``S``.

    Shapes stay static (K×K) so this works under jit/vmap: rows/columns outside ``S`` are replaced
    by the identity. Uses a symmetric eigendecomposition with a relative cut-off, so a singular
    ``G_SS`` (duplicate or zero atoms) gives the minimum-norm least-squares solution instead of
    NaN.
    """
    m = mask.astype(gram.dtype)
    a = gram * m[:, None] * m[None, :] + jnp.diag(1.0 - m) + shift * jnp.diag(m)
    b = rhs * m
    w, q = jnp.linalg.eigh(a)
    cutoff = jnp.finfo(gram.dtype).eps * a.shape[0] * jnp.max(jnp.abs(w))
    inv = jnp.where(jnp.abs(w) > cutoff, 1.0 / jnp.where(w == 0, 1.0, w), 0.0)
    x = q @ (inv * (q.T @ b))
    return x * m


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

    e0 = optimality(x0)
    state0 = with_polish((x0, x0, jnp.asarray(1.0, x0.dtype), e0))
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


def lipschitz_constant(gram):
    """λmax(G) for a (…, K, K) symmetric PSD matrix."""
    return jnp.linalg.eigvalsh(gram)[..., -1]
