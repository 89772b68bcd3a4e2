"""Seeded decomposition problems shared by the statistics, solve, solver and sweep tests.

Shapes are shared (K = 8 atoms, T = 6 targets, N = 600 rows) so each solver compiles once per
session.
"""

import numpy as np

K, T, N = 8, 6, 600
KINDS = ["random", "correlated", "illcond"]


def rand(seed=0, n=N, k=K, t=T):
    """float32 (n, k) Gaussian dictionary and (n, t) targets: non-negative mixtures plus noise."""
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((n, k)).astype(np.float32)
    w = np.abs(rng.standard_normal((k, t)))
    v = (d.astype(np.float64) @ w + 0.1 * rng.standard_normal((n, t))).astype(np.float32)
    return d, v


def _orthonormal(rng, n, k):
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def make_dictionary(kind: str, seed: int = 0) -> np.ndarray:
    """float32 (N, K) dictionary: ``random``, ``correlated`` (pairwise cos ≈ 0.9) or ``illcond``
    (κ(D) ≈ 1e3)."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        d = rng.standard_normal((N, K))
    elif kind == "correlated":
        z = _orthonormal(rng, N, K + 1)
        d = np.sqrt(0.9) * z[:, :1] + np.sqrt(0.1) * z[:, 1:]  # pairwise cosine 0.9
    elif kind == "illcond":
        u_, v_ = _orthonormal(rng, N, K), _orthonormal(rng, K, K)
        d = (u_ * np.logspace(0, -3, K)) @ v_.T  # κ(D) = 1e3
    else:
        raise ValueError(kind)
    return d.astype(np.float32)


def make_targets(d: np.ndarray, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sparse non-negative mixtures plus noise (so the optimum is unique and not an exact fit)."""
    rng = np.random.default_rng(seed)
    w = np.abs(rng.standard_normal((K, T))) * (rng.random((K, T)) < 0.5)
    scale = np.linalg.norm(d) / np.sqrt(d.size)
    v = d.astype(np.float64) @ w + 0.05 * scale * rng.standard_normal((N, T))
    return v.astype(np.float32), w.T


def f64(x):
    return np.asarray(x, dtype=np.float64)
