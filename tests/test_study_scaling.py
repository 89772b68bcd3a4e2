"""Scaling-law fit: recovers known parameters, R² vs an independent formula, bootstrap CIs cover."""

import numpy as np
import pytest

from unmerge_jax.analysis.scaling import fit_scaling_law, law
from unmerge_jax.errors import UnmergeError

SIZES = np.array([1, 3, 7, 8, 14, 32, 70, 100, 200, 405], dtype=float)


def test_exact_law_is_recovered():
    f = fit_scaling_law(SIZES, law(SIZES, 0.085, 0.587), n_boot=0)
    assert f.a == pytest.approx(0.085, rel=1e-6) and f.b == pytest.approx(0.587, rel=1e-6)
    assert f.r2 == pytest.approx(1.0)


def test_noisy_fit_matches_scipy_curve_fit_and_ci_covers():
    from scipy.optimize import curve_fit

    rng = np.random.default_rng(0)
    n = np.repeat(SIZES, 5)
    s = law(n, 0.2, 0.45) + rng.normal(0, 0.004, n.size)
    f = fit_scaling_law(n, s, n_boot=300, seed=1)
    (a, b), _ = curve_fit(law, n, s, p0=(0.1, 0.5))
    assert f.a == pytest.approx(a, rel=1e-5) and f.b == pytest.approx(b, rel=1e-5)
    resid = s - law(n, a, b)
    assert f.r2 == pytest.approx(1 - resid @ resid / np.sum((s - s.mean()) ** 2), rel=1e-9)
    assert f.a_ci[0] < 0.2 < f.a_ci[1] and f.b_ci[0] < 0.45 < f.b_ci[1]
    point, lo, hi = f.predictions[70.0]
    assert lo <= point <= hi and lo < law(70, 0.2, 0.45) < hi


def test_bad_input():
    with pytest.raises(UnmergeError, match="two distinct"):
        fit_scaling_law([3, 3, 3], [0.9, 0.91, 0.92])
    with pytest.raises(UnmergeError, match="finite"):
        fit_scaling_law([1, 3, 7], [0.9, np.nan, 0.92])
