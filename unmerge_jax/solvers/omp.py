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


def omp(p: Problem, n_nonzero_coefs, *, max_atoms: int) -> SolverResult:
    """OMP for one target. ``n_iter`` = atoms selected; ``error`` = final max residual correlation / max|ĉ|."""
    norms = jnp.sqrt(jnp.maximum(jnp.diag(p.gram), 0.0))
    usable = norms > 0
    safe = jnp.where(usable, norms, 1.0)
    g = p.gram / (safe[:, None] * safe[None, :])
    c = jnp.where(usable, p.cross / safe, 0.0)
    scale = jnp.maximum(jnp.max(jnp.abs(c)), jnp.finfo(c.dtype).tiny)
    k_lane = jnp.asarray(n_nonzero_coefs, jnp.int32)

    def body(step, carry):
        support, gamma, n_sel = carry
        r = c - g @ gamma
        cand = jnp.where(support | ~usable, -1.0, jnp.abs(r))
        j = jnp.argmax(cand)
        add = (step < k_lane) & (cand[j] > _VANISH * scale)
        support = support.at[j].set(support[j] | add)
        gamma = jnp.where(add, masked_solve(g, c, support), gamma)
        return support, gamma, n_sel + add.astype(jnp.int32)

    k = c.shape[0]
    init = (jnp.zeros(k, bool), jnp.zeros(k, c.dtype), jnp.asarray(0, jnp.int32))
    support, gamma, n_sel = jax.lax.fori_loop(0, max_atoms, body, init)
    resid = jnp.max(jnp.abs(jnp.where(usable, c - g @ gamma, 0.0))) / scale
    return SolverResult(gamma / safe, n_sel, jnp.asarray(True), resid)
