"""Sweeps and paper-style summaries (``unmerge_jax.sweep``): rows equal individual solves, truth
metrics, mean ± sample std tables."""

import numpy as np
import pandas as pd
import pytest

import unmerge_jax as u
from tests._problems import K, T, rand


def test_sweep_rows_match_individual_solves_and_truth_metrics():
    d, _ = rand()
    truth = np.zeros((T, K))
    truth[0, [0, 1]] = 0.5
    truth[1, [2, 3, 4]] = 1 / 3
    truth[2:, 5] = 1.0
    v = d.astype(np.float64) @ truth.T
    st = u.gram_stats(d, v, seeds=3, key=0)
    table = u.sweep(st, seeds=3, truth=truth, target_names=[f"t{i}" for i in range(T)])
    n_runs = sum(len(u.sweep.__globals__["grid_points"](m, g, K)) for m, g in u.PAPER_GRID.items())
    # OMP k=1..8 (8) + Lasso (3) + Ridge (4) + ElasticNet 3×3 (9) + NNLS (1) + dot thresholds (3)
    assert len(table) == n_runs * T * 3 == 28 * T * 3
    # One row equals the corresponding solve() on that bootstrap replicate.
    row = table[(table.method == "lasso") & (table.alpha == 1e-7) & (table.seed == 2) & (table.target == "t1")]
    ref = u.solve(st, "lasso", alpha=1e-7)
    np.testing.assert_allclose(np.asarray(row.coef.iloc[0]), ref.coef[2, 1], rtol=1e-9, atol=1e-12)
    nnls = table[table.method == "nnls"]
    assert (nnls.precision == 1).all() and (nnls.recall == 1).all() and (nnls.perfect_match == 1).all()
    assert nnls.weight_error.max() < 1e-8
    omp1 = table[(table.method == "omp") & (table.n_nonzero_coefs == 1) & (table.target == "t1")]
    assert (omp1.precision == 1).all() and np.allclose(omp1.recall, 1 / 3) and (omp1.sparsity == 1).all()


@pytest.mark.parametrize("coef", ["lstsq", "score"])
def test_ridge_and_dot_in_one_program_equal_their_own_solves(coef):
    """A sweep runs Ridge and dot-product thresholding as lanes of ``support_solve``. Each lane
    gives what the family's own solver gives, to rounding (the same arithmetic, which XLA
    vectorises by batch shape: the support now varies along the grid axis), with the same support,
    iteration counts and convergence flags; thresholds select none, some and all atoms."""
    d, v = rand(seed=4)
    st = u.gram_stats(d, v, seeds=3, key=1)
    grid = {"ridge": {"alpha": [1e-8, 1e-2, 10.0]}, "dot": {"threshold": [0.0, 0.3, 0.99]}}
    table = u.sweep(st, grid=grid, seeds=3, coef=coef)
    for method, name in (("ridge", "alpha"), ("dot", "threshold")):
        for value in grid[method][name]:
            ref = u.solve(st, method, **{name: value}, **({"coef": coef} if method == "dot" else {}))
            rows = table[(table.method == method) & (table[name] == value)].sort_values(["seed", "target"])
            got = np.asarray(rows.coef.tolist()).reshape(ref.coef.shape)
            np.testing.assert_allclose(got, ref.coef, rtol=1e-12, atol=1e-14 * np.abs(ref.coef).max())
            np.testing.assert_array_equal(got != 0, ref.coef != 0)  # the same support
            for field in ("n_iter", "converged"):
                np.testing.assert_array_equal(rows[field].to_numpy().reshape(ref.n_iter.shape),
                                              np.asarray(getattr(ref, field)), err_msg=f"{method} {value} {field}")
            np.testing.assert_allclose(rows.error.to_numpy().reshape(ref.n_iter.shape), ref.error, rtol=0, atol=1e-14)
    dots = table[table.method == "dot"]
    assert set(dots.sparsity) >= {0.0, float(K)} and ((dots.sparsity > 0) & (dots.sparsity < K)).any()


def test_summarize_mean_and_sample_std():
    table = pd.DataFrame({"method": ["nnls"] * 3 + ["lasso"] * 2, "cat": ["a", "a", "b", "a", "b"],
                          "recon_error": [0.1, 0.2, 0.6, 0.5, 0.7], "precision": [1, 1, 0, 1, 0.5]})
    s = u.summarize(table, by=["method"], metrics=["recon_error", "precision"])
    nn = s.frame.set_index("method").loc["nnls"]
    assert nn.recon_error_mean == pytest.approx(0.3) and nn.recon_error_std == pytest.approx(np.std([0.1, 0.2, 0.6], ddof=1))
    assert "| NNLS | 0.30 ± 0.26 | 0.67 ± 0.58 |" in s.markdown
    wide = u.summarize(table, by=["method"], columns="cat", metrics=["recon_error"])
    assert "| NNLS | 0.15 ± 0.07 | 0.60 ± 0.00 |" in wide.markdown


def test_mean_std_cell_format():
    from unmerge_jax.sweep import mean_std_cell, mean_std_cells

    assert mean_std_cell(0.4549, 0.2051) == "0.45 ± 0.21"
    assert mean_std_cell(6.1, float("nan"), digits=1) == "6.1 ± 0.0"  # one value: no spread
    assert mean_std_cell(0.5, 0.1, std=False) == "0.50"
    row = pd.Series({"precision_mean": 1.0, "precision_std": 0.0, "recall_mean": 0.4, "recall_std": 0.25})
    assert mean_std_cells(row, ["precision", "recall"]) == "1.00 ± 0.00 / 0.40 ± 0.25"
