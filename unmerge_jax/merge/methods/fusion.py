"""``arcee_fusion`` (mergekit 0.1.5): keep the other model's changes where they matter most.

With ``a`` the base and ``b`` the one other model, every entry's importance is
``s = |b − a| · KL_row``, where ``KL_row = Σ_j p_j log(p_j / q_j)``, ``p = softmax(b_row) + 1e-8``,
``q = softmax(a_row) + 1e-8`` over the entry's row (the last axis; a 1-D tensor is one row). The
threshold is ``τ = Q_½ + 1.5 (Q_¾ − Q_¼)`` with ``Q_q`` the order statistic at position
``⌊q (n − 1)⌋`` of the sorted importances, and ``θ = a + (b − a)·[s ≥ τ]``.

Statistics pass (``"tensor"``, chunks of whole rows): each row's KL (a float32 per row), then the
three exact order statistics of ``s`` over the whole tensor (``unmerge_jax.orderstats``, on
order-preserving uint32 keys, no sort and no tensor-sized copy). mergekit sorts a random sample
of 10⁶ entries (drawn with replacement) for tensors larger than that, so its threshold there is
random; ours is always the exact one.

Reference: mergekit's ``arcee_fusion`` method (Arcee AI).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.kernels import merge_sphere as S
from unmerge_jax.merge.base import MergeMethod, Resolved
from unmerge_jax.orderstats import order_keys, select_ranks

QUANTILES = (0.25, 0.5, 0.75)
IQR_FACTOR = 1.5


class FusionStats(NamedTuple):
    """Per tensor: ``kl`` (n_rows,) float32, each row's divergence; ``thr`` the float32 threshold τ."""

    kl: np.ndarray
    thr: np.float32


def check(method, shared, weights, density, at):
    """Exactly one model besides the base (per-model ``weight`` is ignored, as in mergekit)."""
    if len(weights) != 1:
        raise UnmergeError(f"merge method 'arcee_fusion' merges the base with exactly one other model; got "
                           f"{len(weights)} model(s) besides the base{at}")
    return dict(shared)


def quantile_positions(n: int) -> list[int]:
    """mergekit's positions ``⌊q·(n − 1)⌋`` in ascending order (q in float32, as its tensor)."""
    return [int(np.float32(q) * np.float32(n - 1)) for q in QUANTILES]


def _rows_of(chunks, c: int) -> slice:
    sl = chunks.slices[c]
    return slice(sl.start // chunks.row_len, sl.stop // chunks.row_len)


def tensor_stats(res: Resolved, chunks, key) -> FusionStats:
    n, row_len = chunks.n, chunks.row_len
    kl = np.zeros(n // row_len if n else 0, np.float32)
    for c in range(len(chunks)):
        rows = _rows_of(chunks, c)
        kl[rows] = np.asarray(S.row_kl(*chunks.inputs(c), deltas=chunks.deltas, row_len=row_len))[:rows.stop - rows.start]
    if n == 0:
        return FusionStats(kl, np.float32(0.0))

    def importance(c):
        imp = S.fusion_importance(*chunks.inputs(c), _chunk_kl(chunks, kl, c), deltas=chunks.deltas, row_len=row_len)
        return np.asarray(imp)[:chunks.sizes[c]]

    def sampled(i, idx):   # the kernel's float32 product |δ|·KL_row at the sampled positions
        return order_keys(chunks.sampled_abs_bits(0, idx).view(np.float32) * kl[idx // row_len])

    ranks = [n - p for p in quantile_positions(n)]     # 1-based ranks from the top
    keys, _, _ = select_ranks(n, np.asarray([ranks]), sampled,
                              lambda: ([order_keys(importance(c))] for c in range(len(chunks))))
    q1, med, q3 = order_keys(keys[0], inverse=True)
    return FusionStats(kl, np.float32(med + np.float32(IQR_FACTOR) * (q3 - q1)))


def _chunk_kl(chunks, kl, c: int) -> np.ndarray:
    """The chunk's row divergences at the kernel's fixed chunk length (a padded tail's rows 0)."""
    rows = _rows_of(chunks, c)
    out = np.zeros(chunks.chunk // chunks.row_len, np.float32)
    out[:rows.stop - rows.start] = kl[rows]
    return out


def apply(res: Resolved, chunks, stats: FusionStats, key) -> None:
    for c in range(len(chunks)):
        chunks.store(c, S.fusion_kernel(*chunks.inputs(c), _chunk_kl(chunks, stats.kl, c), stats.thr, chunks.limit,
                                        deltas=chunks.deltas, row_len=chunks.row_len))


ARCEE_FUSION = MergeMethod("arcee_fusion", {}, {"weight": 1.0}, True, check, lambda res: "tensor", apply,
                           tensor_stats=tensor_stats, rows=lambda res: True, options={"base_role": "endpoint", "ignores": ("weight",)})
