"""Inter-agent heterogeneity of K task vectors, streamed tensor by tensor.

Active set of agent k: ``|δ_k| > threshold`` (default 0: every changed entry). Reported: pairwise
Jaccard ``|A_k ∩ A_l| / |A_k ∪ A_l|`` and cosine of the δ's, and over the union of active
positions the shared fraction (active in ≥ 2 agents) and unique fraction (exactly one).
"""

from __future__ import annotations

import numpy as np

from unmerge_jax.errors import UnmergeError


class OverlapAccumulator:
    """Add ``(K, ...)`` blocks of K agents' deltas; :meth:`result` gives the statistics."""

    def __init__(self, n_agents: int, threshold: float = 0.0):
        self.k, self.threshold = n_agents, threshold
        self.inter = np.zeros((n_agents, n_agents), np.int64)   # diagonal: |A_k|
        self.gram = np.zeros((n_agents, n_agents), np.float64)  # δ_kᵀδ_l
        self.union = self.shared = self.n = 0

    def add(self, deltas):
        x = np.asarray(deltas, dtype=np.float32).reshape(self.k, -1)
        if x.shape[0] != self.k:
            raise UnmergeError(f"expected {self.k} agents, got {x.shape[0]}")
        if not np.isfinite(x).all():
            raise UnmergeError("task vectors hold NaN/Inf; fix them before the overlap analysis")
        m = (np.abs(x) > self.threshold).astype(np.float64)  # exact counts past 2^24
        self.inter += np.rint(m @ m.T).astype(np.int64)
        x64 = x.astype(np.float64)
        self.gram += x64 @ x64.T
        c = m.sum(axis=0)
        self.union += int(np.count_nonzero(c >= 1))
        self.shared += int(np.count_nonzero(c >= 2))
        self.n += x.shape[1]
        return self

    def result(self) -> dict:
        size = np.diag(self.inter).astype(np.float64)
        uni = size[:, None] + size[None, :] - self.inter
        jac = np.where(uni > 0, self.inter / np.maximum(uni, 1), np.nan)
        nrm = np.sqrt(np.diag(self.gram))
        cos = np.where(np.outer(nrm, nrm) > 0, self.gram / np.maximum(np.outer(nrm, nrm), 1e-300), np.nan)
        iu = np.triu_indices(self.k, 1)
        return {
            "jaccard": jac.tolist(),
            "cosine": cos.tolist(),
            "mean_jaccard": float(np.nanmean(jac[iu])) if self.k > 1 else float("nan"),
            "mean_cosine": float(np.nanmean(cos[iu])) if self.k > 1 else float("nan"),
            "shared_fraction": self.shared / self.union if self.union else float("nan"),
            "unique_fraction": (self.union - self.shared) / self.union if self.union else float("nan"),
            "active_fraction": (size / self.n).tolist() if self.n else [],
            "n_params": self.n,
        }


def inter_agent(deltas, *, threshold: float = 0.0) -> dict:
    """Overlap statistics of K task vectors.

    Args:
      deltas: a ``(K, ...)`` array, or an iterable of ``(K, ...)`` blocks (one per tensor).
      threshold: an entry is active when ``|δ| > threshold``.
    """
    if hasattr(deltas, "shape"):
        deltas = [deltas]
    acc = None
    for block in deltas:
        block = np.asarray(block)
        acc = acc or OverlapAccumulator(block.shape[0], threshold)
        acc.add(block)
    if acc is None:
        raise UnmergeError("no task vectors given to inter_agent")
    return acc.result()
