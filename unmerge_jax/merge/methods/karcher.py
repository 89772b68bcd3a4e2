"""The Karcher (Riemannian) mean on the unit sphere: ``karcher`` (mergekit 0.1.5 semantics).

The K inputs ``x_k`` (full weights; with a ``base_model`` mergekit adds the base to the inputs,
and so does the config) have norms ``n_k`` and units ``u_k = x_k / n_k``; those with
``n_k > tol`` take part, with equal weights ``α = 1 / #valid``. Starting from the normalised
mean ``m = Σ α u_k / ‖Σ α u_k‖`` (the first valid unit when that norm is below ``tol``), each
iteration forms the Riemannian gradient ``g = Σ α (θ_k / sin θ_k)(u_k − cos θ_k · m)`` over the
units with ``θ_k = arccos(m·u_k) ≥ tol``, stops when ``‖g‖ < tol``, else steps along the geodesic
``m ← cos‖g‖ · m + sin‖g‖ · g/‖g‖`` and renormalises; at most ``max_iter`` (10) iterations,
``tol`` 1e-5. The result is ``(Σ_k n_k / K) · m``; one input is returned unchanged.

Every iterate is a combination ``m = Σ β_k u_k`` of the units and every quantity the iteration
needs is a quadratic form of the units' Gram matrix, so the iteration runs on the (K,)
coefficients ``β`` (:func:`karcher_coefs`), exactly the same steps as on the tensors, after one
float64 Gram pass over the chunks; the apply pass forms ``Σ c_k x_k``. Per tensor the iterations
made, the final gradient norm and whether it fell below ``tol`` are reported
(:class:`KarcherReport`; ``MergeResult.diagnostics``).

Reference: the Karcher mean (Karcher, "Riemannian center of mass and mollifier smoothing", 1977);
merging by it: arXiv:2603.04972.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.merge.base import MergeMethod, Resolved, as_float, short
from unmerge_jax.merge.methods.slerp import Coefs, apply_coefs, gram


class KarcherReport(NamedTuple):
    """Convergence of one tensor's Karcher mean: ``iterations`` (geodesic steps taken), ``step``
    (the last gradient norm ``‖g‖``; 0 for one input or parallel ones, NaN with ``max_iter`` 0),
    ``converged`` (``‖g‖ < tol`` within ``max_iter`` iterations)."""

    iterations: int
    step: float
    converged: bool


def karcher_coefs(g: np.ndarray, max_iter: int, tol: float) -> tuple[np.ndarray, KarcherReport]:
    """(K,) float64 coefficients ``c`` of ``Σ c_k x_k`` from the Gram ``g`` of the K inputs, and the
    iteration's :class:`KarcherReport` (the module docstring's algorithm on ``β``)."""
    g = np.asarray(g, np.float64)
    k = len(g)
    if k == 1:
        return np.ones(1), KarcherReport(0, 0.0, True)
    n = np.sqrt(np.maximum(np.diag(g), 0.0))
    valid = n > tol
    if not valid.any():
        return np.zeros(k), KarcherReport(0, 0.0, True)
    safe = np.where(n > 0, n, 1.0)
    gu = g / np.outer(safe, safe)                       # Gram of the units

    def norm(v):
        return float(np.sqrt(max(v @ gu @ v, 0.0)))

    alpha = np.where(valid, 1.0 / np.count_nonzero(valid), 0.0)
    mean_norm = norm(alpha)
    beta = np.eye(k)[int(np.argmax(valid))] if mean_norm < tol else alpha / mean_norm
    iterations, step, converged = 0, float("nan"), False   # max_iter 0: no gradient evaluated
    for _ in range(int(max_iter)):
        dots = np.clip(gu @ beta, -1.0, 1.0)
        theta = np.arccos(dots)
        act = valid & (theta >= tol)
        with np.errstate(divide="ignore", invalid="ignore"):
            f = np.where(act, alpha * theta / np.sin(np.where(act, theta, 1.0)), 0.0)
        tangent = f - float(f @ dots) * beta            # Σ f_k (u_k − cos θ_k m), as coefficients
        step = norm(tangent)
        if step < tol:
            converged = True
            break
        beta = np.cos(step) * beta + np.sin(step) * tangent / step
        unit_norm = norm(beta)
        if unit_norm > tol:
            beta = beta / unit_norm
        iterations += 1
    scale = float(n.sum()) / k                          # the mean norm over all K inputs
    return scale * beta / safe, KarcherReport(iterations, float(step), converged)


def _as_count(what: str, v) -> int:
    x = as_float(what, v, minimum=0.0)
    if x != int(x):
        raise UnmergeError(f"parameter {what} must be a whole number, got {short(v)}")
    return int(x)


def check(method, shared, weights, density, at):
    """``max_iter`` a whole number ≥ 0, ``tol`` a number ≥ 0. Per-model ``weight`` is accepted
    and ignored, as in mergekit (the mean weights every input equally)."""
    out = dict(shared)
    out["max_iter"] = _as_count("max_iter", out["max_iter"])
    out["tol"] = as_float("tol", out["tol"], minimum=0.0)
    return out


def tensor_stats(res: Resolved, chunks, key) -> Coefs:
    if chunks.k == 1:
        return Coefs(np.ones(1), "weights", False, KarcherReport(0, 0.0, True))
    c, report = karcher_coefs(gram(chunks, "weights"), res.shared["max_iter"], res.shared["tol"])
    return Coefs(c, "weights", False, report)


KARCHER = MergeMethod("karcher", {"max_iter": 10, "tol": 1e-5}, {"weight": 1.0}, False, check,
                      lambda res: "tensor", apply_coefs, tensor_stats=tensor_stats, options={"base_role": "input", "ignores": ("weight",)})


def summary(diagnostics: dict) -> str | None:
    """One line on the :class:`KarcherReport` values of ``diagnostics`` (tensor name → report):
    how many tensors, the range of iterations, the largest final step, and which did not converge;
    None when there are none."""
    reports = {n: r for n, r in diagnostics.items() if isinstance(r, KarcherReport)}
    if not reports:
        return None
    its = [r.iterations for r in reports.values()]
    worst = max(reports, key=lambda n: -1.0 if np.isnan(reports[n].step) else reports[n].step)
    failed = [n for n, r in reports.items() if not r.converged]
    line = (f"karcher: {len(reports)} tensors, {min(its)}-{max(its)} iterations, largest final step "
            f"{reports[worst].step:.3g} ({worst})")
    if failed:
        return line + f"; {len(failed)} did not converge within max_iter (e.g. {failed[0]}): raise max_iter or tol"
    return line + "; all converged"
