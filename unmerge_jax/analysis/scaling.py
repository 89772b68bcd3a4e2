"""Sparsity scaling law ``s(N) = 1 − a·N^(−b)`` (the sparsity-scaling paper, eq. 3): nonlinear least squares,
R², and stratified bootstrap confidence intervals.

The fit minimises ``Σ_i (s_i − 1 + a·N_i^(−b))²`` over every trial (not the per-scale means) with
SciPy's trust-region reflective least squares (a > 0; b free, so a law that *decreases* with N is
not ruled out by construction). Bootstrap: resample the trials *within* each scale with
replacement, refit, and take percentile intervals of a, b and of the predictions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from unmerge_jax.errors import UnmergeError


def law(n, a, b):
    return 1.0 - a * np.power(n, -b)


@dataclass
class ScalingFit:
    a: float
    b: float
    r2: float            # over all trials
    r2_means: float      # over the per-scale means
    a_ci: tuple
    b_ci: tuple
    predictions: dict    # N → (point, lo, hi)
    n_boot: int
    n_points: int

    def asdict(self):
        return asdict(self)


def _fit(n, s, p0):
    from scipy.optimize import least_squares

    def resid(p):
        return law(n, p[0], p[1]) - s

    r = least_squares(resid, p0, bounds=([1e-12, -5.0], [np.inf, 5.0]), method="trf", x_scale="jac",
                      xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=10_000)
    return r.x


def _r2(y, yhat):
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - yhat) ** 2)) / ss_tot if ss_tot > 0 else float("nan")


def fit_scaling_law(n_billion, sparsity, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                    predict=(70.0, 100.0, 405.0), p0=(0.1, 0.5)) -> ScalingFit:
    """Fit the law to measured sparsities.

    Args:
      n_billion: model size per measurement (billions of parameters); repeated sizes are trials.
      sparsity: measured sparsity per measurement, in (0, 1].
      n_boot: bootstrap replicates (0: no intervals).
      level: confidence level of the percentile intervals.
      predict: sizes at which to report s(N) with its interval.
    """
    n = np.asarray(n_billion, dtype=np.float64).ravel()
    s = np.asarray(sparsity, dtype=np.float64).ravel()
    if n.shape != s.shape or n.size < 3:
        raise UnmergeError(f"need ≥ 3 (size, sparsity) pairs of equal length, got {n.size} and {s.size}")
    if not (np.all(np.isfinite(s)) and np.all(n > 0)):
        raise UnmergeError("sizes must be positive and sparsities finite")
    if np.unique(n).size < 2:
        raise UnmergeError("need at least two distinct model sizes to fit a scaling law")
    a, b = _fit(n, s, np.asarray(p0, dtype=np.float64))
    sizes = np.unique(n)
    means = np.array([s[n == x].mean() for x in sizes])
    rng = np.random.default_rng(seed)
    idx_by = [np.nonzero(n == x)[0] for x in sizes]
    boots = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(ix, ix.size, replace=True) for ix in idx_by])
        boots.append(_fit(n[idx], s[idx], np.array([a, b])))
    boots = np.array(boots).reshape(-1, 2)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    ci = (lambda v: tuple(float(t) for t in np.percentile(v, q))) if n_boot else (lambda v: (float("nan"),) * 2)
    preds = {}
    for x in predict:
        pb = law(x, boots[:, 0], boots[:, 1]) if n_boot else np.array([np.nan])
        preds[float(x)] = (float(law(x, a, b)),) + ci(pb)
    return ScalingFit(a=float(a), b=float(b), r2=_r2(s, law(n, a, b)), r2_means=_r2(means, law(sizes, a, b)),
                      a_ci=ci(boots[:, 0]), b_ci=ci(boots[:, 1]), predictions=preds, n_boot=n_boot, n_points=n.size)
