"""Orthogonal Matching Pursuit on the Gram matrix (Batch-OMP).

scikit-learn's ``orthogonal_mp_gram`` assumes unit-norm atoms, so atoms are normalised first:
``Ĝ = G / (‖d_i‖‖d_j‖)``, ``ĉ = c / ‖d‖``. At each step the atom with the largest residual
correlation ``|ĉ − Ĝ γ|`` joins the support S and ``γ_S = Ĝ_SS⁻¹ ĉ_S`` is re-solved; the returned
coefficients are ``γ / ‖d‖`` (for the original atoms).

The loop has a static length ``max_atoms`` (one compiled program); each lane stops adding atoms
at its own ``n_nonzero_coefs`` (an array, so the paper's k = 1..8 grid is one vmapped call), when
the residual correlation vanishes (``max|r| ≤ 1e-12·max|ĉ|``: an exact fit), or when no usable
atom is left (zero atoms are never selected).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unmerge_jax.solvers.common import Problem, SolverResult, masked_solve

_VANISH = 1e-12


def omp(p: Problem, n_nonzero_coefs, *, max_atoms: int, full_rank: bool = False) -> SolverResult:
    """OMP for one target. ``n_iter`` = atoms selected; ``error`` = final max residual correlation / max|ĉ|.

    The greedy path does not depend on ``n_nonzero_coefs`` (the run with k atoms is the first k
    steps of the run with more), so the path to ``max_atoms`` is computed once and each lane reads
    its step from it: under ``vmap`` over a k grid only that read is batched, and the paper's
    k = 1..8 grid costs one path instead of eight.
    """
    norms = jnp.sqrt(jnp.maximum(jnp.diag(p.gram), 0.0))
    usable = norms > 0
    safe = jnp.where(usable, norms, 1.0)
    g = p.gram / (safe[:, None] * safe[None, :])
    c = jnp.where(usable, p.cross / safe, 0.0)
    scale = jnp.maximum(jnp.max(jnp.abs(c)), jnp.finfo(c.dtype).tiny)
    k = c.shape[0]

    def residual(gamma):
        return jnp.max(jnp.abs(jnp.where(usable, c - g @ gamma, 0.0))) / scale

    def body(step, carry):
        support, gamma, n_sel, path, counts, resids = carry
        r = c - g @ gamma
        cand = jnp.where(support | ~usable, -1.0, jnp.abs(r))
        onehot = jnp.arange(k) == jnp.argmax(cand)
        add = jnp.max(cand) > _VANISH * scale
        support = support | (onehot & add)
        gamma = jnp.where(add, masked_solve(g, c, support, full_rank=full_rank), gamma)
        n_sel = n_sel + add.astype(jnp.int32)
        return (support, gamma, n_sel, path.at[step + 1].set(gamma), counts.at[step + 1].set(n_sel),
                resids.at[step + 1].set(residual(gamma)))

    zeros = jnp.zeros(k, c.dtype)
    init = (jnp.zeros(k, bool), zeros, jnp.asarray(0, jnp.int32), jnp.zeros((max_atoms + 1, k), c.dtype),
            jnp.zeros(max_atoms + 1, jnp.int32), jnp.zeros(max_atoms + 1, c.dtype).at[0].set(residual(zeros)))
    *_, path, counts, resids = jax.lax.fori_loop(0, max_atoms, body, init)
    # Step min(k, max_atoms) of the path, read with a one-hot (no gather under vmap).
    pick = jnp.arange(max_atoms + 1) == jnp.clip(jnp.asarray(n_nonzero_coefs, jnp.int32), 0, max_atoms)
    gamma = pick.astype(c.dtype) @ path
    n_sel = jnp.sum(jnp.where(pick, counts, 0))
    resid = jnp.sum(jnp.where(pick, resids, 0.0))
    return SolverResult(gamma / safe, n_sel, jnp.asarray(True), resid)
