"""SCE — select, calculate, erase (arXiv:2408.07990): ``sce``, as mergekit 0.1.5.

With task vectors ``δ_k``: with ``select_topk < 1`` only the entries whose variance across the
models is among the ``⌊select_topk · #{var ≠ 0}⌋`` largest of the tensor are kept (``δ'_k``);
each model's weight is its share of the mean squared ``δ'`` (uniform when all are ~0); the sign of
``Σ δ'_k`` is elected and the agreeing ``δ'_k`` are averaged with those weights:
``θ = θ_base + Σ_k w_k δ'_k [agree] / max(Σ_k w_k [agree], 1e-6)`` (formulas in
:mod:`unmerge_jax.kernels.merge_sce`).

Statistics pass (``"tensor"``): with selection, the count of non-zero variances, the exact k-th
largest variance and its tie cuts over the chunks (``unmerge_jax.orderstats``, ties first by
position where mergekit's ``topk`` is arbitrary); then the float64 sums of ``δ'_k²``. Apply:
:func:`~unmerge_jax.kernels.merge_sce.sce_kernel`.

mergekit's ``sce`` takes no per-model ``weight`` (the weights are computed); a config may give one
(mergekit ignores it): it is accepted and ignored, with a note at run time. ``int8_mask`` only
chooses mergekit's mask dtype; it is accepted and has no effect on the values.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.kernels import merge_sce as S
from unmerge_jax.merge.base import MergeMethod, Resolved, as_bool, as_float
from unmerge_jax.orderstats import select_ranks, tie_cuts

NONE_SELECTED = np.uint32(0xFFFFFFFF)


class SCEStats(NamedTuple):
    """One tensor's statistics: ``weights`` (K,) float32; ``thr`` uint32 and ``cut`` (n_chunks,)
    int32 of the variance selection (None without selection)."""

    weights: np.ndarray
    thr: np.uint32 | None
    cut: np.ndarray | None


def check(method: MergeMethod, shared: dict, weights: np.ndarray, density: np.ndarray, at: str) -> dict:
    """``select_topk`` a number in [0, 1]; ``int8_mask`` a bool."""
    out = dict(shared)
    out["int8_mask"] = as_bool("int8_mask", out["int8_mask"])
    out["select_topk"] = as_float("select_topk", out["select_topk"], minimum=0.0)
    if out["select_topk"] > 1.0:
        raise UnmergeError(f"select_topk {out['select_topk']:g} is above 1{at}; give the fraction of entries to keep "
                           f"by variance, in [0, 1] (1: all)")
    return out


def statistics(res: Resolved) -> str:
    return "tensor"


def sce_weights(sq_sums, n: int) -> np.ndarray:
    """mergekit ``sce_weight`` from the float64 ``Σ δ'_k²``: ``mean_k / Σ mean``, uniform ``1/K``
    when the sum is below 1e-6; float32 (K,)."""
    means = np.asarray(sq_sums, np.float64) / max(n, 1)
    total = means.sum()
    if abs(total) < S.WEIGHT_SUM_EPS:
        return np.full(means.shape, 1.0 / means.size, np.float32)
    return (means / total).astype(np.float32)


def _var_bits(chunks, c):
    base, tensors = chunks.inputs(c)
    size = chunks.sizes[c]
    return np.asarray(S.sce_variance(base, tensors, deltas=chunks.deltas))[:size].view(np.uint32)


def _selection(res: Resolved, chunks):
    """The variance threshold and tie cuts: (thr, cut) or (None, None) without selection."""
    frac = res.shared["select_topk"]
    if frac >= 1.0:
        return None, None
    n_chunks = len(chunks)
    nonzero = sum(int(np.count_nonzero(_var_bits(chunks, c))) for c in range(n_chunks))
    k = int(nonzero * frac)
    if k == 0:
        return NONE_SELECTED, np.zeros(n_chunks, np.int32)

    def sampled(i, idx):
        b, ts = chunks.sampled_inputs(idx)
        return np.asarray(S.sce_variance(b, ts, deltas=chunks.deltas)).view(np.uint32)

    def passes():
        return ([_var_bits(chunks, c)] for c in range(n_chunks))

    thr, n_gt, ties = select_ranks(chunks.n, np.array([[k]]), sampled, passes)
    cut = tie_cuts(k - n_gt[:, 0], ties[:, 0], thr[:, 0], lambda c, m: _var_bits(chunks, c), chunks.sizes)
    return thr[0, 0], cut[:, 0]


def _sel(stats: SCEStats, c: int):
    return None if stats.thr is None else S.SCESelect(np.uint32(stats.thr), np.int32(stats.cut[c]))


def tensor_stats(res: Resolved, chunks, key) -> SCEStats:
    thr, cut = _selection(res, chunks)
    stats = SCEStats(np.zeros(chunks.k, np.float32), thr, cut)
    sq = np.zeros(chunks.k)
    for c in range(len(chunks)):
        sq += np.asarray(S.sce_sq_sums(*chunks.inputs(c), _sel(stats, c), deltas=chunks.deltas))
    return stats._replace(weights=sce_weights(sq, chunks.n))


def apply(res: Resolved, chunks, stats: SCEStats, key) -> None:
    for c in range(len(chunks)):
        chunks.store(c, S.sce_kernel(*chunks.inputs(c), stats.weights, _sel(stats, c), chunks.limit,
                                     deltas=chunks.deltas))


SCE = MergeMethod("sce", {"select_topk": 1.0, "int8_mask": False}, {"weight": 1.0}, True, check, statistics, apply,
                  tensor_stats=tensor_stats, options={"ignores": ("weight",)})
