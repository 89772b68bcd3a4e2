"""Decomposition metrics, computed from Gram statistics (the reconstruction is never formed).

Reconstruction (UNMERGE eq. 6): ``error = 1 − max(0, cos(v, Da))²`` with
``cos = cᵀa / (‖v‖·√(aᵀGa))``. A zero target reconstructed by zero coefficients counts as exact
(error 0); a zero reconstruction of a non-zero target has cos = 0 (error 1).

Support metrics compare ``|a_i| > support_tol`` with the true support ``w_i ≠ 0``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Reconstruction(NamedTuple):
    """Arrays broadcast over leading (seed, target, ...) axes."""

    cosine: np.ndarray
    recon_error: np.ndarray
    residual_sq: np.ndarray  # ‖v − Da‖², clamped at 0
    unexplained: np.ndarray  # ‖v − Da‖² / ‖v‖² (0 for a zero target)


def reconstruction(gram, cross, target_sq, coef) -> Reconstruction:
    """Metrics of coefficients ``coef`` (..., K) for targets with ``cross`` (..., K), ``target_sq`` (...).

    ``gram`` is (K, K) or broadcastable (..., K, K).
    """
    # Host NumPy in float64: these arrays are (seeds × targets × grid × K), tiny, and eager JAX
    # would compile a kernel per op and shape.
    gram, cross, target_sq, coef = (np.asarray(x, dtype=np.float64) for x in (gram, cross, target_sq, coef))
    ga = np.einsum("...kl,...l->...k", gram, coef)
    aga = np.einsum("...k,...k->...", coef, ga)
    ca = np.einsum("...k,...k->...", cross, coef)
    resid = np.maximum(target_sq - 2.0 * ca + aga, 0.0)
    denom = np.sqrt(np.maximum(target_sq, 0.0) * np.maximum(aga, 0.0))
    both_zero = (target_sq <= 0) & (aga <= 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(denom > 0, ca / np.where(denom > 0, denom, 1.0), np.where(both_zero, 1.0, 0.0))
        unexplained = np.where(target_sq > 0, resid / np.where(target_sq > 0, target_sq, 1.0), 0.0)
    cos = np.clip(cos, -1.0, 1.0)
    err = 1.0 - np.maximum(cos, 0.0) ** 2
    return Reconstruction(cos, err, resid, unexplained)


def support_metrics(coef, truth, support_tol: float = 1e-8) -> dict:
    """Precision, recall, perfect match, sparsity and weight error against true weights.

    Args:
      coef: (..., K) estimated coefficients.
      truth: (..., K) true weights (broadcastable), 0 where an atom is absent.
      support_tol: ``|a_i| > support_tol`` counts as selected.

    Returns:
      dict of (...) NumPy arrays: ``precision`` (1 when nothing is selected and nothing is true,
      0 when nothing is selected but something is true — NaN-free so means stay defined),
      ``recall`` (1 when nothing is true), ``perfect_match``, ``sparsity`` (number selected),
      ``weight_error`` (max |a − w|), ``weight_rel_error`` (‖a − w‖₂ / ‖w‖₂, or ‖a‖₂ if w = 0).
    """
    coef = np.asarray(coef)
    truth = np.broadcast_to(np.asarray(truth, dtype=coef.dtype), coef.shape)
    sel = np.abs(coef) > support_tol
    true = truth != 0
    tp = np.sum(sel & true, axis=-1)
    n_sel = np.sum(sel, axis=-1)
    n_true = np.sum(true, axis=-1)
    precision = np.where(n_sel > 0, tp / np.maximum(n_sel, 1), np.where(n_true == 0, 1.0, 0.0))
    recall = np.where(n_true > 0, tp / np.maximum(n_true, 1), 1.0)
    perfect = np.all(sel == true, axis=-1)
    diff = coef - truth
    wnorm = np.linalg.norm(truth, axis=-1)
    rel = np.linalg.norm(diff, axis=-1) / np.where(wnorm > 0, wnorm, 1.0)
    return {"precision": precision, "recall": recall, "perfect_match": perfect.astype(float),
            "sparsity": n_sel.astype(float), "weight_error": np.max(np.abs(diff), axis=-1),
            "weight_rel_error": rel}
