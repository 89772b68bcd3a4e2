"""Decomposition metrics (``unmerge_jax.metrics``): support metrics against hand-computed values."""

import numpy as np

import unmerge_jax as u


def test_support_metrics_by_hand():
    coef = np.array([[0.5, 0.0, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1]])
    truth = np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1]])
    m = u.metrics.support_metrics(coef, truth)
    np.testing.assert_allclose(m["precision"], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(m["recall"], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(m["perfect_match"], [0, 1, 1])
    np.testing.assert_allclose(m["sparsity"], [2, 0, 4])
    np.testing.assert_allclose(m["weight_error"], [0.5, 0.0, 0.0])
