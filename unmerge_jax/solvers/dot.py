"""Dot-product (cosine) thresholding.

Scores are cosines ``s_i = c_i / (‖v‖‖d_i‖)``; atom i is selected when ``s_i ≥ threshold`` (the
decomposition is non-negative, so only positively aligned atoms count). Coefficients are formed
by least squares restricted to the selected atoms, ``a_S = G_SS⁺ c_S`` (0 elsewhere), so the
reconstruction error measures how well the selected atoms explain the target. With
``coef="score"`` the raw cosines of the selected atoms are returned instead.
"""

from __future__ import annotations

import jax.numpy as jnp

from unmerge_jax.solvers.common import Problem, SolverResult, masked_solve


def cosine_scores(p: Problem):
    """(K,) cosines between the target and each atom (0 for zero atoms or a zero target)."""
    norms = jnp.sqrt(jnp.maximum(jnp.diag(p.gram), 0.0)) * jnp.sqrt(jnp.maximum(p.target_sq, 0.0))
    return jnp.where(norms > 0, p.cross / jnp.where(norms > 0, norms, 1.0), 0.0)


def cosine_selection(p: Problem, threshold):
    """``(scores, selected)``: the cosines and the atoms with ``s_i ≥ threshold`` and ``s_i > 0``."""
    scores = cosine_scores(p)
    return scores, (scores >= threshold) & (scores > 0)


def largest_unselected(scores, selected):
    """The largest score left out (−∞ when every atom is selected): dot's ``error``."""
    return jnp.max(jnp.where(selected, -jnp.inf, scores), initial=-jnp.inf)


def dot(p: Problem, threshold, *, coef: str = "lstsq", full_rank: bool = False) -> SolverResult:
    """Thresholded cosine selection for one target. ``error`` is the largest unselected score."""
    scores, selected = cosine_selection(p, threshold)
    if coef == "score":
        a = jnp.where(selected, scores, 0.0)
    else:
        a = masked_solve(p.gram, p.cross, selected, full_rank=full_rank)
    return SolverResult(a, jnp.sum(selected).astype(jnp.int32), jnp.asarray(True), largest_unselected(scores, selected))
