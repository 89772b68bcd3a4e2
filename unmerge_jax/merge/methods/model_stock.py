"""Model Stock (arXiv:2403.19522): ``model_stock``, with ``filter_wise``, as mergekit 0.1.5.

With K ≥ 2 task vectors ``δ_k = θ_k − θ_base`` and the mean pairwise cosine ``cos`` (each pair's
``⟨δ_i, δ_j⟩ / max(‖δ_i‖‖δ_j‖, 1e-6)`` clipped to [−1, 1]), the interpolation ratio is
``t = K·cos / (1 + (K−1)·cos)`` (0 where ``|1 + (K−1)·cos| < 1e-6``: no finite estimate, the base
is kept) and ``θ = t·mean_k θ_k + (1 − t)·θ_base``. Parallel task vectors give t = 1 (their mean),
orthogonal ones t = 0 (the base).

* default: one ``t`` per tensor. Statistics pass (``"tensor"``): the K×K Gram of the task vectors
  summed over the chunks in float64 (:func:`~unmerge_jax.kernels.merge_stock.stock_gram`).
* ``filter_wise: true``: one ``t`` per row of the last axis (a 1-D tensor is one row), computed in
  the apply kernel on chunks of whole rows (``MergeMethod.rows``); no statistics pass.

mergekit's ``model_stock`` takes no per-model ``weight``; a config may give one (mergekit ignores
it silently): it is accepted and ignored, with a note at run time.
"""

from __future__ import annotations

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.kernels import merge_stock as S
from unmerge_jax.merge.base import MergeMethod, Resolved, as_bool


def check(method: MergeMethod, shared: dict, weights: np.ndarray, density: np.ndarray, at: str) -> dict:
    """``filter_wise`` a bool; at least 2 models besides the base (mergekit: 3 inputs)."""
    out = dict(shared)
    out["filter_wise"] = as_bool("filter_wise", out["filter_wise"])
    if len(weights) < 2:
        raise UnmergeError(f"merge method 'model_stock' needs at least 2 models besides the base_model{at} (it "
                           f"averages their pairwise cosines); add a model")
    return out


def statistics(res: Resolved) -> str:
    return "none" if res.shared["filter_wise"] else "tensor"


def rows(res: Resolved) -> bool:
    return res.shared["filter_wise"]


def tensor_ratio(gram) -> np.float32:
    """The tensor's ``t`` from its float64 (K, K) Gram of task vectors."""
    return np.float32(S.stock_ratio(np.asarray(gram, np.float64)))


def tensor_stats(res: Resolved, chunks, key) -> np.float32:
    gram = np.zeros((chunks.k, chunks.k))
    for c in range(len(chunks)):
        gram += np.asarray(S.stock_gram(*chunks.inputs(c), deltas=chunks.deltas))
    return tensor_ratio(gram)


def apply(res: Resolved, chunks, stats, key) -> None:
    row_len = chunks.row_len if res.shared["filter_wise"] else None
    t = np.float32(0.0 if stats is None else stats)
    for c in range(len(chunks)):
        chunks.store(c, S.stock_kernel(*chunks.inputs(c), t, chunks.limit, row_len=row_len, deltas=chunks.deltas))


MODEL_STOCK = MergeMethod("model_stock", {"filter_wise": False}, {"weight": 1.0}, True, check, statistics, apply,
                          tensor_stats=tensor_stats, rows=rows, options={"ignores": ("weight",)})
